"""Training data: token shards and the resumable distributed sampler."""
