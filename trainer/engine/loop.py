"""The training loop around a DeepSpeed engine. It runs any `Task` and knows no model or dataset.

Checkpoints (saving in the background, committing, loading, uploads and retention) are the
`CheckpointManager`'s; held-out loss is the `Evaluator`'s; where numbers go (console, MLflow,
TensorBoard, status file, summary) is the `Reporter`'s; where the wall time goes is the `Goodput`
clock's. The run's length and cadences come from its `Plan`. The loop steps and asks them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from trainer.checkpoint.catalog import trend_of
from trainer.checkpoint.layout import MANIFEST, remote_prefix, tag_for, utc_now
from trainer.checkpoint.store import (
    Checkpoint,
    CheckpointStore,
    all_committed,
    atomic_write,
    is_committed,
    read_metadata,
    resolve_resume,
)
from trainer.checkpoint.universal import UNIVERSAL_DIR
from trainer.config.batch import resolve_batch
from trainer.config.deepspeed import render_ds_config, uses_ds_optimizer, zero_stage
from trainer.config.load import config_hash, config_to_yaml, model_identity, public_config_dict
from trainer.config.plan import DataSizes, Plan, resolve_plan
from trainer.config.schema import RunConfig
from trainer.engine import dist
from trainer.engine.checkpointing import CheckpointManager, capture_rng
from trainer.engine.evaluate import EvalResult, Evaluator
from trainer.engine.goodput import Goodput, PhaseClock, process_started_monotonic
from trainer.engine.metrics import accelerator_name, mfu, peak_flops, system_info
from trainer.engine.optim import optimizer_factory, param_groups, scheduler_factory
from trainer.engine.report import Reporter, curve_of
from trainer.engine.signals import StopFlag, watch_launchers
from trainer.errors import EXIT_OK, EXIT_PREEMPTED, UserError
from trainer.tasks.base import Task
from trainer.log import add_log_file, add_node_log, get_logger, redact
from trainer.progress import gb
from trainer.ranks import node_identity, rank_info
from trainer.storage import describe_error, is_storage_error, open_storage

log = get_logger("engine")


def new_run_id() -> str:
    return f"{uuid.uuid4().hex}_{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}"


@dataclass
class RunState:
    """What the loop carries from step to step and into every checkpoint's metadata."""

    step: int = 0
    loss_history: list[list[float]] = field(default_factory=list)
    lr_history: list[list[float]] = field(default_factory=list)
    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    last_loss: Optional[float] = None
    val_history: list[list[float]] = field(default_factory=list)  # [step, val loss] of every evaluation
    best_val_loss: Optional[float] = None
    best_val_step: Optional[int] = None
    last_ppl: Optional[float] = None

    def record(self, step: int, loss: float, lr: float) -> None:
        self.loss_history.append([step, loss])
        self.lr_history.append([step, lr])
        self.last_loss = loss
        if math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss):
            self.best_loss, self.best_step = loss, step

    def record_val(self, r: EvalResult) -> bool:
        """Add an evaluation; True if its loss is the best so far."""
        self.val_history.append([r.step, r.loss])
        self.last_ppl = r.perplexity
        better = math.isfinite(r.loss) and (self.best_val_loss is None or r.loss < self.best_val_loss)
        if better:
            self.best_val_loss, self.best_val_step = r.loss, r.step
        return better

    def val_at(self, step: int) -> Optional[float]:
        """The validation loss measured at `step` (None if that step was not evaluated)."""
        return self.val_history[-1][1] if self.val_history and self.val_history[-1][0] == step else None

    def best(self, metric: str) -> tuple[Optional[float], Optional[int]]:
        return (self.best_val_loss, self.best_val_step) if metric == "val_loss" else (self.best_loss, self.best_step)

    def validation_metrics(self, step: int, metric: str) -> Optional[dict]:
        """Where the held-out loss stands after `step` (None before the first evaluation)."""
        if not self.val_history:
            return None
        trend, change = trend_of([float(v) for _, v in self.val_history])
        last_step, last = self.val_history[-1]
        return {
            "current_val_loss": last,
            "current_step": last_step,
            "perplexity": self.last_ppl if last_step == step else None,
            "best_val_loss": self.best_val_loss,
            "best_val_step": self.best_val_step,
            "steps_since_best": step - self.best_val_step if self.best_val_step is not None else None,
            "evaluations": len(self.val_history),
            "trend": trend,
            "trend_change": round(change, 6) if change is not None else None,
            "best_metric": metric,
        }

    @classmethod
    def from_metadata(cls, meta: dict) -> "RunState":
        return cls(
            step=int(meta["step"]),
            loss_history=list(meta.get("loss_history", [])),
            lr_history=list(meta.get("lr_history", [])),
            best_loss=meta.get("best_loss"),
            best_step=meta.get("best_step"),
            last_loss=meta.get("loss"),
            val_history=list(meta.get("val_history") or []),
            best_val_loss=meta.get("best_val_loss"),
            best_val_step=meta.get("best_val_step"),
            last_ppl=(meta.get("validation_metrics") or {}).get("perplexity"),
        )


