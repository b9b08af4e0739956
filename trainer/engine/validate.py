"""Preflight of a run config in one process: every stage a real run goes through, each timed and
reported PASS/FAIL with a one-line reason. Knows no task: it drives the `Task` and the engine's
own step. Nothing is written outside a temporary folder (MLflow: a temporary store unless
`tracking.uri` names a server, where the check logs to a run tagged `trainer.validate`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.errors import UserError

CHECKS = (
    "configuration",
    "model initialization",
    "parameter freezing",
    "data pipeline",
    "forward pass",
    "training step",
    "checkpoint save and load",
    "MLflow logging",
    "short training run",
    "preemption timing",
)


@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    seconds: float
    detail: str


class Validator:
    def __init__(self, config: Path, overrides: Any, quick: bool, verbose: bool, echo: Callable[[str], None]):
        self.config, self.overrides, self.quick, self.verbose, self.echo = config, overrides, quick, verbose, echo
        self.results: list[Result] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="trainer-validate-"))
        self.cfg: Any = None
        self.task: Any = None
        self.model: Any = None
        self.trainer: Any = None
        self.batch: Any = None
        self.configured = (1, 1)
        self.step_s = 0.0
        self.save_s = 0.0

    # ------------------------------------------------------------------------------ checks
    def configuration(self) -> str:
        from trainer.config.batch import resolve_batch
        from trainer.config.load import load_config
        from trainer.config.plan import DataSizes
        from trainer.config.resolve import resolve_run
        from trainer.tasks import build_task

        cfg = resolve_batch(load_config(self.config, self.overrides), 1, str(self.config))
        cfg.run_dir = self.tmp / "runs"
        cfg.checkpoint.resume = "none"
        cfg.upload.url = None
        self.configured = (cfg.train.micro_batch_size, cfg.train.grad_accum)  # checks run smaller; timing scales back
        cfg.train.global_batch_size = None
        cfg.train.grad_accum = 1
        cfg.train.micro_batch_size = min(cfg.train.micro_batch_size, 2)
        self.cfg, self.task = cfg, build_task(cfg)
        hidden = self.task.model_hints().get("hidden_size")
        resolve_run(cfg, 1, str(self.config), hidden)  # as the ranks do: batch and DeepSpeed settings first
        self.task.prepare_data()
        sizes = self.task.preflight() or DataSizes(1)
        run = resolve_run(cfg, 1, str(self.config), hidden, sizes)
        self.ds_config, self.plan = run.ds_config, run.plan
        val = f", {sizes.val:,} validation samples" if sizes.val else ", no validation data"
        return (
            f"task {cfg.task}, ZeRO stage {self.ds_config['zero_optimization']['stage']}, {cfg.train.precision},"
            f" {sizes.train:,} training samples{val}"
        )

    def model_initialization(self) -> str:
        from trainer.engine.loop import Trainer

        self._init_dist()
        self.trainer = Trainer(self.cfg, self.task, source=str(self.config))
        self.trainer.ds_config, self.trainer.stage = self.ds_config, self.ds_config["zero_optimization"]["stage"]
        self.trainer.plan = self.plan
        import deepspeed

        self.model = self.trainer._build_model(deepspeed)
        n = sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in self.model.parameters())
        return f"{n:,} parameters"

    def parameter_freezing(self) -> str:
        problems = self.task.freezing_problems(self.model)
        if problems:
            raise UserError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        params = list(self.model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        return f"trainable {trainable:,} of {total:,} ({trainable / max(total, 1):.2%})"

    def data_pipeline(self) -> str:
        from trainer.ranks import RankInfo

        self.task.setup_data(RankInfo(0, 1, 0, 1), self.cfg.train.micro_batch_size, 1)
        self.batch = self.task.batch(0, 0, "cpu")
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in list(self.batch.items())[:4])
        if self.task.val_size():
            self.task.val_batch([0], "cpu")
            shapes += f"; a validation batch of the {self.task.val_size():,} samples too"
        return shapes

    def forward_pass(self) -> str:
        import torch

        with torch.no_grad():
            loss = float(self.task.loss(self.model, self.batch))
        if not math.isfinite(loss):
            raise UserError(f"the loss of the first batch is {loss}")
        return f"loss {loss:.4f}"

    def training_step(self) -> str:
        self.trainer.initialize_engine(self.model)
        t = self.trainer
        before = self._snapshot()
        t.train_step()
        after = self._snapshot()
        changed = [n for n in before["trainable"] if before["trainable"][n] != after["trainable"][n]]
        moved = [n for n in before["frozen"] if before["frozen"][n] != after["frozen"][n]]
        if moved:
            raise UserError(f"a frozen parameter changed in the step: {moved[0]}")
        if not changed:
            raise UserError("no trainable parameter changed in the step (zero gradients, or lr 0?)")
        return f"{len(changed)}/{len(before['trainable'])} trainable tensors updated, frozen unchanged"

    def checkpoint_save_and_load(self) -> str:
        t = self.trainer
        root = self.tmp / "ckpt"
        tag = "step-check"
        t0 = time.perf_counter()
        t.engine.save_checkpoint(
            str(root), tag=tag, save_latest=False, exclude_frozen_parameters=not self.task.save_frozen
        )
        self.task.on_save(t.engine.module, root / tag, True, False)
        os.sync()  # a save is on disk only once flushed: the emergency-save budget needs the whole time
        self.save_s = time.perf_counter() - t0
        saved = self._snapshot()["trainable"]
        t.train_step()  # move away from the saved weights, then come back
        t.engine.load_checkpoint(str(root), tag=tag, load_module_strict=self.task.save_frozen)
        loaded = self._snapshot()["trainable"]
        bad = [n for n in saved if saved[n] != loaded[n]]
        if bad:
            raise UserError(f"{bad[0]} differs after loading the checkpoint back")
        from trainer.checkpoint.store import checkpoint_bytes

        size = checkpoint_bytes(root / tag)
        return f"{len(saved)} trainable tensors round-trip exactly ({size / 1e6:.1f} MB)"

    def mlflow_logging(self) -> str:
        from trainer.tracking.mlflow_tracker import MlflowTracker

        tc = self.cfg.tracking
        if not tc.enabled:
            return "SKIP: tracking.enabled is false"
        tracker = MlflowTracker(tc, self.tmp / "runs", f"{tc.experiment or self.cfg.task}-validate", "validate", None)
        tracker.set_tags({"trainer.validate": "true"})
        tracker.log_metrics({"validate/loss": 1.0}, 1)
        tracker.finish("FINISHED")
        hist = tracker.client.get_metric_history(tracker.run_id, "validate/loss")
        if not hist:
            raise UserError(f"a metric logged to {tracker.uri} could not be read back")
        return f"metric logged and read back (run {tracker.run_id})"

    def short_training_run(self) -> str:
        steps = 3 if self.quick else 10
        losses, times = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(float(self.trainer.train_step().detach()))
            times.append(time.perf_counter() - t0)
        if not all(math.isfinite(x) for x in losses):
            raise UserError(f"non-finite loss in {steps} steps: {losses}")
        self.step_s = sorted(times[1:] or times)[len(times[1:] or times) // 2]  # median after the first
        return f"{steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}"

    def preemption_timing(self) -> str:
        """Can a SIGTERM be honoured in `preemption.grace_s`? The step time measured here, scaled to the
        configured batch, and the measured save time, against the grace period."""
        from trainer.engine.grace import grace_problems

        micro, accum = self.configured
        step_s = self.step_s / self.cfg.train.micro_batch_size * micro * accum  # one rank, configured micro batch
        cfg = self.cfg.model_copy(deep=True)
        cfg.train.grad_accum = accum
        problems = grace_problems(cfg, step_s, self.save_s)
        p = cfg.preemption
        unit = "micro-batch" if accum > 1 and p.check_micro_batches else "step"
        wait = step_s / accum if unit == "micro-batch" else step_s
        if problems:
            raise UserError(f"(estimated on this machine, 1 rank) {problems[0][1]}")
        return (
            f"a stop waits for one {unit} (~{wait:.2f} s here) and an emergency save takes ~{self.save_s:.2f} s: within"
            f" the {p.grace_s:.0f} s grace"
        )

    # ----------------------------------------------------------------------------- driver
    def _snapshot(self) -> dict[str, dict[str, str]]:
        """A digest of every parameter's bytes (gathered one at a time under ZeRO-3), trainable and frozen apart."""
        import deepspeed

        from trainer.tensors import tensors_sha256

        out: dict[str, dict[str, str]] = {"trainable": {}, "frozen": {}}
        for n, p in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out["trainable" if p.requires_grad else "frozen"][n] = tensors_sha256([(n, p)])
        return out

    def _init_dist(self) -> None:
        from trainer.engine import dist
        from trainer.launcher.command import become_one_rank

        become_one_rank()
        dist.init_distributed()

    def run(self) -> bool:
        import logging

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        failed: Optional[str] = None
        try:
            for name in CHECKS:
                if failed:
                    self._report(Result(name, "SKIP", 0.0, f"needs {failed}"))
                    continue
                t0 = time.perf_counter()
                try:
                    detail = getattr(self, name.replace(" ", "_").lower())()
                    status = "SKIP" if detail.startswith("SKIP: ") else "PASS"
                    self._report(Result(name, status, time.perf_counter() - t0, detail.removeprefix("SKIP: ")))
                except Exception as exc:
                    reason = (
                        str(exc).splitlines()[0]
                        if isinstance(exc, UserError)
                        else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    )
                    self._report(Result(name, "FAIL", time.perf_counter() - t0, reason))
                    if self.verbose and not isinstance(exc, UserError):
                        self.echo(traceback.format_exc())
                    if name != "MLflow logging":  # tracking is optional for the checks after it
                        failed = name
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        passed = sum(r.status != "FAIL" for r in self.results)
        self.echo(
            f"{passed}/{len(self.results)} checks passed"
            + (
                ""
                if passed == len(self.results)
                else f"; first failure: {next(r.name for r in self.results if r.status == 'FAIL')}"
            )
        )
        return passed == len(self.results)

    def _report(self, r: Result) -> None:
        self.results.append(r)
        self.echo(f"{r.status}  {r.name:<26} {r.seconds:7.2f} s  {r.detail}")
