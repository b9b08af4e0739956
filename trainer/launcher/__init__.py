"""Building and running the `deepspeed` launcher command: hostfiles, local vs multi-node flags."""
