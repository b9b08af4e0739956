"""The training loop around the DeepSpeed engine: distributed setup, optimizer, metrics, signals."""
