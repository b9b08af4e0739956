#!/usr/bin/env python
"""Training throughput of a preset on this machine: one Markdown table row.

    python tools/bench_train.py neox-tiny                      # CPU, fp32, ZeRO-2, 1 rank
    python tools/bench_train.py neox-1.2b --precision bf16 --zero 1 --micro-batch 8 --steps 20
    python tools/bench_train.py lora-tiny                      # Phase 2 LoRA, tiny fixtures
    python tools/bench_train.py lora-qwen2.5-0.5b --precision bf16 --zero 2 --micro-batch 8   # GPU
    python tools/bench_train.py lora-tiny --micro-batch 16 --compare-workers 0,2 --rounds 2     # data.num_workers
    python tools/bench_train.py neox-tiny --micro-batch 8 --steps 150 --compare-bare --rounds 3  # bare DeepSpeed

Runs the real engine (the same `Trainer` setup and step as `trainer train`) on one rank with
random tokens in a temporary shard folder (LoRA: fixtures from tools/make_tiny_multimodal.py, random
weights), MLflow and uploads off, no checkpoints. Reports the median step time over the measured
steps, tokens/s and MFU (FLOPs per token: 6N + 12*L*d*T for pretraining; 4N + 8*L*d*T for LoRA,
whose frozen weights need no weight gradients; over the device's bf16 peak; GPUs only). For
several ranks, start it with the deepspeed launcher.

`--compare-bare` (pretraining presets): the project's step against a bare DeepSpeed engine around the same model
class (built by the same task, so the same initialisation and attention), fed the same batches and loss, with
DeepSpeed's defaults for everything the run config does not set (`deepspeed.initialize` with only the batch size,
ZeRO stage, precision, gradient clipping and an AdamW optimizer section). Blocks of --warmup + --steps alternate,
--rounds times; the ratio of the medians is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADER = (
    "| preset | device | ranks | precision | ZeRO | micro x accum | seq | attention | act. ckpt | step time (s) |"
    " tokens/s | MFU |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=["neox-tiny", "neox-410m", "neox-1.2b", "lora-tiny", "lora-qwen2.5-0.5b"])
    p.add_argument("--max-length", type=int, default=None, help="LoRA: prompt + response tokens per sample")
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
    p.add_argument(
        "--compare-workers",
        default=None,
        help="LoRA: data.num_workers values, e.g. 0,2, measured in alternating"
        " blocks of --steps on the same engine (side by side)",
    )
    p.add_argument("--rounds", type=int, default=2, help="with --compare-workers/--compare-bare: blocks per value")
    p.add_argument(
        "--compare-bare",
        action="store_true",
        help="pretraining: alternate with a bare DeepSpeed engine (side by side) and print the ratio",
    )
    args = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import torch

    from trainer.config.schema import RunConfig
    from trainer.engine.loop import Trainer
    from trainer.launcher.command import become_one_rank
    from trainer.log import setup_logging
    from trainer.models.neox import resolve_dims
    from trainer.tasks import build_task

    become_one_rank()
    gpu = torch.cuda.is_available()
    precision = args.precision or ("bf16" if gpu else "fp32")
    zero = args.zero if args.zero is not None else (1 if gpu else 2)
    micro = args.micro_batch or (8 if gpu else 4)
    setup_logging(0)
    total_steps = args.warmup + args.steps
    common = {
        "optim": {"warmup_steps": 1},
        "tracking": {"enabled": False},
        "eval": {"enabled": False},
        "deepspeed": {"template": f"zero{zero}"},
        "train": {
            "max_steps": total_steps + 1,
            "micro_batch_size": micro,
            "grad_accum": args.grad_accum,
            "precision": precision,
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if args.preset.startswith("lora-"):
            seq, cfg = lora_config(Path(tmp), args, common)
        else:
            dims = resolve_dims(args.preset, None, 128, args.seq_len)
            seq = dims["seq_len"]
            data = Path(tmp) / "shards"
            data.mkdir()
            tokens = (total_steps * micro * args.grad_accum + 8) * (seq + 1)
            np.save(
                data / "shard_00000.npy",
                np.random.default_rng(0).integers(0, dims["vocab_size"], tokens, dtype=np.int32),
            )
            cfg = RunConfig.model_validate(
                {
                    **common,
                    "run_dir": str(Path(tmp) / "runs"),
                    "data": {"path": str(data)},
                    "model": {
                        "preset": args.preset,
                        "seq_len": args.seq_len,
                        "attn_implementation": args.attn,
                        "gradient_checkpointing": args.grad_ckpt,
                    },
                }
            )
        trainer = Trainer(cfg, build_task(cfg), source="bench")
        trainer.setup()
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        if args.compare_workers:
            return compare_workers(trainer, [int(w) for w in args.compare_workers.split(",")], args, sync)
        if args.compare_bare:
            return compare_bare(trainer, args, sync)
        times = []
        for i in range(total_steps):
            sync()
            t0 = time.perf_counter()
            trainer.train_step()
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        data_times = []
        for i in range(args.warmup, total_steps):  # the batches again, alone: how much of a step is data preparation
            t0 = time.perf_counter()
            trainer.task.batch(i, 0, trainer.engine.device)
            data_times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tps = trainer.tokens_per_step() / step
    util = None
    if trainer.peak and trainer.flops_per_token:
        util = tps / trainer.ranks.world_size * trainer.flops_per_token / trainer.peak
    from trainer.engine.metrics import accelerator_name

    if not args.no_header:
        print(HEADER)
    print(
        f"| {args.preset} | {accelerator_name()} | {trainer.ranks.world_size} | {precision} | {zero} | {micro} x "
        f"{args.grad_accum} |"
        f" {seq} | {args.attn} | {'yes' if args.grad_ckpt else 'no'} | {step:.4f} | {tps:,.0f} |"
        f" {f'{util:.1%}' if util is not None else 'n/a (CPU)'} |"
    )
    print(
        f"batch preparation: {statistics.median(data_times) * args.grad_accum:.4f} s of the {step:.4f} s step"
        f" ({statistics.median(data_times) * args.grad_accum / step:.0%})"
    )
    return 0


def compare_workers(trainer: "object", workers: list[int], args: argparse.Namespace, sync: "object") -> int:
    """Step time with each data.num_workers value, in alternating blocks on one engine: (warmup + steps) per block."""
    import statistics

    task = trainer.task  # type: ignore[attr-defined]
    rows: dict[int, list[float]] = {w: [] for w in workers}
    for r in range(args.rounds):
        for w in workers:
            if task.prefetch is not None:
                task.prefetch.close()
            task.prefetch, task.workers = None, w
            times = []
            for i in range(args.warmup + args.steps):
                sync()  # type: ignore[operator]
                t0 = time.perf_counter()
                trainer.train_step()  # type: ignore[attr-defined]
                sync()  # type: ignore[operator]
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            rows[w].append(statistics.median(times))
            print(f"round {r + 1}, {w} worker(s): median step {rows[w][-1]:.4f} s over {args.steps} steps", flush=True)
    base = statistics.median(rows[workers[0]])
    print("| workers | median step (s) per round | median | vs " + str(workers[0]) + " |\n|---|---|---|---|")
    for w in workers:
        med = statistics.median(rows[w])
        print(f"| {w} | {', '.join(f'{t:.4f}' for t in rows[w])} | {med:.4f} | {med / base:.2f}x |")
    return 0


def bare_engine(trainer: Any) -> Any:
    """DeepSpeed around the task's model with DeepSpeed's defaults: what a minimal training script would write."""
    import deepspeed

    cfg, t = trainer.cfg, trainer.cfg.train
    model = trainer.task.build_model()
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": trainer.stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    return engine


def compare_bare(trainer: Any, args: argparse.Namespace, sync: Any) -> int:
    """Median step time of `trainer.train_step()` and of the bare loop, in alternating blocks."""
    task, accum = trainer.task, trainer.cfg.train.grad_accum
    bare = bare_engine(trainer)
    step = {"bare": 0}

    def bare_step() -> None:
        for m in range(accum):
            loss = task.loss(bare, task.batch(step["bare"], m, bare.device))
            bare.backward(loss)
            bare.step()
        step["bare"] += 1

    ways = {"trainer": trainer.train_step, "bare": bare_step}
    rows: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(args.rounds):
        for name, fn in ways.items():
            times = []
            for i in range(args.warmup + args.steps):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            rows[name].append(statistics.median(times))
            print(f"round {r + 1}, {name}: median step {rows[name][-1]:.4f} s over {args.steps} steps", flush=True)
    print("| engine | median step (s) per round | median | tokens/s vs bare |\n|---|---|---|---|")
    base = statistics.median(rows["bare"])
    for name in ways:
        med = statistics.median(rows[name])
        print(f"| {name} | {', '.join(f'{t:.4f}' for t in rows[name])} | {med:.4f} | {base / med:.3f}x |")
    return 0


def lora_config(tmp: Path, args: argparse.Namespace, common: dict) -> tuple[int, "object"]:
    """Fixtures (tiny, or Qwen2.5-0.5B's shape with real-size encoders; random weights) and the LoRA run config."""
    import subprocess

    from trainer.config.schema import RunConfig

    size = "tiny" if args.preset == "lora-tiny" else "qwen2.5-0.5b"
    out = tmp / "mm"
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "make_tiny_multimodal.py"),
            "--out",
            str(out),
            "--size",
            size,
            "--samples",
            "64",
        ],
        check=True,
        capture_output=True,
    )
    max_length = args.max_length or (48 if size == "tiny" else 512)
    tokens = {"image": 2, "audio": 2, "text": 2} if size == "tiny" else {"image": 32, "audio": 32, "text": 32}
    cfg = RunConfig.model_validate(
        {
            **common,
            "task": "lora",
            "run_dir": str(tmp / "runs"),
            "data": {"path": str(out / "data")},
            "model": {"attn_implementation": args.attn, "gradient_checkpointing": args.grad_ckpt},
            "lora": {
                "llm_path": str(out / "llm"),
                "phase1_checkpoint": str(out / "phase1.safetensors"),
                "r": 16,
                "alpha": 32,
                "soft_tokens": tokens,
                "projector_hidden": 64 if size == "tiny" else 1024,
                "max_length": max_length,
            },
        }
    )
    return max_length + sum(tokens.values()), cfg


if __name__ == "__main__":
    sys.exit(main())
