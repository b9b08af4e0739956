"""Where a run starts. Rank 0 chooses the checkpoint to resume: every recorded file verified, damaged files
repaired from the bucket, or the newest complete checkpoint restored from it on a fresh VM. Then each node gets
the files its ranks load (nodes without a shared filesystem), and a checkpoint saved on another world size is
converted to DeepSpeed's universal format once per node."""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.checkpoint.layout import MANIFEST, remote_prefix
from trainer.checkpoint.store import (
    Checkpoint,
    CheckpointStore,
    all_committed,
    is_committed,
    read_metadata,
    resolve_resume,
)
from trainer.checkpoint.universal import UNIVERSAL_DIR
from trainer.config.load import model_identity
from trainer.config.schema import RunConfig
from trainer.engine import dist
from trainer.engine.goodput import PhaseClock
from trainer.engine.state import RunDecision, new_run_id
from trainer.errors import UserError
from trainer.log import get_logger, redact
from trainer.progress import gb
from trainer.ranks import RankInfo
from trainer.storage import describe_error, is_storage_error, open_storage

log = get_logger("engine")


class ResumeSteps:
    """The start's checkpoint steps for one rank; the restore time counts in the goodput clock's `restore` phase."""

    def __init__(self, cfg: RunConfig, ranks: RankInfo, clock: PhaseClock):
        self.cfg = cfg
        self.ranks = ranks
        self.clock = clock

    def decide(self) -> RunDecision:
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
                repair=self.repair_from_bucket if self.cfg.upload.url else None,
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

    def repair_from_bucket(self, ckpt: Checkpoint, damaged: list[str]) -> bool:
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

    def restore_on_this_node(self, decision: RunDecision, stage: int) -> None:
        """Nodes without a shared filesystem: each node's first rank fetches the checkpoint rank 0 chose, and on the
        same world size the files its ranks load that another node wrote (the model states, under ZeRO-1/2)."""
        from trainer.checkpoint.integrity import damaged_files, describe_damage
        from trainer.checkpoint.universal import missing_for_ranks, needed_by_ranks
        from trainer.upload.restore import fill_missing, restore

        src, meta, r = Path(decision.resume), decision.metadata, self.ranks
        mine = range(r.rank, r.rank + max(1, r.local_world_size))
        stage = int(meta.get("zero_stage", stage))

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

    def convert_for_this_world(self, decision: RunDecision) -> Path:
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
                saved_world,
                r.world_size,
                how,
                gb(conv.bytes),
            )
        return src / UNIVERSAL_DIR
