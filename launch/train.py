#!/usr/bin/env python
"""Entry point for the `deepspeed` launcher:

    deepspeed --hostfile hostfile launch/train.py --config configs/pretrain_tiny.yaml

Thin on purpose: everything happens in `trainer.engine.entry`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.engine.entry import main_and_exit  # noqa: E402

if __name__ == "__main__":
    main_and_exit()
