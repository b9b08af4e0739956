#!/usr/bin/env python
"""Training throughput of a preset on this machine: one Markdown table row.

    python tools/bench_train.py neox-tiny                      # CPU, fp32, ZeRO-2, 1 rank
    python tools/bench_train.py neox-1.2b --precision bf16 --zero 1 --micro-batch 8 --steps 20

Runs the real engine (the same `Trainer` setup and step as `trainer train`) on one rank with
random tokens in a temporary shard folder, MLflow and uploads off, no checkpoints. Reports the
median step time over the measured steps, tokens/s and MFU (FLOPs per token = 6N + 12*L*d*T,
over the device's bf16 peak; GPUs only). For several ranks, start it with the deepspeed launcher.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADER = ("| preset | device | ranks | precision | ZeRO | micro x accum | seq | attention | act. ckpt | step time (s) |"
          " tokens/s | MFU |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=["neox-tiny", "neox-1.2b"])
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (allocations, autotuning)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--no-header", action="store_true")
    args = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    import numpy as np
    import torch

    from trainer.config.schema import RunConfig
    from trainer.engine.loop import Trainer
    from trainer.launcher.command import free_port
    from trainer.log import setup_logging
    from trainer.models.neox import resolve_dims
    from trainer.tasks import build_task

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    gpu = torch.cuda.is_available()
    precision = args.precision or ("bf16" if gpu else "fp32")
    zero = args.zero if args.zero is not None else (1 if gpu else 2)
    micro = args.micro_batch or (8 if gpu else 4)
    setup_logging(0)
    dims = resolve_dims(args.preset, None, 128, args.seq_len)
    total_steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = Path(tmp) / "shards"
        data.mkdir()
        tokens = (total_steps * micro * args.grad_accum + 8) * (dims["seq_len"] + 1)
        np.save(data / "shard_00000.npy", np.random.default_rng(0).integers(0, dims["vocab_size"], tokens, dtype=np.int32))
        cfg = RunConfig.model_validate({
            "run_dir": str(Path(tmp) / "runs"),
            "model": {"preset": args.preset, "seq_len": args.seq_len, "attn_implementation": args.attn,
                      "gradient_checkpointing": args.grad_ckpt},
            "data": {"path": str(data)},
            "optim": {"warmup_steps": 1},
            "train": {"max_steps": total_steps + 1, "micro_batch_size": micro, "grad_accum": args.grad_accum,
                      "precision": precision},
            "tracking": {"enabled": False},
            "deepspeed": {"template": f"zero{zero}"},
        })
        trainer = Trainer(cfg, build_task(cfg), source="bench")
        trainer.setup()
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        times = []
        for i in range(total_steps):
            sync()
            t0 = time.perf_counter()
            trainer.train_step()
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tps = trainer.tokens_per_step() / step
    util = None
    if trainer.peak and trainer.flops_per_token:
        util = tps / trainer.ranks.world_size * trainer.flops_per_token / trainer.peak
    from trainer.engine.metrics import accelerator_name

    if not args.no_header:
        print(HEADER)
    print(f"| {args.preset} | {accelerator_name()} | {trainer.ranks.world_size} | {precision} | {zero} | {micro} x {args.grad_accum} |"
          f" {dims['seq_len']} | {args.attn} | {'yes' if args.grad_ckpt else 'no'} | {step:.4f} | {tps:,.0f} |"
          f" {f'{util:.1%}' if util is not None else 'n/a (CPU)'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
