"""Restoring checkpoints from the bucket: newest complete one, every byte verified, unsafe archives refused."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from conftest import crc32c_b64, fake_checkpoint
from trainer.checkpoint.store import CheckpointStore
from trainer.storage import open_storage
from trainer.checkpoint.layout import MANIFEST
from trainer.checkpoint.layout import read_upload_state as read_state
from trainer.checkpoint.remote import remote_checkpoints
from trainer.upload.restore import RestoreFailed, restore, restore_newest
from trainer.upload.uploader import CheckpointUploader


def _files(ckpt: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in ckpt.iterdir() if p.name != "upload_state.json"}


@pytest.mark.parametrize("compression", ["none", "zstd", "gzip"])
def test_fresh_machine_gets_the_newest_checkpoint_back_byte_for_byte(backend, tmp_path: Path, compression: str) -> None:
    url, _ = backend
    if compression != "none" and backend[1] is not None and backend[1].kind == "gcp-storage-emulator":
        # compressed parts have no size up front: on GCS they take GCSStorage.writer (PipelinedWriter), run here
        # against fake-gcs-server; a second emulator adds nothing the uncompressed case does not
        pytest.skip("compressed parts over GCS: covered against fake-gcs-server")
    storage = open_storage(url)
    old = fake_checkpoint(tmp_path / "vm1" / "run1", 10, world=2)
    new = fake_checkpoint(tmp_path / "vm1" / "run1", 20, world=2)
    for ckpt in (old, new):
        CheckpointUploader(storage, compression, workers=3).upload(ckpt)
    assert [p for p, _ in remote_checkpoints(storage)] == ["run1/step-00000020", "run1/step-00000010"]

    fresh = tmp_path / "vm2"  # an empty run_dir on another machine
    restored = restore_newest(storage, fresh)
    assert restored == fresh / "run1" / "checkpoints" / "step-00000020"
    assert _files(restored) == _files(new)
    assert [c.tag for c in CheckpointStore(fresh / "run1").committed()] == ["step-00000020"]
    assert read_state(restored)["state"] == "uploaded"  # retention may delete it: it is in the bucket
    assert not list((fresh / "run1" / "checkpoints").glob(".*"))  # no staging or download left over


@pytest.mark.parametrize("where", ["file", "padding"])
def test_a_damaged_checkpoint_is_skipped_for_the_next_older(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """One flipped byte in a stored part: inside a file (that file's CRC32C, checked as it is unpacked) or in
    the tar's end padding, which no file covers (the part's CRC32C, checked over every byte streamed)."""
    storage = open_storage(f"file://{tmp_path / 'bucket'}")
    for step in (10, 20):
        CheckpointUploader(storage, "none", workers=2).upload(fake_checkpoint(tmp_path / "vm1" / "run1", step))
    part = tmp_path / "bucket" / "run1" / "step-00000020" / "part-000.tar"
    data = bytearray(part.read_bytes())
    data[5000 if where == "file" else len(data) - 1] ^= 0xFF
    part.write_bytes(bytes(data))
    restored = restore_newest(storage, tmp_path / "vm2")
    assert restored is not None and restored.name == "step-00000010"
    said = {
        "file": "does not match the manifest after unpacking",
        "padding": "part part-000.tar does not match the manifest",
    }
    assert "skipping" in caplog.text and said[where] in caplog.text, caplog.text
    assert not (tmp_path / "vm2" / "run1" / "checkpoints" / "step-00000020").exists()


def test_restore_from_a_gcs_emulator_after_tampering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The object replaced behind the manifest's back: the client's download check passes (the server's
    CRC32C is of the new bytes), the manifest's does not."""
    from storage_servers import BUCKET, Emulator

    emu = Emulator("fake-gcs-server", tmp_path / "emu").start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
    try:
        storage = open_storage(f"gs://{BUCKET}/ckpts")
        CheckpointUploader(storage, "none", workers=1).upload(fake_checkpoint(tmp_path / "vm1" / "run1", 10))
        name = "run1/step-00000010/part-000.tar"
        data = bytearray(storage.get_bytes(name))
        data[-20_000] ^= 1
        storage.delete(name)
        storage.put_bytes(name, bytes(data))
        with pytest.raises(RestoreFailed, match="does not match the manifest"):
            ((prefix, manifest),) = remote_checkpoints(storage)
            restore(storage, prefix, manifest, tmp_path / "vm2")
        assert restore_newest(storage, tmp_path / "vm2") is None
    finally:
        emu.stop()