@dataclass(frozen=True)
class RunDecision:
    """Rank 0's choice at the start, shared with every rank: the run id and the checkpoint to resume (if any)."""

    run_id: str
    resume: Optional[str] = None  # the checkpoint folder
    metadata: Optional[dict] = None  # its metadata.json (mlflow_run_id cleared on a branch)
    branched_from: Optional[str] = None  # set when the checkpoint has newer ones: a new run continues it
    restored: Optional[str] = None  # the bucket prefix it was restored from on this start


class LossWindow:
    """Sums losses on the device between log points; one all-reduce turns them into a global mean."""

    def __init__(self) -> None:
        self.total: Any = 0.0
        self.count = 0
        self.steps = 0
        self.started = time.perf_counter()

    def restart_clock(self) -> None:
        """An empty window's time starts now (what came before it, an evaluation, is not step time)."""
        if self.count == 0:
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
        self.boundary_rng: Optional[dict] = (
            None  # RNG at the start of the step in progress (for a stop between micro-batches)
        )
        self.stop_deadline: Optional[float] = None  # monotonic time by which a stopped job must have left
        self.resumed_from_world_size: Optional[int] = None  # the resumed checkpoint's world size, when it differs
        self._grace_warned: set[str] = set()

    # ----------------------------------------------------------------------------------- setup
    def _decide_run(self) -> RunDecision:
        """On rank 0: which checkpoint to resume (if any) and the run id. Shared with all ranks."""
        from trainer.upload.restore import restore_newest

        model = model_identity(self.cfg)
        with self.clock.phase_of("restore"):  # every recorded file's size and CRC32C checked before anything loads
            ckpt = resolve_resume(
                self.cfg.run_dir,
                self.cfg.checkpoint.resume,
                task=self.cfg.task,
                model=model,
                verify="full",
                repair=self._repair_from_bucket if self.cfg.upload.url else None,
            )
        restored = None
        if ckpt is None and self.cfg.checkpoint.resume == "auto" and self.cfg.upload.url:
            log.info("no local checkpoint: looking for the newest complete one in %s", redact(self.cfg.upload.url))
            damaged_here = {c.path for c in all_committed(Path(self.cfg.run_dir))}  # (all stepped past above)
            try:
                with self.clock.phase_of("restore"):
                    path = restore_newest(open_storage(self.cfg.upload.url), self.cfg.run_dir, self.cfg.task, model)
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                raise UserError(
                    f"--resume auto: could not restore from {redact(self.cfg.upload.url)} ({describe_error(exc)});"
                    " nothing was trained: run the same command again when the bucket answers, or pass"
                    " --resume none to start a new run"
                ) from None
            if path is not None:
                ckpt, restored = Checkpoint(path, read_metadata(path)), remote_prefix(read_metadata(path))
                if path in damaged_here:  # restore() keeps a local folder of that tag, and this one failed its check
                    raise UserError(
                        f"--resume auto: {path} is damaged (named above) and could not be repaired from the"
                        " bucket; pass --resume with an older checkpoint, or --resume none"
                    )
        if ckpt is None:
            return RunDecision(self.cfg.run_id or new_run_id())
        meta = dict(ckpt.metadata)
        newer = [c.tag for c in CheckpointStore(ckpt.path.parent.parent).committed() if c.step > ckpt.step]
        if newer:  # never overwrite the later checkpoints of that run: continue as a new run
            run_id = new_run_id()
            log.warning(
                "resuming from %s, which has newer checkpoints (%s): continuing as a new run %s",
                ckpt.tag,
                ", ".join(newer),
                run_id,
            )
            meta["mlflow_run_id"] = None
            return RunDecision(run_id, str(ckpt.path), meta, branched_from=str(ckpt.path))
        return RunDecision(ckpt.run_id, str(ckpt.path), meta, restored=restored)

    def _repair_from_bucket(self, ckpt: Checkpoint, damaged: list[str]) -> bool:
        """Replace the damaged files of a local checkpoint by their verified copies in the bucket (True), if it has
        them."""
        from trainer.upload.restore import fill_missing

        aside = {rel: ckpt.path / f"{rel}.damaged" for rel in damaged}
        try:
            storage, prefix = open_storage(self.cfg.upload.url), remote_prefix(ckpt.metadata)  # type: ignore[arg-type]
            raw = storage.get_bytes(f"{prefix}/{MANIFEST}")
            manifest = json.loads(raw) if raw else {}
            if not raw or not set(damaged) <= {f["path"] for f in manifest.get("files", [])}:
                log.warning("%s holds no complete copy of %s to repair it from", redact(self.cfg.upload.url), ckpt.tag)
                return False
            for rel, bad in aside.items():  # set aside, not deleted: put back if the bucket's copy does not come
                if (ckpt.path / rel).exists():
                    os.replace(ckpt.path / rel, bad)
            fill_missing(storage, prefix, manifest, ckpt.path, lambda name: name in damaged)
        except Exception as exc:  # the bucket cannot be read now, or its copy is damaged too
            log.warning("could not repair %s from %s: %s", ckpt.tag, redact(self.cfg.upload.url), describe_error(exc))
            for rel, bad in aside.items():
                if bad.exists() and not (ckpt.path / rel).exists():
                    os.replace(bad, ckpt.path / rel)
            return False
        for bad in aside.values():
            bad.unlink(missing_ok=True)
        return True

    def say_where_checkpoints_are(self) -> None:
        """For a job stopped while starting: the committed checkpoints under run_dir not in the bucket, each named as
        still local (with its path), as the drain says them at the end of a run (first rank of each node)."""
        from trainer.engine.checkpointing import report_locations

        if self.ranks.is_local_main and self.cfg.upload.url:
            report_locations(all_committed(Path(self.cfg.run_dir)), uploaded_too=False)

    def _restore_on_this_node(self, decision: RunDecision) -> None:
        """Nodes without a shared filesystem: each node's first rank fetches the checkpoint rank 0 chose, and on the
        same world size the files its ranks load that another node wrote (the model states, under ZeRO-1/2)."""
        from trainer.checkpoint.integrity import damaged_files, describe_damage
        from trainer.checkpoint.universal import missing_for_ranks, needed_by_ranks
        from trainer.upload.restore import fill_missing, restore

        src, meta, r = Path(decision.resume), decision.metadata, self.ranks
        mine = range(r.rank, r.rank + max(1, r.local_world_size))
        stage = int(meta.get("zero_stage", self.stage))

        def fetch() -> None:
            damaged = ""
            if is_committed(src) and not r.is_main:  # (rank 0 verified its node's copy when it chose it)
                same_world = int(meta.get("world_size", r.world_size)) == r.world_size
                wanted = (lambda name: needed_by_ranks(name, mine, stage)) if same_world else None
                if bad := damaged_files(src, read_metadata(src), wanted=wanted):
                    damaged = f"; its damaged files were removed ({describe_damage(bad)})"
                    log.warning(
                        "this node's copy of %s is damaged (%s): fetching the files again", src, describe_damage(bad)
                    )
                    for rel, _ in bad:
                        (src / rel).unlink(missing_ok=True)
            if decision.restored and not is_committed(src):
                storage = open_storage(self.cfg.upload.url)  # type: ignore[arg-type]
                manifest = json.loads(storage.get_bytes(f"{decision.restored}/{MANIFEST}") or b"{}")
                with self.clock.phase_of("restore"):
                    restore(storage, decision.restored, manifest, self.cfg.run_dir)
            if is_committed(src) and (
                int(meta.get("world_size", r.world_size)) != r.world_size or not missing_for_ranks(src, mine, stage)
            ):
                return  # (another world size: the conversion fetches what it needs)
            url = self.cfg.upload.url
            raw = open_storage(url).get_bytes(f"{remote_prefix(meta)}/{MANIFEST}") if url else None
            if raw is None:
                where = f"{redact(url)} holds no complete copy of it" if url else "no upload.url to fetch them from"
                what = "lacks files its ranks load, written on another node" if is_committed(src) else "is missing"
                raise UserError(
                    f"--resume: this node's copy of {src} {what} (nodes without a shared filesystem), and {where}"
                    f"{damaged}"
                )
            storage, prefix, manifest = open_storage(url), remote_prefix(meta), json.loads(raw)  # type: ignore[arg-type]
            with self.clock.phase_of("restore"):
                if not is_committed(src):  # a node that never had it (a replaced VM): the whole checkpoint
                    restore(storage, prefix, manifest, self.cfg.run_dir)
                else:
                    fill_missing(storage, prefix, manifest, src, lambda name: needed_by_ranks(name, mine, stage))

        dist.agree(fetch, dist.local_mains(self.ranks), f"each node restoring {Path(str(decision.resume)).name}")

    def _convert_for_this_world(self, decision: RunDecision) -> Path:
        """The resumed checkpoint in DeepSpeed's universal format (converted once on each node that lacks it; a
        conversion already beside it is reused). Said in one line: what was resumed, from how many ranks onto how
        many."""
        from trainer.checkpoint.universal import ensure_universal, missing_states, missing_states_error
        from trainer.upload.restore import fill_missing

        src, r, url = Path(decision.resume), self.ranks, self.cfg.upload.url
        saved_world = int(decision.metadata["world_size"])
        done: dict = {}

        def convert() -> None:
            with self.clock.phase_of("restore"):
                if (missing := missing_states(src, saved_world)) and url:  # a node of a run without a shared filesystem
                    storage = open_storage(url)
                    prefix = remote_prefix(decision.metadata)
                    raw = storage.get_bytes(f"{prefix}/{MANIFEST}")
                    if raw:
                        fill_missing(storage, prefix, json.loads(raw), src)
                        missing = missing_states(src, saved_world)
                if missing:
                    raise missing_states_error(src, saved_world, missing, redact(url) if url else None)
                done["conversion"] = ensure_universal(src)

        dist.agree(convert, dist.local_mains(r), f"each node converting {src.name} to the universal format")
        conv = done.get("conversion")
        if r.is_main and conv is not None:
            how = (
                f"converted to universal in {conv.seconds:.1f} s"
                if conv.seconds is not None
                else "reusing its universal conversion"
            )
            log.info(
                "resuming %s saved on %d ranks onto %d: %s (%s)",
                src.name,
                self.resumed_from_world_size,
                r.world_size,
                how,
                gb(conv.bytes),
            )
        return src / UNIVERSAL_DIR

    def setup(self) -> None:
        from trainer.dsimport import import_deepspeed

        deepspeed = import_deepspeed()

        self.stop.install()  # from here on a signal stops the job at the next step boundary
        watch_launchers(self.stop)  # ... and so does the loss of the launcher (its runner forwards no signal)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        dist.init_distributed()
        cfg, r = self.cfg, self.ranks
        render_ds_config(
            resolve_batch(cfg, r.world_size, self.source),
            r.world_size,
            self.task.model_hints().get("hidden_size"),
            self.source,
        )  # bad input before any work
        dist.agree(self.task.prepare_data, dist.local_mains(r), "the first rank of each node preparing the data")
        sizes = dist.on_main_then_share(self.task.preflight, r, "rank 0 checking the data")
        if cfg.upload.url:
            dist.on_main_then_share(lambda: open_storage(cfg.upload.url).check(), r, "rank 0 checking upload.url")
        decision = dist.on_main_then_share(
            self._decide_run, r, "rank 0 choosing (and restoring) the checkpoint to resume"
        )
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
        # the global batch on this world size (a checkpoint saved on another one keeps its own), then what follows from
        # it
        self.cfg = cfg = resolve_batch(cfg, r.world_size, self.source, meta)
        self.ds_config = render_ds_config(cfg, r.world_size, self.task.model_hints().get("hidden_size"), self.source)
        self.stage = zero_stage(self.ds_config)
        self.plan = resolve_plan(cfg, sizes or DataSizes(1), r.world_size)
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
            self._restore_on_this_node(decision)
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
        universal = self._convert_for_this_world(decision) if self.resumed_from_world_size else None
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
            from trainer.upload.uploader import NodeInfo, make_uploader

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
        """Rank 0, after a commit: the curves to MLflow (on its thread), the status file, the ledger."""
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


