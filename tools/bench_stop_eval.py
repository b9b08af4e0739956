#!/usr/bin/env python
"""A stop on an evaluation step: is the evaluation run before the emergency save, and how long is the stop?

    python tools/bench_stop_eval.py neox-tiny
    python tools/bench_stop_eval.py neox-410m --grace 25 --no-header

One rank, in-process (the same `Trainer` as `trainer train`), random tokens, pretraining at micro batch 2, seq 128.
The job evaluates at the start and every `--every` steps (`--batches` validation micro-batches), and saves as often
(from step `--every` on a save time is known). A stop is requested during the last micro-batch of step 2 x `--every`,
an evaluation step. The row says what the job did with `preemption.grace_s` = --grace: evaluated first (both fit)
or saved without (the resume evaluates), and the seconds from the stop request to `train()` returning, against
the grace period.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADER = (
    "| preset | grace (s) | step (s) | at the stop (the job's own line) | stop to exit (s) | checkpoint val_loss |\n"
    "|---|---|---|---|---|---|"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=["neox-tiny", "neox-410m", "neox-1.2b"])
    p.add_argument("--every", type=int, default=2, help="eval.every (the stop comes at step 2 x this)")
    p.add_argument("--batches", type=int, default=2, help="eval.batches")
    p.add_argument("--grace", type=float, default=25.0, help="preemption.grace_s")
    p.add_argument("--no-header", action="store_true")
    args = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import json
    import logging
    import statistics

    import numpy as np

    from trainer.config.schema import RunConfig
    from trainer.engine.loop import Trainer
    from trainer.launcher.command import become_one_rank
    from trainer.log import setup_logging
    from trainer.models.neox import resolve_dims
    from trainer.tasks import build_task

    become_one_rank()
    setup_logging(0)
    stop_step = 2 * args.every
    with tempfile.TemporaryDirectory(prefix="bench-stop-eval-") as tmp:
        dims = resolve_dims(args.preset, None, 128, 128)
        data = Path(tmp) / "shards"
        data.mkdir()
        windows = 1000 + stop_step * 2  # the first 50 of every 1000 windows are validation windows
        np.save(
            data / "shard_00000.npy",
            np.random.default_rng(0).integers(0, dims["vocab_size"], windows * 129, dtype=np.int32),
        )
        cfg = RunConfig.model_validate(
            {
                "run_dir": str(Path(tmp) / "runs"),
                "data": {"path": str(data), "val_fraction": 0.05},
                "model": {"preset": args.preset, "seq_len": 128},
                "optim": {"warmup_steps": 1},
                "train": {"max_steps": stop_step + 2, "micro_batch_size": 2, "precision": "fp32"},
                "eval": {"every": args.every, "batches": args.batches},
                "checkpoint": {"save_every": args.every, "keep_last": 3},
                "preemption": {"grace_s": args.grace},
                "tracking": {"enabled": False},
            }
        )
        trainer = Trainer(cfg, build_task(cfg), source="bench")
        trainer.setup()
        batch = trainer.task.batch
        requested: list[float] = []

        def stop_in_the_last_micro_batch(step: int, micro: int, device: object) -> object:
            if step == stop_step - 1 and micro == cfg.train.grad_accum - 1 and not requested:
                requested.append(time.monotonic())
                trainer.stop.request("bench")
            return batch(step, micro, device)

        trainer.task.batch = stop_in_the_last_micro_batch  # type: ignore[method-assign]
        lines: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("trainer").addHandler(handler)
        code = trainer.train()
        exit_s = time.monotonic() - requested[0]
        assert code == 75, code
        saved = trainer.run_root / "checkpoints" / f"step-{stop_step:08d}" / "metadata.json"
        has_ckpt = saved.is_file()
        val = json.loads(saved.read_text()).get("val_loss") if has_ckpt else None
        said = next((line for line in lines if line.startswith(f"stop on evaluation step {stop_step}:")), "(none)")
        step_s = statistics.median(times) if (times := step_times(lines)) else float("nan")
    if not args.no_header:
        print(HEADER)
    print(
        f"| {args.preset} | {args.grace:g} | {step_s:.1f} | {said.split(': ', 1)[-1]} | {exit_s:.1f} |"
        f" {f'{val:.4f}' if val is not None else 'none' + ('' if has_ckpt else ' (nothing saved)')} |"
    )
    return 0


def step_times(lines: list[str]) -> list[float]:
    """The step times the job's log lines report (`... step 13.347s ...`)."""
    import re

    return [float(m[1]) for line in lines if (m := re.search(r" step (\d+\.\d+)s ", line))]


if __name__ == "__main__":
    sys.exit(main())
