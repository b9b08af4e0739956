"""Where a run's numbers go: one `Reporter` per process, doing its work on rank 0.

The loop measures (train windows, evaluations, checkpoints, the stop) and hands the numbers here;
the reporter writes the console line, MLflow metrics (batched on the tracker's thread), TensorBoard
events (`tracking.tensorboard`), `<run>/status.json` for `trainer monitor`, the curves PNG and the
summary at the end. Every metric set carries the step and the fractional epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from trainer.checkpoint.layout import tag_for
from trainer.config.load import flatten, public_config_dict
from trainer.config.plan import Plan
from trainer.config.schema import RunConfig
from trainer.engine.evaluate import EvalResult
from trainer.engine.goodput import describe
from trainer.log import get_logger, redact
from trainer.ranks import RankInfo
from trainer.runstatus import JobState, StatusWriter
from trainer.tracking.mlflow_tracker import NullTracker, make_tracker
from trainer.tracking.plots import Curve, save_curves
from trainer.tracking.tensorboard import make_tensorboard

log = get_logger("engine")


class Reporter:
    def __init__(self, cfg: RunConfig, ranks: RankInfo, plan: Plan):
        self.cfg, self.ranks, self.plan = cfg, ranks, plan
        self.tracker: Any = NullTracker()
        self.tensorboard: Any = None
        self.status: Optional[StatusWriter] = None
        self.run_id = ""
        self.run_root: Optional[Path] = None

    @property
    def active(self) -> bool:
        return self.ranks.is_main

    # ----------------------------------------------------------------------------------- start
    def open(self, run_root: Path, run_id: str, step: int) -> None:
        """Rank 0: status.json, from the first moment the run has a folder."""
        self.run_root, self.run_id = run_root, run_id
        if self.active:
            self.status = StatusWriter(
                run_root,
                run_id=run_id,
                task=self.cfg.task,
                world_size=self.ranks.world_size,
                max_steps=self.plan.max_steps,
                log_every=self.cfg.train.log_every,
                epochs=self.plan.epochs,
                steps_per_epoch=round(self.plan.steps_per_epoch, 4),
            )
            self.status.update(state=JobState.RUNNING, step=step, epoch=round(self.plan.epoch_of(step), 4))

    def start_tracking(self, meta: Optional[dict], params: dict[str, Any], tags: dict[str, str]) -> Optional[str]:
        """Rank 0: the MLflow run (continued on a resume) with params, tags and the config; TensorBoard. Returns the
        MLflow run id."""
        assert self.run_root is not None
        cfg = self.cfg
        self.tracker = make_tracker(
            cfg.tracking,
            Path(cfg.run_dir),
            cfg.tracking.experiment or cfg.task,
            f"{cfg.task}_{self.run_id}",
            (meta or {}).get("mlflow_run_id"),
        )
        self.tracker.log_params({**flatten(public_config_dict(cfg)), **params})
        self.tracker.set_tags(tags)
        self.tracker.log_artifact(self.run_root / "config.yaml", "config")
        self.tensorboard = make_tensorboard(cfg.tracking.tensorboard, self.run_root, (meta or {}).get("step"))
        return getattr(self.tracker, "run_id", None)

    # -------------------------------------------------------------------------------- progress
    def metrics(self, metrics: dict[str, Any], step: int) -> None:
        """One metric set at `step`: MLflow and TensorBoard, with the fractional epoch."""
        if not self.active:
            return
        metrics = {**metrics, "train/epoch": self.plan.epoch_of(step)}
        self.tracker.log_metrics(metrics, step)
        if self.tensorboard is not None:
            self.tensorboard.log_metrics(metrics, step)

    def train_point(self, step: int, p: dict[str, Any], good: dict, best: tuple) -> None:
        """A log point: `p` has loss, lr, grad_norm, step_time_s, tokens_per_s, mfu."""
        if not self.active:
            return
        self.metrics(
            {
                "train/loss": p["loss"],
                "train/lr": p["lr"],
                "train/grad_norm": p["grad_norm"],
                "perf/step_time_s": p["step_time_s"],
                "perf/tokens_per_s": p["tokens_per_s"],
                "perf/mfu": p["mfu"],
                "goodput/ratio": good["goodput"],
                **{f"goodput/{k}_s": v for k, v in good["seconds"].items()},
            },
            step,
        )
        self.update_status(
            step=step,
            epoch=round(self.plan.epoch_of(step), 4),
            **p,
            best_loss=best[0],
            best_step=best[1],
            eta_s=(self.plan.max_steps - step) * p["step_time_s"],
            goodput=good,
        )
        grad = p["grad_norm"]
        log.info(
            "step %d/%d epoch %.2f loss %.4f lr %.3e grad_norm %s step %.3fs %s tok/s%s",
            step,
            self.plan.max_steps,
            self.plan.epoch_of(step),
            p["loss"],
            p["lr"],
            f"{grad:.3f}" if grad is not None else "n/a",
            p["step_time_s"],
            f"{p['tokens_per_s']:,.0f}",
            f" mfu {p['mfu']:.1%}" if p["mfu"] is not None else "",
        )

    def val_point(self, r: EvalResult, improved: bool, best: tuple, metrics: dict) -> None:
        if not self.active:
            return
        self.metrics(
            {"val/loss": r.loss, "val/ppl": r.perplexity, "val/best_loss": best[0], "perf/eval_s": r.seconds}, r.step
        )
        self.update_status(
            val_loss=r.loss,
            val_ppl=r.perplexity,
            val_step=r.step,
            best_val_loss=best[0],
            best_val_step=best[1],
            validation_metrics=metrics,
        )
        ppl = f" ppl {r.perplexity:.3f}" if r.perplexity is not None else ""
        mark = " (new best)" if improved else f" (best {best[0]:.4f} at step {best[1]})" if best[0] is not None else ""
        log.info(
            "eval step %d/%d epoch %.2f val_loss %.4f%s%s over %s tokens of %d samples in %.2fs",
            r.step,
            self.plan.max_steps,
            self.plan.epoch_of(r.step),
            r.loss,
            ppl,
            mark,
            f"{r.tokens:,}",
            r.samples,
            r.seconds,
        )

    def update_status(self, **fields: Any) -> None:
        if self.status is not None:
            self.status.update(**fields)

    def committed(self, tag: str, curve: Curve) -> None:
        """After a commit: the curves to MLflow (on its thread) and status.json."""
        if not self.active:
            return
        self.tracker.log_curves_later([curve], f"run {self.run_id}")
        self.update_status(last_checkpoint=tag)

    def stopping(self, step: int, signal_name: Optional[str]) -> None:
        self.update_status(state=JobState.STOPPING, step=step, stop_signal=signal_name, eta_s=None)

    # ------------------------------------------------------------------------------------- end
    def finish(
        self,
        s: Any,
        steps: int,
        elapsed: float,
        tokens_per_step: int,
        stopped: bool,
        stop: Any,
        good: dict,
        saved_stop_step: bool,
        ckpt: Any,
        newest: str,
        store_root: Path,
        export: Any,
    ) -> None:
        """Rank 0: the curves, MLflow's end (tags, KILLED/FINISHED), status.json and the summary lines."""
        if not self.active:
            return
        assert self.run_root is not None
        plot = None
        if s.loss_history or s.val_history:
            plot = save_curves([curve_of(self.run_id, s)], self.run_root / "curves.png", f"run {self.run_id}")
            self.tracker.log_artifact(plot, "plots")
        if stopped:
            self.tracker.set_tags(
                {
                    "trainer.stopped_at_step": s.step,
                    "trainer.stopped_by": stop.signal_name or "",
                    "trainer.emergency_checkpoint": tag_for(s.step) if saved_stop_step else "skipped",
                }
            )
        elif self.cfg.tracking.exports(self.cfg.task) and getattr(self.tracker, "run_id", None):
            export()
        self.tracker.log_metrics(
            {"goodput/ratio": good["goodput"], **{f"goodput/{k}_s": v for k, v in good["seconds"].items()}}, s.step
        )
        if s.best_val_loss is not None:
            self.tracker.log_metrics({"val/best_loss": s.best_val_loss, "val/best_step": s.best_val_step}, s.step)
        self.tracker.finish("KILLED" if stopped else "FINISHED")
        if self.tensorboard is not None:
            self.tensorboard.finish()
        self.update_status(
            state=JobState.STOPPED if stopped else JobState.FINISHED,
            stop_signal=stop.signal_name if stopped else None,
            eta_s=None,
            goodput=good,
        )
        tps = steps * tokens_per_step / elapsed if elapsed > 0 else 0.0
        first = s.loss_history[0][1] if s.loss_history else float("nan")
        if ckpt.blocked_s:
            log.info(
                "saves blocked training %.1f s in all (%.1f s of it waiting for a previous write)",
                ckpt.blocked_s,
                ckpt.stall_s,
            )
        log.info("%s", describe(good))
        log.info(
            "%s: %d steps in %.1f s (epoch %.2f), loss %.4f -> %.4f (best %.4f at step %s), %s tokens/s",
            "stopped" if stopped else "done",
            steps,
            elapsed,
            self.plan.epoch_of(s.step),
            first,
            s.last_loss or float("nan"),
            s.best_loss or float("nan"),
            s.best_step,
            f"{tps:,.0f}",
        )
        if s.val_history:
            log.info(
                "validation: val_loss %.4f at step %d, best %.4f at step %d (%d evaluations)",
                s.val_history[-1][1],
                s.val_history[-1][0],
                s.best_val_loss,
                s.best_val_step,
                len(s.val_history),
            )
        log.info("checkpoints: %s (newest %s; best by %s)", store_root, newest, self.plan.best_metric)
        if getattr(self.tracker, "run_id", None):
            log.info("MLflow: run %s in %s", self.tracker.run_id, redact(self.tracker.uri))
        if self.tensorboard is not None:
            log.info("TensorBoard: tensorboard --logdir %s", self.tensorboard.dir)
        if plot:
            log.info("curves: %s", plot)

    def fail(self) -> None:
        """Mark the tracking run FAILED (called on an exception)."""
        self.tracker.finish("FAILED")
        if self.tensorboard is not None:
            self.tensorboard.finish()
        self.update_status(state=JobState.FAILED, eta_s=None)


def curve_of(run_id: str, s: Any) -> Curve:
    """A run's loss, LR and validation history so far (copies: a background thread may plot them)."""
    return Curve(
        run_id[:8], [list(p) for p in s.loss_history], [list(p) for p in s.lr_history], [list(p) for p in s.val_history]
    )