def grace_problems(cfg: RunConfig, step_time: float, save_s: Optional[float]) -> list[tuple[str, str]]:
    """(kind, why) a stop signal cannot be honoured within `preemption.grace_s` with these settings (empty: it can).

    A stop is acted on at the next micro-batch boundary (`preemption.check_micro_batches`, grad_accum > 1)
    or step boundary; then a save needs its time, and leaving needs `exit_reserve_s`."""
    p, ga = cfg.preemption, cfg.train.grad_accum
    micro = ga > 1 and p.check_micro_batches
    wait = step_time / ga if micro else step_time
    unit = "micro-batch" if micro else "step"
    budget = p.grace_s - p.exit_reserve_s
    if wait > budget:
        return [
            (
                "step",
                f"a {unit} takes {wait:.1f} s, more than the {p.grace_s:g} s grace (minus {p.exit_reserve_s:g} s to "
                "leave):"
                f" a SIGTERM cannot be honoured at a {unit} boundary with these settings; the run resumes from its last"
                " checkpoint (lower train.micro_batch_size" + ("" if micro else ", or raise train.grad_accum") + ")",
            )
        ]
    if save_s is not None and wait + 1.2 * save_s > budget:
        return [
            (
                "save",
                f"a {unit} ({wait:.1f} s) and an emergency save (~{save_s:.1f} s) take more than the {p.grace_s:g} s "
                "grace"
                f" (minus {p.exit_reserve_s:g} s to leave): a SIGTERM will usually stop without saving, losing the "
                "work since"
                " the last checkpoint (save more often, or lower the step time)",
            )
        ]
    return []
