"""Small tensor utilities shared by tasks and the engine."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable


def tensors_sha256(named: Iterable[tuple[str, Any]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of tensors in name order: equal iff the weights are bit-identical."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy())
    return h.hexdigest()
