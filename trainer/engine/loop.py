"""The training loop around a DeepSpeed engine. It runs any `Task` and knows no model or dataset."""
from __future__ import annotations

import collections
import datetime as dt
import json
import math
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from trainer.checkpoint.store import Checkpoint, CheckpointStore, is_committed, read_metadata, resolve_resume, tag_for
from trainer.config.deepspeed import render_ds_config, uses_ds_optimizer, zero_stage
from trainer.config.load import config_hash, config_to_yaml, flatten, model_identity, public_config_dict
from trainer.config.schema import RunConfig
from trainer.engine import dist
from trainer.engine.metrics import accelerator_name, mfu, peak_flops, system_info
from trainer.engine.optim import optimizer_factory, param_groups, reapply_schedule, scheduler_factory
from trainer.engine.signals import StopFlag, watch_launchers
from trainer.errors import EXIT_OK, EXIT_PREEMPTED, UserError
from trainer.tasks.base import Task
from trainer.log import add_log_file, get_logger, redact
from trainer.ranks import rank_info
from trainer.tracking.mlflow_tracker import make_tracker
from trainer.tracking.plots import Curve, save_curves
from trainer.runstatus import FAILED, FINISHED, RUNNING, STOPPED, StatusWriter
from trainer.storage import open_storage
from trainer.upload.restore import restore, restore_newest
from trainer.upload.uploader import MANIFEST, NodeInfo, is_uploaded, make_uploader, remote_prefix
from trainer.upload.uploader import read_state as read_upload_state

log = get_logger("engine")


def new_run_id() -> str:
    return f"{uuid.uuid4().hex}_{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunState:
    """What the loop carries from step to step and into every checkpoint's metadata."""

    step: int = 0
    loss_history: list[list[float]] = field(default_factory=list)
    lr_history: list[list[float]] = field(default_factory=list)
    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    last_loss: Optional[float] = None
    last_saved_step: Optional[int] = None

    def record(self, step: int, loss: float, lr: float) -> None:
        self.loss_history.append([step, loss])
        self.lr_history.append([step, lr])
        self.last_loss = loss
        if math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss):
            self.best_loss, self.best_step = loss, step

    @classmethod
    def from_metadata(cls, meta: dict) -> "RunState":
        return cls(
            step=int(meta["step"]),
            loss_history=list(meta.get("loss_history", [])),
            lr_history=list(meta.get("lr_history", [])),
            best_loss=meta.get("best_loss"),
            best_step=meta.get("best_step"),
            last_loss=meta.get("loss"),
            last_saved_step=int(meta["step"]),
        )


class LossWindow:
    """Sums losses on the device between log points; one all-reduce turns them into a global mean."""

    def __init__(self) -> None:
        self.total: Any = 0.0
        self.count = 0
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, loss: Any) -> None:
        self.total = self.total + loss.detach().float()
        self.count += 1

    def close(self) -> tuple[float, int, float]:
        """(global mean loss, steps in window, seconds) and start a new window. Collective."""
        local = float(self.total) if self.count else 0.0
        total, count = dist.all_reduce_sum([local, float(self.count)])
        elapsed = time.perf_counter() - self.started
        steps = self.steps
        self.__init__()
        return (total / count if count else float("nan")), steps, elapsed