def _forged_upload(storage, tmp_path: Path, members: list[tarfile.TarInfo], payloads: dict[str, bytes]) -> None:  # type: ignore[no-untyped-def]
    """A manifest that vouches for an archive holding whatever we put in it (checksums right)."""
    ckpt = fake_checkpoint(tmp_path / "vm1" / "run1", 30)
    meta = json.loads((ckpt / "metadata.json").read_text())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(payloads.get(m.name, b"")) if m.isfile() else None)
    raw = buf.getvalue()
    storage.put_bytes("run1/step-00000030/part-000.tar", raw)
    files = [
        {"path": m.name, "size": m.size, "crc32c": crc32c_b64(payloads.get(m.name, b"")), "part": "part-000.tar"}
        for m in members
    ]
    manifest = {
        "format": 1,
        "run_id": "run1",
        "tag": "step-00000030",
        "step": 30,
        "compression": "none",
        "bytes": sum(f["size"] for f in files),
        "files": files,
        "checkpoint": meta,
        "parts": [{"name": "part-000.tar", "size": len(raw), "crc32c": crc32c_b64(raw)}],
    }
    storage.put_bytes(f"run1/step-00000030/{MANIFEST}", json.dumps(manifest).encode())


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_archives_are_refused_and_nothing_escapes(tmp_path: Path, kind: str) -> None:
    storage = open_storage(f"file://{tmp_path / 'bucket'}")
    evil = b"overwrite me"
    if kind == "symlink":
        m = tarfile.TarInfo("metadata.json")
        m.type, m.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        m = tarfile.TarInfo("../../../escaped.txt" if kind == "dotdot" else str(tmp_path / "escaped.txt"))
        m.size = len(evil)
    _forged_upload(storage, tmp_path, [m], {m.name: evil})
    ((prefix, manifest),) = remote_checkpoints(storage)
    with pytest.raises(RestoreFailed, match="unsafe or unexpected archive member"):
        restore(storage, prefix, manifest, tmp_path / "vm2" / "runs")
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "vm2" / "runs" / "run1" / "checkpoints" / "step-00000030").exists()


def test_a_member_the_manifest_does_not_name_is_refused(tmp_path: Path) -> None:
    storage = open_storage(f"file://{tmp_path / 'bucket'}")
    CheckpointUploader(storage, "none", workers=1).upload(fake_checkpoint(tmp_path / "vm1" / "run1", 10))
    raw = json.loads(storage.get_bytes(f"run1/step-00000010/{MANIFEST}"))
    raw["files"] = [f for f in raw["files"] if f["path"] != "metadata.json"]  # the archive holds one file more
    (tmp_path / "bucket" / "run1" / "step-00000010" / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(RestoreFailed, match="unexpected archive member 'metadata.json'"):
        restore(storage, "run1/step-00000010", raw, tmp_path / "vm2")
    shutil.rmtree(tmp_path / "vm1")


def test_training_resumes_from_the_bucket_on_a_fresh_machine_exactly(tiny_config: Path, tmp_path: Path) -> None:
    """4 steps uploaded, the machine lost, `--resume auto` on an empty run_dir continues to 8: the losses
    and weights equal those of 8 uninterrupted steps, bit for bit."""
    import yaml

    from conftest import run_rank
    from storage_servers import BUCKET, Emulator

    emu = Emulator("fake-gcs-server", tmp_path / "emu").start()
    env = {"STORAGE_EMULATOR_HOST": emu.url}
    try:
        cfg = yaml.safe_load(tiny_config.read_text())
        cfg["train"].update({"max_steps": 8, "log_every": 1})
        cfg["optim"]["decay_steps"] = 8
        cfg["checkpoint"].update({"save_every": 4, "keep_last": 5})
        cfg["upload"] = {"url": f"gs://{BUCKET}/ckpts", "workers": 2}
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(cfg))
        straight, vm1, vm2 = tmp_path / "straight", tmp_path / "vm1", tmp_path / "vm2"
        r = run_rank("--config", str(config), "--set", f"run_dir={straight}", "--set", "upload.url=null", env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        r = run_rank("--config", str(config), "--set", f"run_dir={vm1}", "--max-steps", "4", env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        shutil.rmtree(vm1)  # the VM is gone; only the bucket remains
        r = run_rank("--config", str(config), "--set", f"run_dir={vm2}", "--resume", "auto", env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "restored" in r.stdout and "resumed from" in r.stdout and "at step 4" in r.stdout
        (a,), (b,) = list(straight.glob("*/checkpoints/step-00000008")), list(vm2.glob("*/checkpoints/step-00000008"))
        ma, mb = (json.loads((p / "metadata.json").read_text()) for p in (a, b))
        assert [s for s, _ in mb["loss_history"]] == list(range(1, 9))
        assert ma["loss_history"] == mb["loss_history"] and ma["lr_history"] == mb["lr_history"]
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        wa, wb = (get_fp32_state_dict_from_zero_checkpoint(str(p.parent), tag=p.name) for p in (a, b))
        assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    finally:
        emu.stop()
