"""Throughput and utilisation: tokens/s, model FLOPs utilisation (MFU), and system info."""

from __future__ import annotations

import platform
from typing import Optional

# Dense bf16/fp16 tensor-core peak per device, FLOP/s (vendor datasheets, without sparsity).
_PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("B200", 2250e12),
]


def peak_flops(device_name: str) -> Optional[float]:
    """Peak bf16 FLOP/s of a GPU named like torch reports it, or None (CPU, unknown device)."""
    for key, flops in _PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def accelerator_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def mfu(tokens_per_s_per_device: float, flops_per_token: Optional[float], peak: Optional[float]) -> Optional[float]:
    """Achieved training FLOP/s per device over the device peak (None where no peak is known)."""
    if not flops_per_token or not peak:
        return None
    return tokens_per_s_per_device * flops_per_token / peak


def system_info(precision: str, world_size: int, zero_stage: int) -> dict:
    import deepspeed
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "accelerator": accelerator_name(),
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "precision": precision,
        "world_size": world_size,
        "zero_stage": zero_stage,
        "hostname": platform.node(),
    }