class Trainer:
    def __init__(self, cfg: RunConfig, task: Task, source: str = "config"):
        self.cfg = cfg
        self.task = task
        self.source = source
        self.ranks = rank_info()
        self.stop = StopFlag()
        self.tracker: Any = None
        self.engine: Any = None
        self.uploader: Any = None
        self.save_seconds: collections.deque[float] = collections.deque(maxlen=3)  # the recent saves, for the grace budget
        self.stop_deadline: Optional[float] = None  # monotonic time by which a stopped job must have left
        self.status: Optional[StatusWriter] = None  # rank 0: <run>/status.json for `trainer monitor`

    # ----------------------------------------------------------------------------------- setup
    def _decide_run(self) -> dict:
        """On rank 0: which checkpoint to resume (if any) and the run id. Shared with all ranks."""
        model = model_identity(self.cfg)
        ckpt = resolve_resume(self.cfg.run_dir, self.cfg.checkpoint.resume, task=self.cfg.task, model=model)
        restored = None
        if ckpt is None and self.cfg.checkpoint.resume == "auto" and self.cfg.upload.url:
            log.info("no local checkpoint: looking for the newest complete one in %s", redact(self.cfg.upload.url))
            path = restore_newest(open_storage(self.cfg.upload.url), self.cfg.run_dir, self.cfg.task, model)
            if path is not None:
                ckpt, restored = Checkpoint(path, read_metadata(path)), remote_prefix(read_metadata(path))
        if ckpt is None:
            return {"run_id": self.cfg.run_id or new_run_id(), "resume": None, "metadata": None}
        ckpt.check_resumable(str(self.cfg.checkpoint.resume), self.ranks.world_size, self.cfg.task, self.cfg.train.max_steps, model)
        meta = dict(ckpt.metadata)
        newer = [c.tag for c in CheckpointStore(ckpt.path.parent.parent).committed() if c.step > ckpt.step]
        if newer:  # never overwrite the later checkpoints of that run: continue as a new run
            run_id = new_run_id()
            log.warning("resuming from %s, which has newer checkpoints (%s): continuing as a new run %s", ckpt.tag,
                        ", ".join(newer), run_id)
            meta["mlflow_run_id"] = None
            return {"run_id": run_id, "resume": str(ckpt.path), "metadata": meta, "branched_from": str(ckpt.path)}
        return {"run_id": ckpt.run_id, "resume": str(ckpt.path), "metadata": meta, "restored": restored}

    def _restore_on_this_node(self, decision: dict) -> None:
        """Nodes without a shared filesystem: each node's first rank fetches the checkpoint rank 0 chose."""
        if decision.get("restored") and self.ranks.is_local_main and not is_committed(Path(decision["resume"])):
            storage = open_storage(self.cfg.upload.url)  # type: ignore[arg-type]
            manifest = json.loads(storage.get_bytes(f"{decision['restored']}/{MANIFEST}") or b"{}")
            restore(storage, decision["restored"], manifest, self.cfg.run_dir)
        dist.barrier()

    def setup(self) -> None:
        import deepspeed

        self.stop.install()  # from here on a signal stops the job at the next step boundary
        watch_launchers(self.stop)  # ... and so does the loss of the launcher (its runner forwards no signal)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        dist.init_distributed()
        cfg, r = self.cfg, self.ranks
        self.ds_config = render_ds_config(cfg, r.world_size, self.task.model_hints().get("hidden_size"), self.source)
        self.stage = zero_stage(self.ds_config)
        dist.agree(self.task.prepare_data, run_here=r.is_local_main)
        dist.on_main_then_share(self.task.preflight, r)
        if cfg.upload.url:
            dist.on_main_then_share(lambda: open_storage(cfg.upload.url).check(), r)
        decision = dist.on_main_then_share(self._decide_run, r)
        self._restore_on_this_node(decision)
        self.run_id = decision["run_id"]
        self.branched_from = decision.get("branched_from")
        self.run_root = Path(cfg.run_dir) / self.run_id
        self.store = CheckpointStore(self.run_root)
        if r.is_local_main:
            self.store.remove_partials()  # this run's only: another job may be saving in its own run folder
            self.run_root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if r.is_main:
            add_log_file(self.run_root / "train.log", r.rank)
            (self.run_root / "config.yaml").write_text(config_to_yaml(cfg))
            self.status = StatusWriter(self.run_root, run_id=self.run_id, task=cfg.task, world_size=r.world_size,
                                       max_steps=cfg.train.max_steps, log_every=cfg.train.log_every)
            self.status.update(state=RUNNING, step=(decision["metadata"] or {}).get("step", 0))
        self.config_hash = config_hash(cfg)
        log.info("run %s: %d rank(s), ZeRO stage %d, %s, config %s (hash %s)", self.run_id, r.world_size, self.stage,
                 cfg.train.precision, self.source, self.config_hash)

        model = self._build_model(deepspeed)
        for line in self.task.describe_model(model):
            log.info(line)
        self.initialize_engine(model)
        meta = decision["metadata"]
        if decision["resume"]:
            self._load(Path(decision["resume"]), meta)
        self.task.setup_data(r, cfg.train.micro_batch_size, cfg.train.grad_accum)
        if r.is_main:
            self.tracker = make_tracker(cfg.tracking, Path(cfg.run_dir), cfg.tracking.experiment or cfg.task, self.run_id,
                                        (meta or {}).get("mlflow_run_id"))
            self.tracker.log_params({**flatten(public_config_dict(cfg)), "world_size": r.world_size, "zero_stage": self.stage})
            self.tracker.set_tags({"trainer.run_id": self.run_id, "trainer.config_hash": self.config_hash})
            self.tracker.log_artifact(self.run_root / "config.yaml", "config")
        self.mlflow_run_id = dist.broadcast_object(getattr(self.tracker, "run_id", None))
        if cfg.upload.url and r.is_local_main:
            node = NodeInfo(r.rank // r.local_world_size, max(1, r.world_size // r.local_world_size), r.local_world_size)
            self.uploader = make_uploader(cfg.upload, node)
            for c in self.store.committed():  # uploads a hard stop cut short (or that failed) go first
                if not is_uploaded(c.path):
                    log.info("%s was never uploaded completely: queued again", c.tag)
                    self.uploader.submit(c.path)
        self.flops_per_token = self.task.flops_per_token(model)
        self.peak = peak_flops(accelerator_name()) if self._on_gpu() else None

    def initialize_engine(self, model: Any) -> None:
        """The DeepSpeed engine around `model` (trainable parameters only in the optimizer) at step 0."""
        import deepspeed

        cfg = self.cfg
        groups = param_groups(model.named_parameters(), cfg.optim.weight_decay)
        optimizer = None if uses_ds_optimizer(self.ds_config) else optimizer_factory(cfg.optim, fused=self._on_gpu())
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer,
            lr_scheduler=scheduler_factory(cfg.optim, cfg.train.max_steps), config=self.ds_config,
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
    def _rng_file(self, ckpt_dir: Path) -> Path:
        return ckpt_dir / f"rng_state_rank{self.ranks.rank:05d}.pt"

    def _save(self, reason: str) -> Path:
        import numpy as np
        import torch

        step, tag = self.state.step, tag_for(self.state.step)
        t0 = time.perf_counter()
        self.engine.save_checkpoint(str(self.store.root), tag=tag, client_state={"trainer_step": step}, save_latest=False,
                                    exclude_frozen_parameters=not self.task.save_frozen)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, self._rng_file(self.store.path(tag)))
        extra = self.task.on_save(self.engine.module, self.store.path(tag), self.ranks.is_main, reason == "final")
        dist.barrier()  # every rank's files are on disk before anyone commits
        if self.ranks.is_local_main:
            self.store.commit(tag, {**self._metadata(reason), **extra}, {
                "config.yaml": config_to_yaml(self.cfg),
                "ds_config.json": json.dumps(self.ds_config, indent=2) + "\n",
            })
            if self.uploader is not None:
                self.uploader.submit(self.store.path(tag))
            self._retention()
        if self.ranks.is_main and self.tracker is not None:
            self.tracker.log_curves_later([self._curve()], f"run {self.run_id}")
        self._status(last_checkpoint=tag)
        dist.barrier()
        self.state.last_saved_step = step
        self.save_seconds.append(time.perf_counter() - t0)
        log.info("saved checkpoint %s (%s) in %.1f s", self.store.path(tag), reason, self.save_seconds[-1])
        return self.store.path(tag)

    def _emergency_save_fits(self) -> bool:
        """At the agreed stop step: does a save fit in what is left of the grace period? Collective.

        The clock starts at the earliest signal any rank received; a save is expected to take as
        long as the slowest of the recent ones (unknown before the first: then it is tried).
        """
        p = self.cfg.preemption
        elapsed = dist.all_reduce_max([self.stop.elapsed()])[0]
        self.stop_deadline = time.monotonic() + p.grace_s - elapsed
        left = self.stop_deadline - time.monotonic() - p.exit_reserve_s
        need = max(self.save_seconds, default=0.0)
        fits = bool(dist.broadcast_object(left >= 1.2 * need))
        if not fits:
            last = f"step {self.state.last_saved_step}" if self.state.last_saved_step is not None else "none"
            log.warning("not saving at step %d: %.1f s of the %.0f s grace left, a save takes ~%.1f s (newest committed"
                        " checkpoint: %s)", self.state.step, left, p.grace_s, need, last)
        return fits

    def _retention(self) -> None:
        self.store.retention(self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_best,
                             deletable=is_uploaded if self.uploader is not None else None)

    def _drain_uploads(self, stopped: bool) -> None:
        """Wait for queued uploads (bounded), then report where every checkpoint is."""
        if self.uploader is None:
            return
        p = self.cfg.preemption
        if stopped:
            self.uploader.prioritize_newest()
            assert self.stop_deadline is not None
            timeout = max(0.0, self.stop_deadline - time.monotonic() - p.exit_reserve_s)
        else:
            timeout = self.cfg.upload.drain_timeout_s
        waiting = self.uploader.pending()
        if waiting:
            log.info("waiting up to %.0f s for %d checkpoint upload(s): %s", timeout, len(waiting), ", ".join(x.name for x in waiting))

        def give_up() -> bool:  # a second signal; or a first one during the final drain, once its grace is spent
            return self.stop.urgent or (self.stop.is_set() and self.stop.elapsed() > p.grace_s - p.exit_reserve_s)

        if not self.uploader.close(timeout, abort=give_up):
            log.warning("stopped waiting for uploads: %s", "a second signal" if self.stop.urgent else "the time is up")
        self._retention()
        for c in self.store.committed():
            st = read_upload_state(c.path)
            if st["state"] == "uploaded":
                log.info("checkpoint %s: uploaded (%s)", c.tag, st.get("url", ""))
                continue
            what = {"failed": "upload interrupted" if str(st.get("error", "")).startswith("interrupted") else "upload FAILED",
                    "local": "not uploaded"}.get(st["state"], st["state"])
            log.warning("checkpoint %s: %s, still local (%s)", c.tag, what, c.path)

    def _metadata(self, reason: str) -> dict:
        s = self.state
        pos = self.task.data_position(s.step)
        return {
            "step": s.step,
            "tag": tag_for(s.step),
            "reason": reason,
            "epoch": pos.get("epoch"),
            "tokens_seen": pos.get("tokens_seen"),
            "loss": s.last_loss,
            "best_loss": s.best_loss,
            "best_step": s.best_step,
            "loss_history": s.loss_history,
            "lr_history": s.lr_history,
            "data_position": pos,
            "run_id": self.run_id,
            "task": self.cfg.task,
            "mlflow_run_id": self.mlflow_run_id,
            "model": model_identity(self.cfg),
            "config": public_config_dict(self.cfg),
            "config_hash": self.config_hash,
            "branched_from": self.branched_from,
            "world_size": self.ranks.world_size,
            "zero_stage": self.stage,
            "committed_at": utc_now(),
            "system": system_info(self.cfg.train.precision, self.ranks.world_size, self.stage),
        }

    def _load(self, ckpt_dir: Path, meta: dict) -> None:
        import numpy as np
        import torch

        self.task.check_resume(meta)
        load_path, _ = self.engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, load_module_strict=self.task.save_frozen)
        if load_path is None:
            raise UserError(f"--resume: DeepSpeed found no loadable checkpoint in {ckpt_dir}")
        reapply_schedule(self.engine.lr_scheduler, self.cfg.optim, self.cfg.train.max_steps)
        rng_file = self._rng_file(ckpt_dir)
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        else:
            log.warning("no RNG state for rank %d in %s; continuing with fresh RNG", self.ranks.rank, ckpt_dir)
        self.state = RunState.from_metadata(meta)
        if meta.get("config_hash") != self.config_hash:
            log.warning("resuming %s saved with config hash %s; this config hashes to %s (training settings changed)",
                        ckpt_dir.name, meta.get("config_hash"), self.config_hash)
        log.info("resumed from %s at step %d (run %s)", ckpt_dir, self.state.step, self.run_id)

    # ------------------------------------------------------------------------------------- loop
    def train(self) -> int:
        cfg, s = self.cfg, self.state
        tokens_per_step = self.tokens_per_step()
        window = LossWindow()
        start_step, t_start = s.step, time.perf_counter()
        log.info("training steps %d -> %d (%s tokens per step)", s.step, cfg.train.max_steps, f"{tokens_per_step:,}")
        stopped = False
        while s.step < cfg.train.max_steps:
            lr = self.engine.get_lr()[0]
            self.train_step(window)
            last = s.step == cfg.train.max_steps
            stopped = dist.any_rank(self.stop.is_set()) and not last  # a stop on the last step is just the end
            save = self._emergency_save_fits() if stopped else last or s.step % cfg.checkpoint.save_every == 0
            if save or s.step % cfg.train.log_every == 0:
                self._log_window(window, lr, tokens_per_step)
            if save:
                self._save("preemption" if stopped else "final" if last else "scheduled")
            if stopped:
                log.warning("stop requested (%s): stopped at step %d%s", self.stop.signal_name, s.step,
                            " after saving" if save else "")
                self._status(state="stopping", step=s.step, stop_signal=self.stop.signal_name, eta_s=None)
                break
        self._drain_uploads(stopped)
        if stopped:
            dist.barrier()  # leave together: the launcher terminates the others when one rank exits non-zero
        self._finish(start_step, time.perf_counter() - t_start, tokens_per_step, stopped)
        return EXIT_PREEMPTED if stopped else EXIT_OK

    def tokens_per_step(self) -> int:
        """Tokens all ranks process together in one optimizer step."""
        return self.task.tokens_per_micro_batch() * self.cfg.train.grad_accum * self.ranks.world_size

    def train_step(self, window: Optional["LossWindow"] = None) -> Any:
        """One optimizer step: `grad_accum` micro-batches, forward, backward, DeepSpeed step. Returns the last micro-batch's loss."""
        s, eng = self.state, self.engine
        for micro in range(self.cfg.train.grad_accum):
            loss = self.task.loss(eng, self.task.batch(s.step, micro, eng.device))
            eng.backward(loss)
            eng.step()
            if window is not None:
                window.add(loss)
        s.step += 1
        if window is not None:
            window.steps += 1
        return loss

    def _log_window(self, window: LossWindow, lr: float, tokens_per_step: int) -> None:
        loss, steps, elapsed = window.close()
        if steps == 0:
            return
        s = self.state
        s.record(s.step, loss, lr)
        step_time = elapsed / steps
        tps = tokens_per_step / step_time
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        util = mfu(tps / self.ranks.world_size, self.flops_per_token, self.peak)
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "perf/step_time_s": step_time,
                   "perf/tokens_per_s": tps, "perf/mfu": util}
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, s.step)
        self._status(step=s.step, loss=loss, lr=lr, grad_norm=grad_norm, step_time_s=step_time, tokens_per_s=tps, mfu=util,
                     best_loss=s.best_loss, best_step=s.best_step, eta_s=(self.cfg.train.max_steps - s.step) * step_time)
        log.info("step %d/%d loss %.4f lr %.3e grad_norm %s step %.3fs %s tok/s%s", s.step, self.cfg.train.max_steps, loss, lr,
                 f"{grad_norm:.3f}" if grad_norm is not None else "n/a", step_time, f"{tps:,.0f}",
                 f" mfu {util:.1%}" if util is not None else "")

    def _curve(self) -> Curve:
        """This run's loss and LR history so far (copies: a background thread may plot them)."""
        s = self.state
        return Curve(self.run_id[:8], [list(p) for p in s.loss_history], [list(p) for p in s.lr_history])

    def _status(self, **fields: Any) -> None:
        if self.status is not None:
            self.status.update(**fields)

    def _finish(self, start_step: int, elapsed: float, tokens_per_step: int, stopped: bool) -> None:
        s = self.state
        if not self.ranks.is_main:
            return
        steps = s.step - start_step
        tps = steps * tokens_per_step / elapsed if elapsed > 0 else 0.0
        first = s.loss_history[0][1] if s.loss_history else float("nan")
        plot = None
        if s.loss_history:
            plot = save_curves([self._curve()], self.run_root / "curves.png", f"run {self.run_id}")
            self.tracker.log_artifact(plot, "plots")
        if stopped:
            self.tracker.set_tags({"trainer.stopped_at_step": s.step, "trainer.stopped_by": self.stop.signal_name or "",
                                   "trainer.emergency_checkpoint": tag_for(s.step) if s.last_saved_step == s.step else "skipped"})
        elif self.cfg.tracking.log_export and getattr(self.tracker, "run_id", None):
            self._log_export()
        self.tracker.finish("KILLED" if stopped else "FINISHED")
        self._status(state=STOPPED if stopped else FINISHED, stop_signal=self.stop.signal_name if stopped else None, eta_s=None)
        committed = self.store.committed()
        newest = committed[-1].tag if committed else "none"
        log.info("%s: %d steps in %.1f s, loss %.4f -> %.4f (best %.4f at step %s), %s tokens/s",
                 "stopped" if stopped else "done", steps, elapsed, first, s.last_loss or float("nan"),
                 s.best_loss or float("nan"), s.best_step, f"{tps:,.0f}")
        log.info("checkpoints: %s (newest %s)", self.store.root, newest)
        if getattr(self.tracker, "run_id", None):
            log.info("MLflow: run %s in %s", self.tracker.run_id, redact(self.tracker.uri))
        if plot:
            log.info("curves: %s", plot)

    def _log_export(self) -> None:
        """tracking.log_export: the final checkpoint exported (`trainer export`) and logged as the artifact `export/`."""
        from trainer.tasks import export_checkpoint

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
            log.warning("tracking.log_export: exporting %s failed (%s: %s); `trainer export` can retry it", final.name,
                        type(exc).__name__, str(exc)[:300])
            return
        self.tracker.log_artifacts(out, "export")
        log.info("exported %s to %s (%s) in %.1f s and logged it to MLflow as export/", final.name, out, ", ".join(files),
                 time.perf_counter() - t0)

    def fail(self) -> None:
        """Mark the tracking run FAILED (called on an exception)."""
        if self.tracker is not None:
            self.tracker.finish("FAILED")
        self._status(state=FAILED, eta_s=None)
