"""DeepSpeed-backed distributed training service.

Heavy libraries (torch, deepspeed, transformers, mlflow) are imported lazily inside the modules
that need them, so `trainer --help` and config validation stay fast.
"""

from trainer.version import __version__

__all__ = ["__version__"]
