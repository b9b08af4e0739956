"""A process's random number generators (Python, NumPy, torch CPU and CUDA): captured with every checkpoint
(one file per rank) and around each evaluation, restored on a resume, so that dropout and sampling continue
exactly."""

from __future__ import annotations

import random
from typing import Any


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA), as saved beside each checkpoint."""
    import numpy as np
    import torch

    rng: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
