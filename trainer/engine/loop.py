"""The training loop around a DeepSpeed engine. It runs any `Task` and knows no model or dataset.

Checkpoints (saving in the background, committing, loading, uploads and retention) are the
`CheckpointManager`'s; held-out loss is the `Evaluator`'s; where numbers go (console, MLflow,
TensorBoard, status.json, summary) is the `Reporter`'s; where the wall time goes is the `Goodput`
clock's. Which checkpoint the run starts from, and getting its files onto every node, is `ResumeSteps`'
(engine/resume.py). The run's length and cadences come from its `Plan`. The loop steps and asks them.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from trainer.checkpoint.layout import tag_for, utc_now
from trainer.checkpoint.store import (
    Checkpoint,
    CheckpointStore,
    all_committed,
    atomic_write,
    is_committed,
)
from trainer.config.deepspeed import uses_ds_optimizer
from trainer.config.load import config_hash, config_to_yaml, model_identity, public_config_dict
from trainer.config.plan import DataSizes, Plan
from trainer.config.resolve import resolve_run
from trainer.config.schema import RunConfig
from trainer.engine import dist
from trainer.engine.checkpointing import CheckpointManager
from trainer.engine.rng import capture_rng
from trainer.engine.evaluate import Evaluator
from trainer.engine.goodput import Goodput, PhaseClock, process_started_monotonic
from trainer.engine.grace import grace_problems
from trainer.engine.metrics import accelerator_name, mfu, peak_flops, system_info
from trainer.engine.optim import optimizer_factory, param_groups, scheduler_factory
from trainer.engine.report import Reporter, curve_of
from trainer.engine.resume import ResumeSteps
from trainer.engine.signals import StopFlag, watch_launchers
from trainer.engine.state import LossWindow, RunState
from trainer.errors import EXIT_OK, EXIT_PREEMPTED
from trainer.tasks.base import Task
from trainer.log import add_log_file, add_node_log, get_logger
from trainer.ranks import node_identity, rank_info
from trainer.storage import open_storage

log = get_logger("engine")


class Trainer:
    def __init__(self, cfg: RunConfig, task: Task, source: str = "config"):
        self.cfg = cfg  # resolved for this world size in setup (grad_accum, global_batch_size)
        self.written_cfg = cfg
        self.task = task
        self.source = source
        self.ranks = rank_info()
        self.stop = StopFlag()
        self.clock = PhaseClock("startup", since=process_started_monotonic())
        self.goodput = Goodput(self.clock)
        self.engine: Any = None
        self.plan: Optional[Plan] = None
        self.report: Optional[Reporter] = None
        self.evaluator: Optional[Evaluator] = None
        self.uploader: Any = None
        self.ckpt: Optional[CheckpointManager] = None
        self.state = RunState()
        # the RNG at the start of the step in progress (for a stop between micro-batches)
        self.boundary_rng: Optional[dict] = None
        self.stop_deadline: Optional[float] = None  # monotonic time by which a stopped job must have left
        self.resumed_from_world_size: Optional[int] = None  # the resumed checkpoint's world size, when it differs
        self._grace_warned: set[str] = set()
        self._last_eval_s: Optional[float] = None  # how long this process's last evaluation took

    # ----------------------------------------------------------------------------------- setup
    def say_where_checkpoints_are(self) -> None:
        """For a job stopped while starting: the committed checkpoints under run_dir not in the bucket, each named as
        still local (with its path), as the drain says them at the end of a run (first rank of each node)."""
        from trainer.engine.checkpointing import report_locations

        if self.ranks.is_local_main and self.cfg.upload.url:
            report_locations(all_committed(Path(self.cfg.run_dir)), uploaded_too=False)

    def setup(self) -> None:
        from trainer.dsimport import import_deepspeed

        deepspeed = import_deepspeed()

        self.stop.install()  # from here on a signal stops the job at the next step boundary
        watch_launchers(self.stop)  # ... and so does the loss of the launcher (its runner forwards no signal)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        dist.init_distributed()
        cfg, r = self.cfg, self.ranks
        hidden = self.task.model_hints().get("hidden_size")
        resolve_run(cfg, r.world_size, self.source, hidden)  # bad input before any work
        dist.agree(self.task.prepare_data, dist.local_mains(r), "the first rank of each node preparing the data")
        sizes = dist.on_main_then_share(self.task.preflight, r, "rank 0 checking the data")
        if cfg.upload.url:
            dist.on_main_then_share(lambda: open_storage(cfg.upload.url).check(), r, "rank 0 checking upload.url")
        steps = ResumeSteps(cfg, r, self.clock)
        decision = dist.on_main_then_share(steps.decide, r, "rank 0 choosing (and restoring) the checkpoint to resume")
        node = node_identity(r)  # each node's log, from here on (what each node restores or fetches is in it)
        add_node_log(
            Path(cfg.run_dir),
            Path(cfg.run_dir) / decision.run_id,
            node.node_rank,
            node.host,
            r.is_local_main,
            r.rank,
            node.hosts,
        )
        meta = decision.metadata
        # the global batch on this world size (a checkpoint saved on another one keeps its own), then what follows
        run = resolve_run(cfg, r.world_size, self.source, hidden, sizes or DataSizes(1), meta)
        self.cfg = cfg = run.cfg
        self.ds_config, self.stage, self.plan = run.ds_config, run.stage, run.plan
        self.report = Reporter(cfg, r, self.plan)
        if decision.resume:
            resume = Checkpoint(Path(decision.resume), meta)
            dist.on_main_then_share(
                lambda: resume.check_resumable(
                    str(cfg.checkpoint.resume),
                    r.world_size,
                    cfg.task,
                    self.plan.max_steps,
                    model_identity(cfg),
                    self.stage,
                ),
                r,
                "rank 0 checking the checkpoint to resume",
            )
            steps.restore_on_this_node(decision, self.stage)
            if int(meta.get("world_size", r.world_size)) != r.world_size:
                self.resumed_from_world_size = int(meta["world_size"])
        self.run_id = decision.run_id
        self.branched_from = decision.branched_from
        self.run_root = Path(cfg.run_dir) / self.run_id
        self.store = CheckpointStore(self.run_root)
        if r.is_local_main:
            self.store.remove_partials()  # this run's only: another job may be saving in its own run folder
            self.run_root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        universal = steps.convert_for_this_world(decision) if self.resumed_from_world_size else None
        if r.is_main:
            add_log_file(self.run_root / "train.log", r.rank)
            atomic_write(self.run_root / "config.yaml", config_to_yaml(cfg))
        self.report.open(self.run_root, self.run_id, (meta or {}).get("step", 0))
        source_root = Path(decision.resume).parent.parent if decision.resume else None
        self.goodput.begin(self.run_root, meta, source_root, attempt_id=uuid.uuid4().hex[:12], writer=r.is_main)
        self.config_hash = config_hash(self.written_cfg)  # as written: the same on any world size
        log.info(
            "run %s: %d rank(s), ZeRO stage %d, %s, config %s (hash %s)",
            self.run_id,
            r.world_size,
            self.stage,
            cfg.train.precision,
            self.source,
            self.config_hash,
        )
        log.info(self.plan.describe())

        model = self._build_model(deepspeed)
        for line in self.task.describe_model(model):
            log.info(line)
        self.initialize_engine(model)
        if cfg.upload.url and r.is_local_main:
            from trainer.upload.background import make_uploader
            from trainer.upload.uploader import NodeInfo

            node = NodeInfo(
                r.rank // r.local_world_size, max(1, r.world_size // r.local_world_size), r.local_world_size
            )
            self.uploader = make_uploader(cfg.upload, node)
        self.ckpt = CheckpointManager(
            cfg,
            self.plan,
            r,
            self.store,
            self.task,
            self.goodput,
            self._metadata,
            self._side_files,
            uploader=self.uploader,
            on_commit=self._on_commit,
        )
        self.ckpt.attach(self.engine)
        if decision.resume:
            self.ckpt.load(Path(decision.resume), meta, universal)
            self.state = RunState.from_metadata(meta)
            if meta.get("config_hash") != self.config_hash:
                log.warning(
                    "resuming %s saved with config hash %s; this config hashes to %s (training settings changed)",
                    Path(decision.resume).name,
                    meta.get("config_hash"),
                    self.config_hash,
                )
            log.info("resumed from %s at step %d (run %s)", decision.resume, self.state.step, self.run_id)
        self.task.setup_data(r, cfg.train.micro_batch_size, cfg.train.grad_accum)
        if self.plan.evaluates:
            self.evaluator = Evaluator(self.task, self.engine, r, cfg.train.micro_batch_size, cfg.eval.batches)
            log.info(
                "%s; %s, best checkpoint by %s",
                self.evaluator.describe(),
                "every epoch" if self.plan.eval_every == "epoch" else f"every {self.plan.eval_every} steps",
                self.plan.best_metric,
            )
        self.mlflow_run_id = dist.on_main_then_share(
            lambda: self._start_tracking(meta), r, "rank 0 starting MLflow tracking"
        )
        self.flops_per_token = self.task.flops_per_token(model)
        self.peak = peak_flops(accelerator_name()) if self._on_gpu() else None

    def _start_tracking(self, meta: Optional[dict]) -> Optional[str]:
        """Rank 0: the MLflow run (continued on a resume), with params and the config. Returns its id."""
        assert self.report is not None and self.plan is not None
        return self.report.start_tracking(
            meta,
            {
                "world_size": self.ranks.world_size,
                "zero_stage": self.stage,
                "plan.max_steps": self.plan.max_steps,
                "plan.warmup_steps": self.plan.warmup_steps,
                "plan.steps_per_epoch": round(self.plan.steps_per_epoch, 4),
            },
            {"trainer.run_id": self.run_id, "trainer.config_hash": self.config_hash},
        )

    def initialize_engine(self, model: Any) -> None:
        """The DeepSpeed engine around `model` (trainable parameters only in the optimizer) at step 0."""
        import deepspeed

        cfg = self.cfg
        groups = param_groups(model.named_parameters(), cfg.optim.weight_decay)
        optimizer = None if uses_ds_optimizer(self.ds_config) else optimizer_factory(cfg.optim, fused=self._on_gpu())
        config = self.ds_config
        if self.resumed_from_world_size:  # the resume reads the checkpoint's universal conversion
            config = {**config, "checkpoint": {**config.get("checkpoint", {}), "load_universal": True}}
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            optimizer=optimizer,
            lr_scheduler=scheduler_factory(cfg.optim, self.plan),
            config=config,
        )
        self.state = RunState()

    def _on_gpu(self) -> bool:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().device_name() != "cpu"

    def _build_model(self, deepspeed: Any) -> Any:
        if self.stage == 3 and self.task.partition_at_init:
            # zero.Init patches tensor constructors; modules imported inside it (torch._dynamo's
            # polyfills, lazily imported model classes) fail their import-time checks. Import first.
            import torch._dynamo  # noqa: F401

            self.task.import_model_classes()
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                return self.task.build_model()
        return self.task.build_model()

    # ------------------------------------------------------------------------------ checkpoints
    def _metadata(self, step: int, reason: str) -> dict:
        """The metadata of a checkpoint whose state is captured now (committed once it is on disk)."""
        s, plan = self.state, self.plan
        assert plan is not None
        pos = self.task.data_position(step)
        return {
            "step": step,
            "tag": tag_for(step),
            "reason": reason,
            "epoch": round(plan.epoch_of(step), 6),
            "tokens_seen": pos.get("tokens_seen"),
            "loss": s.last_loss,
            "best_loss": s.best_loss,
            "best_step": s.best_step,
            "val_loss": s.val_at(step),
            "best_val_loss": s.best_val_loss,
            "best_val_step": s.best_val_step,
            "best_metric": plan.best_metric,
            "validation_metrics": s.validation_metrics(step, plan.best_metric),
            "loss_history": [list(p) for p in s.loss_history],  # copies: the loop appends while the files are written
            "lr_history": [list(p) for p in s.lr_history],
            "val_history": [list(p) for p in s.val_history],
            "plan": plan.as_dict(),
            "data_position": pos,
            "run_id": self.run_id,
            "task": self.cfg.task,
            "mlflow_run_id": self.mlflow_run_id,
            "model": model_identity(self.cfg),
            "config": public_config_dict(self.cfg),
            "config_hash": self.config_hash,
            "branched_from": self.branched_from,
            "world_size": self.ranks.world_size,
            "resumed_from_world_size": self.resumed_from_world_size,
            "global_batch_size": self.cfg.train.global_batch_size,
            "grad_accum": self.cfg.train.grad_accum,
            "zero_stage": self.stage,
            "captured_at": utc_now(),
            "system": system_info(self.cfg.train.precision, self.ranks.world_size, self.stage),
        }

    def _side_files(self) -> dict[str, str]:
        return {"config.yaml": config_to_yaml(self.cfg), "ds_config.json": json.dumps(self.ds_config, indent=2) + "\n"}

    def _on_commit(self, tag: str, meta: dict) -> None:
        """Rank 0, after a commit: the curves to MLflow (on its thread), status.json, the ledger."""
        assert self.report is not None
        self.report.committed(tag, curve_of(self.run_id, self.state))
        self.goodput.flush()

    def _stop_deadline(self) -> float:
        """The monotonic time by which a stopped job must have left. Collective: the clock starts at the
        earliest signal any rank received."""
        elapsed = dist.all_reduce_max([self.stop.elapsed()])[0]
        return time.monotonic() + self.cfg.preemption.grace_s - elapsed

    # ------------------------------------------------------------------------------------- loop
    def train(self) -> int:
        cfg, s, plan = self.cfg, self.state, self.plan
        assert self.ckpt is not None and plan is not None
        self.ckpt.requeue_unfinished_uploads()  # (here, not in setup: a stop while starting leaves with os._exit)
        tokens_per_step = self.tokens_per_step()
        window = LossWindow()
        start_step, t_start = s.step, time.perf_counter()
        log.info("training steps %d -> %d (%s tokens per step)", s.step, plan.max_steps, f"{tokens_per_step:,}")
        if self.evaluator is not None and not s.val_history and s.step == 0 and cfg.eval.at_start:
            self._evaluate()
            window.restart_clock()
        elif self.evaluator is not None and s.step > 0 and plan.eval_due(s.step) and s.val_at(s.step) is None:
            self._evaluate()  # a stop on an evaluation step saves before evaluating: the evaluation it skipped
            window.restart_clock()
        self.clock.switch("productive")
        stopped = False
        while s.step < plan.max_steps:
            lr = self.engine.get_lr()[0]
            completed = self.train_step(window, check_stop=True) is not None
            last = s.step == plan.max_steps
            # one small all-reduce per step: any rank's stop request, and every rank's background write
            stop_any, write_state = dist.all_reduce_max([float(self.stop.is_set()), self.ckpt.write_state()])
            self.ckpt.poll(write_state)
            stopped = bool(stop_any) and not (completed and last)  # a stop on the last step is just the end
            if stopped:
                self._stop_here(window, lr, tokens_per_step, completed)
                break
            if s.step == start_step + 1:
                self.ckpt.prepare(s.step)  # the host buffers of the first background save, filled in a thread
            save, evaluate = last or self.ckpt.due(s.step), plan.eval_due(s.step)
            if save or evaluate or s.step % cfg.train.log_every == 0:
                self._log_window(window, lr, tokens_per_step)
            best = evaluate and self._evaluate()
            if save:
                if last:
                    self.ckpt.wait()  # the write in flight first: checkpoints commit in step order
                self.ckpt.maybe_save(s.step, "final" if last else "scheduled")
            elif best and cfg.checkpoint.save_best:
                self.ckpt.maybe_save(s.step, "best")
            window.restart_clock()
        self.clock.switch("exit")
        self.ckpt.wait(self.stop_deadline)
        self.ckpt.drain(stopped, self.stop_deadline, self.stop)
        if stopped:
            dist.barrier()  # leave together: the launcher terminates the others when one rank exits non-zero
        self._finish(start_step, time.perf_counter() - t_start, tokens_per_step, stopped)
        return EXIT_PREEMPTED if stopped else EXIT_OK

    def _evaluate(self) -> bool:
        """A collective evaluation at the current step; True if its loss is the best so far."""
        assert self.evaluator is not None and self.report is not None and self.plan is not None
        s = self.state
        with self.clock.phase_of("eval"):
            result = self.evaluator.run(s.step)
        self._last_eval_s = result.seconds
        improved = s.record_val(result)
        self.report.val_point(
            result, improved, (s.best_val_loss, s.best_val_step), s.validation_metrics(s.step, self.plan.best_metric)
        )
        return improved and self.plan.best_metric == "val_loss"

    def _stop_here(self, window: LossWindow, lr: float, tokens_per_step: int, completed: bool) -> None:
        """All ranks agreed to stop at this step (or between its micro-batches: the state of the last complete
        step). Finish the write in flight if the deadline allows, then an emergency save if it fits."""
        assert self.ckpt is not None and self.report is not None
        s = self.state
        self.clock.switch("exit")
        self.stop_deadline = self._stop_deadline()
        reserve = self.cfg.preemption.exit_reserve_s
        if self.ckpt.pending is not None:
            need = self.ckpt.in_flight_remaining_s()
            log.info(
                "stop: the write of %s has %s to go; waiting for it until %.1f s before the deadline",
                self.ckpt.pending.tag,
                f"~{need:.1f} s" if need < 1e8 else "an unknown time",
                reserve,
            )
            self.ckpt.wait(self.stop_deadline - reserve)
        saved = self.ckpt.last_saved_step == s.step
        if completed and not saved and self._evaluation_due_here() and self._evaluation_fits():
            self._evaluate()  # a stop on an evaluation step: its checkpoint holds its validation loss, as without one
        if not saved and self.ckpt.pending is None and self.ckpt.save_fits(s.step, self.stop_deadline):
            self._log_window(window, lr, tokens_per_step)
            self.ckpt.maybe_save(s.step, "preemption", rng=None if completed else self.boundary_rng)
            saved = True
        where = "" if completed else " (between micro-batches: the state of the last complete step)"
        log.warning(
            "stop requested (%s): stopped at step %d%s%s",
            self.stop.signal_name,
            s.step,
            where,
            " after saving" if saved else "",
        )
        self.report.stopping(s.step, self.stop.signal_name)

    def _evaluation_due_here(self) -> bool:
        """Is the step the ranks stopped on an evaluation step not evaluated yet? (The same on every rank.)"""
        assert self.plan is not None
        s = self.state
        return self.evaluator is not None and self.plan.eval_due(s.step) and s.val_at(s.step) is None

    def _evaluation_fits(self) -> bool:
        """Do an evaluation (as long as this job's last one) and the emergency save both fit before the deadline?
        Collective: rank 0's answer. Either unknown (no evaluation or no save yet in this process): no. The save
        matters more than the evaluation, which the resume then runs instead."""
        assert self.ckpt is not None and self.stop_deadline is not None
        known = [self._last_eval_s, self.ckpt.emergency_save_s()]
        eval_s, save_s = dist.all_reduce_max([s if s is not None else float("inf") for s in known])
        left = self.stop_deadline - time.monotonic() - self.cfg.preemption.exit_reserve_s
        fits = bool(dist.broadcast_object(left >= 1.2 * (eval_s + save_s)))
        step = self.state.step
        if fits:
            log.info("stop on evaluation step %d: evaluating first (~%.1f s), then saving", step, eval_s)
        elif math.isinf(eval_s + save_s):
            log.info("stop on evaluation step %d: saving without evaluating (no save or evaluation timed yet)", step)
        else:
            log.info(
                "stop on evaluation step %d: an evaluation (~%.1f s) and a save (~%.1f s) do not fit the %.1f s left:"
                " saving without (the resume evaluates it)",
                step,
                eval_s,
                save_s,
                left,
            )
        return fits

    def tokens_per_step(self) -> int:
        """Tokens all ranks process together in one optimizer step."""
        return self.task.tokens_per_micro_batch() * self.cfg.train.grad_accum * self.ranks.world_size

    def train_step(self, window: Optional["LossWindow"] = None, check_stop: bool = False) -> Any:
        """One optimizer step: `grad_accum` micro-batches, forward, backward, DeepSpeed step. Returns the last
        micro-batch's loss; None if the ranks agreed to stop between two micro-batches (the step is not taken)."""
        s, eng, ga = self.state, self.engine, self.cfg.train.grad_accum
        between = check_stop and ga > 1 and self.cfg.preemption.check_micro_batches
        if between:
            self.boundary_rng = capture_rng()
        losses = []
        for micro in range(ga):
            if between and micro and dist.any_rank(self.stop.is_set()):
                return None
            loss = self.task.loss(eng, self.task.batch(s.step, micro, eng.device))
            eng.backward(loss)
            eng.step()
            losses.append(loss)
        s.step += 1
        if window is not None:
            for x in losses:
                window.add(x)
            window.steps += 1
        return losses[-1]

    def _log_window(self, window: LossWindow, lr: float, tokens_per_step: int) -> None:
        assert self.report is not None
        loss, steps, elapsed = window.close()
        if steps == 0:
            return
        s = self.state
        s.record(s.step, loss, lr)
        step_time = elapsed / steps
        tps = tokens_per_step / step_time
        grad_norm = self.engine.get_global_grad_norm()
        point = {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "step_time_s": step_time,
            "tokens_per_s": tps,
            "mfu": mfu(tps / self.ranks.world_size, self.flops_per_token, self.peak),
        }
        self.report.train_point(s.step, point, self.goodput.record(), (s.best_loss, s.best_step))
        self.goodput.flush()
        if s.step >= 2:  # the first step is a warm-up
            self._check_grace(step_time)

    def _check_grace(self, step_time: float) -> None:
        """Can a stop signal be honoured inside the grace period? Said once (again once a save is measured)."""
        for kind, line in grace_problems(self.cfg, step_time, self.ckpt.emergency_save_s() if self.ckpt else None):
            if kind not in self._grace_warned:
                self._grace_warned.add(kind)
                log.warning(line)

    def _finish(self, start_step: int, elapsed: float, tokens_per_step: int, stopped: bool) -> None:
        assert self.ckpt is not None and self.report is not None
        if not self.ranks.is_main:
            return
        s = self.state
        committed = self.store.committed()
        self.report.finish(
            s,
            s.step - start_step,
            elapsed,
            tokens_per_step,
            stopped,
            self.stop,
            self.goodput.record(),
            self.ckpt.last_saved_step == s.step,
            self.ckpt,
            committed[-1].tag if committed else "none",
            self.store.root,
            self._log_export,
        )
        self.goodput.flush()

    def _log_export(self) -> None:
        """tracking.log_export: the final checkpoint exported (`trainer export`) and logged as the artifact `model/`."""
        from trainer.tasks import export_checkpoint

        assert self.report is not None
        final, out = self.store.path(tag_for(self.state.step)), self.run_root / "export"
        if not is_committed(final):
            log.warning("tracking.log_export: no final checkpoint %s to export", final.name)
            return
        t0 = time.perf_counter()
        try:
            if out.exists():
                import shutil

                shutil.rmtree(out)
            _, files = export_checkpoint(final, out, self.task)
        except Exception as exc:  # the run itself succeeded: say so, and keep its exit code
            log.warning(
                "tracking.log_export: exporting %s failed (%s: %s); `trainer export` can retry it",
                final.name,
                type(exc).__name__,
                str(exc)[:300],
            )
            return
        self.report.tracker.log_artifacts(out, "model")
        log.info(
            "exported %s to %s (%s) in %.1f s and logged it to MLflow as model/",
            final.name,
            out,
            ", ".join(files),
            time.perf_counter() - t0,
        )

    def fail(self) -> None:
        """Mark the tracking run FAILED (called on an exception)."""
        if self.report is not None:
            self.report.fail()
