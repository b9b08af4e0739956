"""The local checkpoint store: atomic writes, commit, listing, retention, deletion and resume lookup."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import pytest

from trainer.checkpoint import store as store_mod
from trainer.checkpoint.layout import METADATA, tag_for
from trainer.checkpoint.store import (
    CheckpointStore,
    all_committed,
    atomic_write,
    delete_checkpoint,
    is_committed,
    read_metadata,
    resolve_resume,
)
from trainer.errors import UserError


def make_ckpt(
    run_dir: Path,
    run_id: str,
    step: int,
    loss: Optional[float] = 1.0,
    committed_at: Optional[str] = None,
    committed: bool = True,
    **extra: object,
) -> Path:
    """A fake checkpoint folder (a weights file, and metadata.json when committed)."""
    d = run_dir / run_id / "checkpoints" / tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if committed:
        meta = {
            "step": step,
            "run_id": run_id,
            "loss": loss,
            "committed_at": committed_at or f"2024-01-01T00:{step // 60 % 60:02d}:{step % 60:02d}+00:00",
            **extra,
        }
        (d / METADATA).write_text(json.dumps(meta))
    return d


def tags(ckpts) -> list[str]:
    return [c.tag for c in ckpts]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# atomic_write


def test_tag_for() -> None:
    assert tag_for(100) == "step-00000100"
    assert tag_for(0) == "step-00000000"


def test_atomic_write_text_and_bytes_leave_no_temp_files(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a.json", '{"x": 1}\n')
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    atomic_write(tmp_path / "a.json", '{"x": 2}\n')  # replace an existing file
    assert (tmp_path / "a.json").read_text() == '{"x": 2}\n'
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metadata.json"
    atomic_write(target, "old\n")

    def boom(src, dst):  # the rename fails (disk full, killed, ...)
        raise OSError("rename failed")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, "new\n")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metadata.json"]


# ---------------------------------------------------------------------------------------------
# commit / committed / partials


def test_commit_writes_side_files_then_metadata_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path / "run1")
    order: list[str] = []
    real = store_mod.atomic_write

    def recording(path, data):
        # when metadata.json is written every side file must already be complete on disk
        if Path(path).name == METADATA:
            for name in ("config.yaml", "rng_rank0.json"):
                assert (Path(path).parent / name).is_file(), f"{name} not written before metadata"
        order.append(Path(path).name)
        real(path, data)

    monkeypatch.setattr(store_mod, "atomic_write", recording)
    d = store.commit(
        tag_for(10),
        {"step": 10, "run_id": "run1", "loss": 2.5, "committed_at": "2024-01-01T00:00:00+00:00"},
        {"config.yaml": "a: 1\n", "rng_rank0.json": "{}"},
    )
    assert d == tmp_path / "run1" / "checkpoints" / "step-00000010"
    assert order[-1] == METADATA
    assert sorted(order[:-1]) == ["config.yaml", "rng_rank0.json"]
    assert (d / "config.yaml").read_text() == "a: 1\n"
    meta = json.loads((d / METADATA).read_text())
    assert meta["step"] == 10 and meta["run_id"] == "run1" and meta["loss"] == 2.5 and meta["format"] == 1
    assert leftovers(tmp_path) == []
    assert tags(store.committed()) == ["step-00000010"]
    assert read_metadata(d)["step"] == 10


def test_commit_into_folder_with_engine_files(tmp_path: Path) -> None:
    """DeepSpeed writes its files first; the checkpoint only exists once commit() wrote metadata.json."""
    store = CheckpointStore(tmp_path / "run1")
    d = store.path(tag_for(5))
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"w")
    assert not is_committed(d) and store.committed() == []
    store.commit(tag_for(5), {"step": 5, "run_id": "run1"}, {})
    assert is_committed(d)
    assert (d / "mp_rank_00_model_states.pt").read_bytes() == b"w"
    assert tags(store.committed()) == ["step-00000005"]


def test_committed_ignores_partials_and_other_entries(tmp_path: Path) -> None:
    make_ckpt(tmp_path, "run1", 100)
    make_ckpt(tmp_path, "run1", 20)
    make_ckpt(tmp_path, "run1", 300, committed=False)  # a save that never completed
    root = tmp_path / "run1" / "checkpoints"
    (root / "notes").mkdir()
    (root / "step-00000999").write_text("a file, not a folder")
    store = CheckpointStore(tmp_path / "run1")
    assert tags(store.committed()) == ["step-00000020", "step-00000100"]  # oldest step first, numerically
    assert [c.step for c in store.committed()] == [20, 100]
    assert all(c.run_id == "run1" for c in store.committed())


def test_committed_skips_corrupt_metadata(tmp_path: Path) -> None:
    make_ckpt(tmp_path, "run1", 10)
    bad = make_ckpt(tmp_path, "run1", 20)
    (bad / METADATA).write_text("{not json")
    lacking = make_ckpt(tmp_path, "run1", 30)
    (lacking / METADATA).write_text(json.dumps({"loss": 1.0}))
    assert tags(CheckpointStore(tmp_path / "run1").committed()) == ["step-00000010"]
    with pytest.raises(UserError, match="corrupt"):
        read_metadata(bad)
    with pytest.raises(UserError, match="step/run_id"):
        read_metadata(lacking)


def test_committed_on_a_new_run_is_empty(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "never-ran")
    assert store.committed() == []
    assert store.remove_partials() == []


def test_remove_partials_deletes_only_uncommitted(tmp_path: Path) -> None:
    keep = make_ckpt(tmp_path, "run1", 10)
    partial1 = make_ckpt(tmp_path, "run1", 20, committed=False)
    partial2 = make_ckpt(tmp_path, "run1", 30, committed=False)
    store = CheckpointStore(tmp_path / "run1")
    removed = store.remove_partials()
    assert sorted(removed) == sorted([partial1, partial2])
    assert not partial1.exists() and not partial2.exists()
    assert keep.is_dir() and (keep / "mp_rank_00_model_states.pt").exists()
    assert tags(store.committed()) == ["step-00000010"]
    assert store.remove_partials() == []


# ---------------------------------------------------------------------------------------------
# retention / deletion


def test_retention_keeps_newest_n_plus_best(tmp_path: Path) -> None:
    losses = {10: 5.0, 20: 1.0, 30: 4.0, 40: 3.0, 50: 2.0}
    for step, loss in losses.items():
        make_ckpt(tmp_path, "run1", step, loss)
    store = CheckpointStore(tmp_path / "run1")
    deleted = store.retention(keep_last=2, keep_best=True)
    assert sorted(p.name for p in deleted) == ["step-00000010", "step-00000030"]
    assert tags(store.committed()) == ["step-00000020", "step-00000040", "step-00000050"]
    assert sorted(p.name for p in (tmp_path / "run1" / "checkpoints").iterdir()) == tags(store.committed())


def test_retention_without_keep_best(tmp_path: Path) -> None:
    for step, loss in {10: 5.0, 20: 1.0, 30: 4.0, 40: 3.0}.items():
        make_ckpt(tmp_path, "run1", step, loss)
    store = CheckpointStore(tmp_path / "run1")
    store.retention(keep_last=2, keep_best=False)
    assert tags(store.committed()) == ["step-00000030", "step-00000040"]


def test_retention_best_already_among_newest(tmp_path: Path) -> None:
    for step, loss in {10: 5.0, 20: 4.0, 30: 3.0, 40: 1.0}.items():
        make_ckpt(tmp_path, "run1", step, loss)
    store = CheckpointStore(tmp_path / "run1")
    store.retention(keep_last=2, keep_best=True)
    assert tags(store.committed()) == ["step-00000030", "step-00000040"]


def test_retention_ignores_checkpoints_without_loss_for_best(tmp_path: Path) -> None:
    make_ckpt(tmp_path, "run1", 10, loss=None)
    make_ckpt(tmp_path, "run1", 20, loss=2.0)
    make_ckpt(tmp_path, "run1", 30, loss=3.0)
    make_ckpt(tmp_path, "run1", 40, loss=None)
    store = CheckpointStore(tmp_path / "run1")
    store.retention(keep_last=1, keep_best=True)
    assert tags(store.committed()) == ["step-00000020", "step-00000040"]


def test_retention_leaves_partials_alone_and_keeps_enough(tmp_path: Path) -> None:
    make_ckpt(tmp_path, "run1", 10, 1.0)
    make_ckpt(tmp_path, "run1", 20, 2.0)
    store = CheckpointStore(tmp_path / "run1")
    assert store.retention(keep_last=3, keep_best=True) == []
    assert tags(store.committed()) == ["step-00000010", "step-00000020"]


def test_retention_never_keeps_a_nan_loss_as_best(tmp_path: Path) -> None:
    make_ckpt(tmp_path, "run1", 10, loss=math.nan)  # json.dumps writes NaN, json.loads reads it back
    make_ckpt(tmp_path, "run1", 20, loss=1.0)
    make_ckpt(tmp_path, "run1", 30, loss=3.0)
    make_ckpt(tmp_path, "run1", 40, loss=4.0)
    store = CheckpointStore(tmp_path / "run1")
    store.retention(keep_last=1, keep_best=True)
    assert tags(store.committed()) == ["step-00000020", "step-00000040"]


def test_retention_keeps_the_best_by_val_loss_measured_at_its_step(tmp_path: Path) -> None:
    """best_metric val_loss: the lowest held-out loss wins although another has the lowest training loss; a checkpoint
    saved between evaluations (val_loss None: not measured at its step) is never the best by val_loss."""
    for step, loss, val in [
        (10, 5.0, 4.0),
        (20, 1.0, 3.5),
        (30, 4.0, 2.0),
        (40, 3.0, None),
        (50, 2.0, 3.0),
        (60, 2.5, 3.1),
    ]:
        make_ckpt(tmp_path, "run1", step, loss, val_loss=val, best_metric="val_loss")
    store = CheckpointStore(tmp_path / "run1")
    store.retention(keep_last=1, keep_best=True)  # the metric the checkpoints were saved with
    assert tags(store.committed()) == ["step-00000030", "step-00000060"]
    assert store_mod.best_checkpoint(store.committed(), "train_loss").tag == "step-00000060"


def test_best_reference_follows_the_recorded_metric(tmp_path: Path) -> None:
    from trainer.checkpoint.catalog import scan

    for step, loss, val in [(10, 1.0, 4.0), (20, 2.0, 3.0)]:
        make_ckpt(tmp_path, "run1", step, loss, val_loss=val, best_metric="val_loss")
    assert scan(tmp_path).find("best").tag == "step-00000020"
    make_ckpt(tmp_path, "run2", 10, 1.0)  # an older checkpoint without best_metric: by training loss
    make_ckpt(tmp_path, "run2", 20, 2.0, val_loss=0.5)
    assert scan(tmp_path).find("run2/best").tag == "step-00000010"


def test_delete_checkpoint_removes_metadata_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_ckpt(tmp_path, "run1", 10)
    seen: list[bool] = []
    real_rmtree = store_mod.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        seen.append((Path(path) / METADATA).exists())
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(store_mod.shutil, "rmtree", rmtree)
    delete_checkpoint(d)
    assert seen == [False], "metadata.json must be gone before the folder is deleted"
    assert not d.exists()


def test_delete_interrupted_leaves_a_partial_not_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_ckpt(tmp_path, "run1", 10)
    make_ckpt(tmp_path, "run1", 20)

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies mid-delete

    monkeypatch.setattr(store_mod.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        delete_checkpoint(d)
    monkeypatch.undo()
    store = CheckpointStore(tmp_path / "run1")
    assert d.is_dir() and not is_committed(d)
    assert tags(store.committed()) == ["step-00000020"]
    assert resolve_resume(tmp_path, "latest").tag == "step-00000020"
    assert store.remove_partials() == [d]


# ---------------------------------------------------------------------------------------------
# resolve_resume


@pytest.mark.parametrize("spec", [None, "", "none", "no"])
def test_resume_off(tmp_path: Path, spec) -> None:
    make_ckpt(tmp_path, "run1", 10)
    assert resolve_resume(tmp_path, spec) is None


def test_resume_auto_is_a_fresh_start_when_empty(tmp_path: Path) -> None:
    assert resolve_resume(tmp_path / "missing", "auto") is None
    assert resolve_resume(tmp_path, "auto") is None
    make_ckpt(tmp_path, "run1", 10, committed=False)  # partials do not count
    assert resolve_resume(tmp_path, "auto") is None


def test_resume_latest_is_an_error_when_empty(tmp_path: Path) -> None:
    make_ckpt(tmp_path, "run1", 10, committed=False)
    with pytest.raises(UserError, match="--resume latest") as exc:
        resolve_resume(tmp_path, "latest")
    assert str(tmp_path) in str(exc.value)


@pytest.mark.parametrize("spec", ["auto", "latest"])
def test_resume_auto_and_latest_pick_the_newest_commit(tmp_path: Path, spec: str) -> None:
    make_ckpt(tmp_path, "old-run", 500, committed_at="2024-01-01T00:00:00+00:00")
    make_ckpt(tmp_path, "new-run", 100, committed_at="2024-02-01T00:00:00+00:00")
    make_ckpt(tmp_path, "new-run", 200, committed_at="2024-02-01T01:00:00+00:00")
    make_ckpt(tmp_path, "new-run", 300, committed=False)
    ckpt = resolve_resume(tmp_path, spec)
    assert ckpt is not None
    assert (ckpt.run_id, ckpt.tag, ckpt.step) == ("new-run", "step-00000200", 200)
    assert ckpt.path == tmp_path / "new-run" / "checkpoints" / "step-00000200"


def test_resume_by_tag(tmp_path: Path) -> None:
    make_ckpt(tmp_path, "run-a", 100, committed_at="2024-01-01T00:00:00+00:00")
    make_ckpt(tmp_path, "run-a", 200, committed_at="2024-01-01T01:00:00+00:00")
    make_ckpt(tmp_path, "run-b", 100, committed_at="2024-03-01T00:00:00+00:00")
    ckpt = resolve_resume(tmp_path, "step-00000200")
    assert (ckpt.run_id, ckpt.step) == ("run-a", 200)
    ckpt = resolve_resume(tmp_path, "step-00000100")  # in two runs: the newest commit
    assert ckpt.run_id == "run-b"


def test_resume_by_run_id_and_tag(tmp_path: Path) -> None:
    make_ckpt(tmp_path, "run-a", 100, committed_at="2024-01-01T00:00:00+00:00")
    make_ckpt(tmp_path, "run-b", 100, committed_at="2024-03-01T00:00:00+00:00")
    ckpt = resolve_resume(tmp_path, "run-a/step-00000100")
    assert ckpt.run_id == "run-a"
    assert ckpt.path == tmp_path / "run-a" / "checkpoints" / "step-00000100"
    with pytest.raises(UserError, match="run-c/step-00000100"):
        resolve_resume(tmp_path, "run-c/step-00000100")


def test_resume_by_path(tmp_path: Path) -> None:
    d = make_ckpt(tmp_path / "elsewhere", "run-x", 70)
    make_ckpt(tmp_path / "runs", "run-y", 900)
    ckpt = resolve_resume(tmp_path / "runs", str(d))
    assert ckpt.path == d
    assert (ckpt.step, ckpt.run_id) == (70, "run-x")


def test_resume_from_a_partial_path_is_an_error(tmp_path: Path) -> None:
    d = make_ckpt(tmp_path, "run1", 70, committed=False)
    with pytest.raises(UserError, match="not a committed checkpoint") as exc:
        resolve_resume(tmp_path, str(d))
    assert str(d) in str(exc.value)


def test_resume_unknown_tag_lists_what_exists(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="there are none"):
        resolve_resume(tmp_path, "step-00000999")
    make_ckpt(tmp_path, "run1", 100)
    make_ckpt(tmp_path, "run1", 200)
    make_ckpt(tmp_path, "run1", 999, committed=False)  # a partial with that tag does not count
    with pytest.raises(UserError, match="step-00000999") as exc:
        resolve_resume(tmp_path, "step-00000999")
    assert "step-00000100" in str(exc.value) and "step-00000200" in str(exc.value)


def test_all_committed_spans_runs(tmp_path: Path) -> None:
    make_ckpt(tmp_path, "run-a", 10)
    make_ckpt(tmp_path, "run-b", 20)
    make_ckpt(tmp_path, "run-b", 30, committed=False)
    (tmp_path / "mlflow.db").write_text("")
    assert sorted((c.run_id, c.step) for c in all_committed(tmp_path)) == [("run-a", 10), ("run-b", 20)]


def test_resume_auto_of_a_complete_run_is_nothing_to_do(tmp_path: Path) -> None:
    """A supervisor restarting a finished job: one line, exit 0, no training; other specs stay errors."""
    from trainer.errors import NothingToDo

    make_ckpt(tmp_path, "run-a", 300)
    ckpt = resolve_resume(tmp_path, "auto")
    with pytest.raises(NothingToDo) as exc:
        ckpt.check_resumable("auto", 1, "pretrain", 300)
    assert exc.value.exit_code == 0 and exc.value.lines() == [
        "nothing to do: run run-a is complete (step-00000300, train.max_steps 300); raise --max-steps to train further,"
        " or pass --resume none for a new run"
    ]
    with pytest.raises(UserError) as exc2:
        ckpt.check_resumable("latest", 1, "pretrain", 300)
    assert exc2.value.exit_code == 2 and not isinstance(exc2.value, NothingToDo)


def test_resume_refuses_other_model_sizes_and_accepts_metadata_from_before_sizes_were_recorded(tmp_path: Path) -> None:
    """Sizes over a preset are part of the model a checkpoint holds: another size is refused, naming it; a
    checkpoint whose metadata recorded only the preset (older versions) still resumes with that preset's sizes."""
    from trainer.config.load import model_identity
    from trainer.config.schema import RunConfig

    d = make_ckpt(tmp_path, "run-a", 10)
    meta = json.loads((d / METADATA).read_text())
    three = model_identity(RunConfig.model_validate({"model": {"num_layers": 3}}))
    (d / METADATA).write_text(json.dumps({**meta, "model": three, "world_size": 1, "task": "pretrain"}))
    ckpt = resolve_resume(tmp_path, "latest")
    ckpt.check_resumable("latest", 1, "pretrain", 100, three)
    two = model_identity(RunConfig.model_validate({}))
    with pytest.raises(UserError) as exc:
        ckpt.check_resumable("latest", 1, "pretrain", 100, two)
    assert "holds a different model than this config (num_layers 3 there, 2 here)" in str(exc.value)
    assert resolve_resume(tmp_path, "auto", task="pretrain", model=two) is None  # auto never picks another model

    old = {
        "preset": "neox-tiny",
        "vocab_size": None,
        "pad_vocab_to": 128,
        "seq_len": None,
        "attn_implementation": "sdpa",
        "gradient_checkpointing": False,
    }
    (d / METADATA).write_text(json.dumps({**meta, "model": old, "world_size": 1, "task": "pretrain"}))
    resolve_resume(tmp_path, "latest").check_resumable("latest", 1, "pretrain", 100, two)
    with pytest.raises(UserError, match="num_layers 2 there, 3 here"):
        resolve_resume(tmp_path, "latest").check_resumable("latest", 1, "pretrain", 100, three)
