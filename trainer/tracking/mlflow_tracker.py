"""MLflow tracking from rank 0, without slowing the training loop.

Metrics are queued and sent in batches by a background thread through `MlflowClient` with an
explicit run id (the fluent `mlflow.log_metric` from another thread would silently start a new
run). The run is ended FINISHED, FAILED or KILLED by the engine; a resumed run continues the same
MLflow run.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any, Optional

from trainer.config.schema import TrackingConfig
from trainer.log import get_logger, redact

log = get_logger("tracking")

_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


class NullTracker:
    """Tracking switched off: every call is a no-op."""

    run_id: Optional[str] = None
    uri: Optional[str] = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None: ...
    def log_artifacts(self, folder: Path, artifact_path: Optional[str] = None) -> None: ...
    def log_curves_later(self, curves: list, title: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str) -> None: ...


class MlflowTracker:
    def __init__(
        self, cfg: TrackingConfig, run_dir: Path, experiment: str, run_name: str, resume_run_id: Optional[str] = None
    ):
        from mlflow.tracking import MlflowClient

        self.uri = cfg.uri or default_tracking_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None if cfg.uri else (Path(run_dir) / "mlartifacts").resolve().as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.resumed = False
        if resume_run_id:
            try:
                self.client.get_run(resume_run_id)
                self.client.update_run(resume_run_id, status="RUNNING")
                self.run_id = resume_run_id
                self.resumed = True
            except Exception as exc:  # the store was lost with the VM: continue in a new run
                log.warning(
                    "MLflow run %s not found in %s (%s); logging to a new run",
                    resume_run_id,
                    redact(self.uri),
                    type(exc).__name__,
                )
        if not self.resumed:
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self._finished = False
        self._queue: "queue.Queue[Any]" = queue.Queue()  # metric tuples, jobs (callables), None = stop
        self._flush_every = cfg.flush_every_s
        self._thread = threading.Thread(target=self._worker, name="mlflow-logger", daemon=True)
        self._thread.start()
        log.info("MLflow run %s (%s) at %s", self.run_id, "continued" if self.resumed else "new", redact(self.uri))

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params once per MLflow run (a resumed run keeps the params it started with)."""
        if self.resumed:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self._safe(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._safe(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is not None:
                self._queue.put((key, float(value), ts, step))

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self._safe(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: Optional[str] = None) -> None:
        self._safe(self.client.log_artifacts, self.run_id, str(folder), artifact_path)

    def log_curves_later(self, curves: list, title: str) -> None:
        """Render the curves PNG and log it as `plots/curves.png`, on the background thread (the
        training thread only copies the histories)."""
        curves = list(curves)

        def job() -> None:
            import tempfile

            from trainer.tracking.plots import save_curves

            with tempfile.TemporaryDirectory(prefix="trainer-plot-") as tmp:
                self.client.log_artifact(
                    self.run_id, str(save_curves(curves, Path(tmp) / "curves.png", title)), "plots"
                )

        self._queue.put(job)

    def finish(self, status: str) -> None:
        """Flush queued metrics and end the run with FINISHED, FAILED or KILLED (once)."""
        if self._finished:
            return
        self._finished = True
        self._queue.put(None)
        self._thread.join(timeout=60)
        self._safe(self.client.set_terminated, self.run_id, status)

    def _worker(self) -> None:
        from mlflow.entities import Metric

        pending: list[tuple] = []
        last = time.monotonic()
        done = False
        while not done:
            try:
                item = self._queue.get(timeout=max(0.05, self._flush_every - (time.monotonic() - last)))
                if item is None:
                    done = True
                elif callable(item):
                    self._safe(item)
                else:
                    pending.append(item)
            except queue.Empty:
                pass
            if not pending and not done:
                last = time.monotonic()  # idle: the next batch waits a full interval
                continue
            if pending and (done or len(pending) >= _MAX_BATCH or time.monotonic() - last >= self._flush_every):
                for i in range(0, len(pending), _MAX_BATCH):
                    batch = [Metric(k, v, ts, step) for k, v, ts, step in pending[i : i + _MAX_BATCH]]
                    self._safe(self.client.log_batch, self.run_id, metrics=batch)
                pending.clear()
                last = time.monotonic()

    def _safe(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # tracking must never stop training
            log.warning("MLflow %s failed: %s", getattr(fn, "__name__", "call"), redact(str(exc))[:300])


def make_tracker(
    cfg: TrackingConfig, run_dir: Path, experiment: str, run_name: str, resume_run_id: Optional[str]
) -> "MlflowTracker | NullTracker":
    if not cfg.enabled:
        return NullTracker()
    try:
        return MlflowTracker(cfg, run_dir, experiment, run_name, resume_run_id)
    except Exception as exc:  # an unreachable server must not stop a multi-day run
        log.warning(
            "MLflow tracking is off for this run: cannot use %s (%s: %s)",
            redact(cfg.uri or str(run_dir)),
            type(exc).__name__,
            redact(str(exc))[:200],
        )
        return NullTracker()
