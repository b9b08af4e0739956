#!/usr/bin/env python
"""What held-out evaluation costs: seconds per evaluation, and its share of training time at a cadence.

One rank in this process (a real DeepSpeed engine, the real `Evaluator`), pretraining on random
shards with `data.val_fraction` held out. Training steps and evaluations alternate, so both are
measured under the same conditions; medians after a warm-up. The share is
eval_s / (eval.every x step_s + eval_s): the part of the wall time evaluation takes at that cadence.

    python tools/bench_eval.py --preset neox-tiny
    python tools/bench_eval.py --preset neox-410m --micro-batch 2 --steps 3 --evals 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HEADER = (
    "| preset | device | micro batch x seq | eval.batches | samples per eval | step (s) | eval (s) | eval per batch (s)"
    " | share at eval.every 100 | share at eval.every 20 |\n|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="neox-tiny", choices=["neox-tiny", "neox-410m", "neox-1.2b"])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batches", type=int, default=None, help="eval.batches (default: the config default, 20)")
    p.add_argument("--steps", type=int, default=10, help="training steps measured per round")
    p.add_argument("--evals", type=int, default=3, help="rounds (one evaluation each)")
    p.add_argument("--no-header", action="store_true")
    args = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import torch

    from trainer.config.schema import EvalConfig, RunConfig
    from trainer.engine.loop import Trainer
    from trainer.engine.metrics import accelerator_name
    from trainer.launcher.command import become_one_rank
    from trainer.log import setup_logging
    from trainer.models.neox import resolve_dims
    from trainer.tasks import build_task

    become_one_rank()
    setup_logging(0)
    batches = EvalConfig().batches if args.batches is None else args.batches
    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    dims = resolve_dims(args.preset, None, 128, args.seq_len)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        data = Path(tmp) / "shards"
        data.mkdir()
        windows = max(2000, (args.steps * args.evals + 4) * args.micro_batch * 2)
        np.save(
            data / "shard_00000.npy",
            np.random.default_rng(0).integers(0, dims["vocab_size"], windows * args.seq_len + 1, dtype=np.int32),
        )
        cfg = RunConfig.model_validate(
            {
                "run_dir": str(Path(tmp) / "runs"),
                "data": {"path": str(data), "val_fraction": 0.05},
                "model": {"preset": args.preset, "seq_len": args.seq_len},
                "optim": {"warmup_steps": 1},
                "train": {
                    "max_steps": 10**6,
                    "micro_batch_size": args.micro_batch,
                    "precision": "bf16" if gpu else "fp32",
                },
                "eval": {"batches": batches},
                "tracking": {"enabled": False},
                "deepspeed": {"template": "zero1" if gpu else "zero2"},
            }
        )
        trainer = Trainer(cfg, build_task(cfg), source="bench")
        trainer.setup()
        assert trainer.evaluator is not None
        trainer.train_step()  # warm-up
        trainer.evaluator.run(0)
        steps, evals = [], []
        for _ in range(args.evals):
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                trainer.train_step()
                sync()
                steps.append(time.perf_counter() - t0)
            sync()
            evals.append(trainer.evaluator.run(trainer.state.step).seconds)
        samples = len(trainer.evaluator.subset)
    step, ev = statistics.median(steps), statistics.median(evals)

    def share(every: int) -> str:
        return f"{ev / (every * step + ev):.1%}"

    if not args.no_header:
        print(HEADER)
    print(
        f"| {args.preset} | {accelerator_name()} | {args.micro_batch} x {args.seq_len} | {batches} | {samples} | "
        f"{step:.3f} | {ev:.3f} |"
        f" {ev / max(1, -(-samples // args.micro_batch)):.3f} | {share(100)} | {share(20)} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
