"""Uploads against file:// and two real GCS emulators, with the real google-cloud-storage client."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from conftest import TEARDOWN_S, crc32c_b64, fake_checkpoint, run_cli, run_rank
from storage_servers import BUCKET, Emulator
from trainer.checkpoint.store import CheckpointStore
from trainer.storage import open_storage
from trainer.checkpoint.layout import MANIFEST
from trainer.checkpoint.layout import read_upload_state as read_state
from trainer.checkpoint.remote import verify_remote
from trainer.upload.uploader import CheckpointUploader, UploadFailed


@pytest.mark.parametrize("compression", ["none", "zstd", "gzip"])
def test_upload_bytes_and_checksums_verify_by_download(backend, tmp_path: Path, compression: str) -> None:
    url, _ = backend
    if compression != "none" and backend[1] is not None and backend[1].kind == "gcp-storage-emulator":
        # compressed parts have no size up front: on GCS they take GCSStorage.writer (PipelinedWriter), run here
        # against fake-gcs-server; a second emulator adds nothing the uncompressed case does not
        pytest.skip("compressed parts over GCS: covered against fake-gcs-server")
    ckpt = fake_checkpoint(tmp_path / "runs" / "run1", 100, world=2)
    storage = open_storage(url)
    state = CheckpointUploader(storage, compression, workers=3).upload(ckpt)
    assert state["state"] == "uploaded" and read_state(ckpt)["state"] == "uploaded"
    names = storage.list("run1/step-00000100/")
    parts = sorted(n for n in names if "/part-" in n)
    assert len(parts) == 3 and f"run1/step-00000100/{MANIFEST}" in names
    manifest = json.loads(storage.get_bytes(f"run1/step-00000100/{MANIFEST}"))
    assert manifest["step"] == 100 and manifest["run_id"] == "run1" and manifest["compression"] == compression
    assert {f["path"] for f in manifest["files"]} == {p.name for p in ckpt.iterdir() if p.name != "upload_state.json"}
    # Download every part, check its CRC32C, unpack, and compare every file with the local bytes.
    for part in manifest["parts"]:
        raw = storage.get_bytes(f"run1/step-00000100/{part['name']}")
        assert len(raw) == part["size"] and crc32c_b64(raw) == part["crc32c"]
        if compression == "zstd":
            import zstandard

            raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
        elif compression == "gzip":
            import gzip

            raw = gzip.decompress(raw)
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                assert data == (ckpt / member.name).read_bytes()
                entry = next(f for f in manifest["files"] if f["path"] == member.name)
                assert entry["crc32c"] == crc32c_b64(data) and entry["size"] == len(data)
    assert verify_remote(storage, "run1/step-00000100")[0]


def test_manifest_is_written_last_and_reupload_is_idempotent(backend, tmp_path: Path) -> None:
    url, _ = backend
    ckpt = fake_checkpoint(tmp_path / "runs" / "run1", 7)
    storage = open_storage(url)
    order: list[str] = []
    real_put = storage.put_bytes

    def spy_put(name: str, data: bytes) -> None:
        order.append(name)
        real_put(name, data)

    storage.put_bytes = spy_put  # type: ignore[method-assign]
    seen_parts_before_manifest = []
    real_put_stream = storage.put_stream

    def spy_put_stream(name: str, stream, size: int):  # type: ignore[no-untyped-def]
        if "/part-" in name:
            assert storage.get_bytes(f"run1/step-00000007/{MANIFEST}") is None, "manifest visible before all parts"
            seen_parts_before_manifest.append(name)
        return real_put_stream(name, stream, size)

    storage.put_stream = spy_put_stream  # type: ignore[method-assign]
    CheckpointUploader(storage, "none", workers=2).upload(ckpt)
    assert order == [f"run1/step-00000007/{MANIFEST}"] and len(seen_parts_before_manifest) == 2
    again = CheckpointUploader(storage, "none", workers=2).upload(ckpt)
    assert again.get("skipped") is True and len(seen_parts_before_manifest) == 2  # nothing re-sent


def test_partial_upload_is_invisible_and_upload_all_completes_it(backend, tmp_path: Path) -> None:
    url, _ = backend
    run_root = tmp_path / "runs" / "run1"
    a = fake_checkpoint(run_root, 10)
    b = fake_checkpoint(run_root, 20)
    storage = open_storage(url)
    # A crashed upload: one stray part, no manifest. And one of a checkpoint this machine no longer has (a VM replaced
    # mid-upload): nothing will ever complete it, so upload-all removes it.
    storage.put_bytes("run1/step-00000010/part-000.tar", b"half of a tar")
    storage.put_bytes("run1/step-00000005/part-000.tar", b"a part of a checkpoint lost with its VM")
    storage.put_bytes("run1/step-00000005/part-001.tar", b"another")
    assert not verify_remote(storage, "run1/step-00000010")[0]
    env = {"STORAGE_EMULATOR_HOST": os.environ.get("STORAGE_EMULATOR_HOST", "")}
    r = run_cli("upload-all", str(run_root), "--url", url, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        "2 uploaded, 0 already verified, 0 failed, 1 incomplete upload(s) of checkpoints no longer local removed"
        in r.stdout
    )
    assert not [n for n in storage.list("run1/") if "step-00000005" in n]
    for ckpt in (a, b):
        ok, why, _ = verify_remote(storage, f"run1/{ckpt.name}")
        assert ok, why
        assert read_state(ckpt)["state"] == "uploaded"
    r = run_cli("upload-all", str(run_root), "--url", url, env=env)
    assert r.returncode == 0 and "0 uploaded, 2 already verified, 0 failed" in r.stdout
    r = run_cli("upload", "status", str(run_root))
    assert r.returncode == 0 and "2 uploaded" in r.stdout


def test_server_killed_mid_upload_fails_with_reason_then_upload_all_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    emu = Emulator("gcp-storage-emulator", tmp_path / "emu").start()  # the slower emulator: easier to catch mid-upload
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
    try:
        ckpt = fake_checkpoint(tmp_path / "runs" / "run1", 5, size=48_000_000)
        storage = open_storage(f"gs://{BUCKET}/ckpts", retry_deadline_s=3)
        up = CheckpointUploader(storage, "none", workers=2, retries=1, backoff_s=0.05)
        killed = threading.Lock()
        put_stream = storage.put_stream

        # a part's stream that kills the server on its first read: mid-upload, however fast this machine is
        class KillsTheServerOnItsFirstRead:
            def __init__(self, stream: object) -> None:
                self.stream = stream

            def read(self, *args: int) -> bytes:
                data = self.stream.read(*args)  # type: ignore[attr-defined]
                if killed.acquire(blocking=False):
                    assert read_state(ckpt)["state"] == "uploading"
                    emu.stop()  # down for the whole retry budget
                return data

            def __getattr__(self, name: str) -> object:
                return getattr(self.stream, name)

        monkeypatch.setattr(
            storage, "put_stream", lambda key, s, n: put_stream(key, KillsTheServerOnItsFirstRead(s), n)
        )
        outcome: list = []
        t = threading.Thread(target=lambda: outcome.append(_try(up.upload, ckpt)))
        t.start()
        t.join(timeout=300)
        assert killed.locked()  # the kill came mid-upload
        assert isinstance(outcome[0], UploadFailed), outcome
        st = read_state(ckpt)
        assert st["state"] == "failed" and st["error"]
        emu.start()  # the same data folder: whatever the kill left behind is still there
        assert not verify_remote(storage, "run1/step-00000005")[0]  # incomplete is invisible
        r = run_cli(
            "upload-all",
            str(tmp_path / "runs" / "run1"),
            "--url",
            f"gs://{BUCKET}/ckpts",
            env={"STORAGE_EMULATOR_HOST": emu.url},
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert verify_remote(storage, "run1/step-00000005")[0] and read_state(ckpt)["state"] == "uploaded"
    finally:
        emu.stop()


def _try(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except Exception as exc:
        return exc


def test_node_ownership_of_files() -> None:
    from trainer.upload.uploader import NodeInfo

    names = [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_3_mp_rank_00_optim_states.pt",
        "rng_state_rank00002.pt",
        "metadata.json",
    ]
    assert all(NodeInfo().owns(n) for n in names)  # one node uploads everything
    node0, node1 = NodeInfo(0, 2, 2), NodeInfo(1, 2, 2)
    assert [n for n in names if node0.owns(n)] == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "metadata.json",
    ]
    assert [n for n in names if node1.owns(n)] == [
        "zero_pp_rank_3_mp_rank_00_optim_states.pt",
        "rng_state_rank00002.pt",
    ]


def test_retention_never_deletes_what_is_not_uploaded(tmp_path: Path) -> None:
    run_root = tmp_path / "runs" / "run1"
    ckpts = [fake_checkpoint(run_root, s, loss=10.0 - s / 10) for s in (10, 20, 30, 40)]
    storage = open_storage(f"file://{tmp_path / 'bucket'}")
    CheckpointUploader(storage, "none").upload(ckpts[1])  # only step 20 is uploaded
    from trainer.checkpoint.layout import is_uploaded

    deleted = CheckpointStore(run_root).retention(keep_last=1, keep_best=True, deletable=is_uploaded)
    assert deleted == [ckpts[1]]
    assert [c.tag for c in CheckpointStore(run_root).committed()] == ["step-00000010", "step-00000030", "step-00000040"]


def test_remote_retention_keeps_newest_and_best(tmp_path: Path) -> None:
    run_root = tmp_path / "runs" / "run1"
    storage = open_storage(f"file://{tmp_path / 'bucket'}")
    up = CheckpointUploader(storage, "none", keep_remote=2)
    for step, loss in ((10, 0.5), (20, 3.0), (30, 2.0), (40, 1.0)):
        up.upload(fake_checkpoint(run_root, step, loss=loss))
    remaining = sorted({n.split("/")[1] for n in storage.list("run1/") if n.endswith(MANIFEST)})
    assert remaining == ["step-00000010", "step-00000030", "step-00000040"]  # newest two + best (step 10)
    assert not storage.list("run1/step-00000020/")


def test_bad_urls_and_buckets_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_root = tmp_path / "runs" / "run1"
    fake_checkpoint(run_root, 1)
    r = run_cli("upload-all", str(run_root), "--url", "s3://nope/x")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr
    emu = Emulator("fake-gcs-server", tmp_path / "emu").start()
    try:
        r = run_cli(
            "upload-all", str(run_root), "--url", "gs://no-such-bucket/x", env={"STORAGE_EMULATOR_HOST": emu.url}
        )
        assert r.returncode == 2 and "bucket 'no-such-bucket' does not exist" in r.stderr
    finally:
        emu.stop()
    r = run_cli(
        "upload-all", str(run_root), "--url", "gs://b/x", "--timeout", "3", env={"STORAGE_EMULATOR_HOST": emu.url}
    )  # server gone
    assert r.returncode == 2 and "cannot reach the storage service" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "runs").rglob("upload_state.json"))  # nothing written


def test_background_upload_during_training(tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real training run (one rank) uploads to the GCS emulator in the background; retention waits for uploads."""
    import yaml

    emu = Emulator("gcp-storage-emulator", tmp_path / "emu").start()
    try:
        cfg = yaml.safe_load(tiny_config.read_text())
        cfg["train"].update({"max_steps": 12, "log_every": 4})
        cfg["checkpoint"].update({"save_every": 4, "keep_last": 1})
        cfg["upload"] = {"url": f"gs://{BUCKET}/ckpts", "workers": 2}
        tiny_config.write_text(yaml.safe_dump(cfg))
        r = run_rank("--config", str(tiny_config), env={"STORAGE_EMULATOR_HOST": emu.url})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        for line in (
            "queued step-00000004 for background upload",
            "uploading step-00000004 to gs://test-bucket/ckpts/",
            "uploaded step-00000012:",
            "MB/s (verified)",
        ):
            assert line in r.stdout, line
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
        storage = open_storage(f"gs://{BUCKET}/ckpts")
        (run_root,) = [p for p in (tmp_path / "runs").iterdir() if (p / "checkpoints").is_dir()]
        for step in (4, 8, 12):
            ok, why, manifest = verify_remote(storage, f"{run_root.name}/step-{step:08d}")
            assert ok, why
            assert manifest["world_size"] == 1 and manifest["checkpoint"]["step"] == step
        assert [c.tag for c in CheckpointStore(run_root).committed()] == ["step-00000012"]
    finally:
        emu.stop()


def test_training_reads_shards_from_a_bucket(
    tiny_config: Path, tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.path gs://...: shards are downloaded once into the cache (CRC32C verified), then reused."""
    import yaml

    emu = Emulator("fake-gcs-server", tmp_path / "emu").start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
    try:
        storage = open_storage(f"gs://{BUCKET}/tokens")
        for shard in sorted(tiny_shards.iterdir()):
            storage.put_bytes(shard.name, shard.read_bytes())
        cache = tmp_path / "cache"
        cfg = yaml.safe_load(tiny_config.read_text())
        cfg["data"] = {"path": f"gs://{BUCKET}/tokens", "cache_dir": str(cache)}
        cfg["train"].update({"max_steps": 3, "log_every": 1})
        tiny_config.write_text(yaml.safe_dump(cfg))
        env = {"STORAGE_EMULATOR_HOST": emu.url}
        r = run_rank("--config", str(tiny_config), env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        cached = cache / BUCKET / "tokens"
        assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in tiny_shards.iterdir())
        assert all((cached / p.name).read_bytes() == p.read_bytes() for p in tiny_shards.iterdir())
        assert "2 downloaded, 0 cached" in r.stdout
        # A damaged cache file is noticed by its checksum and fetched again.
        victim = sorted(cached.iterdir())[0]
        victim.write_bytes(b"\0" * victim.stat().st_size)
        r = run_rank(
            "--config", str(tiny_config), "--max-steps", "3", "--set", f"run_dir={tmp_path / 'runs2'}", env=env
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "1 downloaded, 1 cached" in r.stdout
        assert victim.read_bytes() == (tiny_shards / victim.name).read_bytes()
        # A prefix without shards is a user error before launch.
        r = run_cli(
            "train",
            str(tiny_config),
            "--num-ranks",
            "1",
            "--dry-run",
            "--set",
            f"data.path=gs://{BUCKET}/nothing-here",
            env=env,
        )
        assert r.returncode == 2 and "no .npy or .npz shards directly under gs://test-bucket/nothing-here" in r.stderr
    finally:
        emu.stop()


@pytest.fixture
def small_disk(tmp_path: Path):
    """mount(size, read_only) -> a real tmpfs of that size; skipped where this process may not mount."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: str, read_only: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_full_at_the_destination_is_one_line_and_loses_nothing(tmp_path: Path, small_disk) -> None:
    run_root = tmp_path / "runs" / "run1"
    ckpt = fake_checkpoint(run_root, 3, size=3_000_000)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    target = small_disk("1m")
    r = run_cli("upload", "upload", str(run_root), "step-00000003", "--url", f"file://{target}/ckpts")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in r.stderr, r.stderr
    state = read_state(ckpt)
    assert state["state"] == "failed" and "No space left on device" in state["error"]
    assert "retrying" not in r.stdout + r.stderr  # a full disk is not fixed by sending the same bytes again
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.name != "upload_state.json"} == before  # nothing lost
    assert not [p for p in target.rglob("*") if p.is_file()]  # no partial part, no manifest
    # Retention still keeps it: it is not uploaded.
    from trainer.checkpoint.layout import is_uploaded

    assert CheckpointStore(run_root).retention(keep_last=0, keep_best=False, deletable=is_uploaded) == []


def test_read_only_destination_is_a_user_error_before_anything_is_written(tmp_path: Path, small_disk) -> None:
    run_root = tmp_path / "runs" / "run1"
    fake_checkpoint(run_root, 3)
    target = small_disk("1m", read_only=True)
    r = run_cli("upload-all", str(run_root), "--url", f"file://{target}")
    assert r.returncode == 2 and r.stderr.strip() == f"error: upload.url file://{target}: {target} is not writable", (
        r.stderr
    )
    assert not list(run_root.rglob("upload_state.json"))


def test_drain_before_a_deadline_takes_the_newest_first(tmp_path: Path) -> None:
    """An older upload in flight is set aside for the newest checkpoint, then finished after it."""
    import time

    from trainer.upload.background import BackgroundUploader

    run_root = tmp_path / "runs" / "run1"
    ckpts = [
        fake_checkpoint(run_root, step, size=size) for step, size in ((1, 150_000_000), (2, 1_000_000), (3, 1_000_000))
    ]
    storage = open_storage(f"file://{tmp_path / 'bucket'}")
    bg = BackgroundUploader(CheckpointUploader(storage, "none", workers=2), url=storage.url)
    for c in ckpts:
        bg.submit(c)
    deadline = time.monotonic() + 30
    while bg._child is None and time.monotonic() < deadline:  # the oldest one's upload process is running
        time.sleep(0.01)
    assert bg.pending()[0] == ckpts[0]
    bg.prioritize_newest()
    assert bg.close(timeout=120)
    assert list(bg.results) == ["step-00000003", "step-00000002", "step-00000001"]  # completion order
    assert all(read_state(c)["state"] == "uploaded" and verify_remote(storage, f"run1/{c.name}")[0] for c in ckpts)


def test_storage_killed_during_the_drain_exit_by_the_deadline_naming_local_checkpoints(
    tiny_config: Path, tmp_path: Path
) -> None:
    """SIGTERM while an upload runs, and the storage server dies too: the job still leaves within the
    grace period, exit 75, and says which checkpoints exist only on this machine."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from conftest import REPO
    from trainer.launcher.command import free_port

    emu = Emulator("gcp-storage-emulator", tmp_path / "emu").start()
    try:
        cfg = yaml.safe_load(tiny_config.read_text())
        cfg["model"] = {"vocab_size": 100_000}  # ~150 MB checkpoints: uploads take a while
        cfg["train"].update({"max_steps": 100000, "log_every": 1, "micro_batch_size": 1})
        cfg["checkpoint"].update({"save_every": 3, "keep_last": 10})
        cfg["upload"] = {"url": f"gs://{BUCKET}/ckpts", "workers": 2}
        cfg["preemption"] = {"grace_s": 8, "exit_reserve_s": 1}
        tiny_config.write_text(yaml.safe_dump(cfg))
        env = {
            **os.environ,
            "STORAGE_EMULATOR_HOST": emu.url,
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(tiny_config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen, deadline = "", time.monotonic() + 300
        while "uploading step-00000003" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stdout.readline()
        emu.stop()  # the storage is gone mid-upload...
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # ...and the VM is being preempted
        out, _ = proc.communicate(timeout=120)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 75, (seen + out)[-4000:]
        assert elapsed <= 8 + TEARDOWN_S, elapsed  # the grace, plus the teardown the contract allows
        local = [line for line in out.splitlines() if "still local" in line]
        metas = sorted((tmp_path / "runs").glob("*/checkpoints/step-*/metadata.json"))
        (emergency,) = [m.parent.name for m in metas if json.loads(m.read_text())["reason"] == "preemption"]
        assert any(f"checkpoint {emergency}: upload interrupted, still local (" in line for line in local), out[-3000:]
        assert len(local) == len(metas) >= 2  # every committed checkpoint is accounted for, with its path
        assert all(str(m.parent) in "\n".join(local) for m in metas)
    finally:
        emu.stop()


def test_a_restart_uploads_what_a_hard_stop_left_local(tiny_config: Path, tmp_path: Path) -> None:
    """An upload cut short (the VM hard-stopped mid-upload) is taken up by the next start of the job."""
    import yaml

    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["train"].update({"max_steps": 4, "log_every": 2})
    cfg["checkpoint"].update({"save_every": 4, "keep_last": 5})
    tiny_config.write_text(yaml.safe_dump(cfg))
    r = run_rank("--config", str(tiny_config))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (ckpt,) = (tmp_path / "runs").glob("*/checkpoints/step-00000004")
    (ckpt / "upload_state.json").write_text('{"state": "uploading"}')  # what a kill mid-upload leaves
    bucket = tmp_path / "bucket"
    remote = bucket / ckpt.parent.parent.name / "step-00000004"
    remote.mkdir(parents=True)
    dead = remote / ".part-000.tar.k1ll3d.partial"  # the temporary file of the killed writer, on a file:// bucket
    dead.write_bytes(b"x" * 1000)
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    live = remote / ".part-000.tar.l1v3.partial"  # touched just now: could be another writer's, left alone
    live.write_bytes(b"y")
    r = run_rank(
        "--config", str(tiny_config), "--resume", "latest", "--max-steps", "6", "--set", f"upload.url=file://{bucket}"
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step-00000004 was never uploaded completely: queued again" in r.stdout
    storage = open_storage(f"file://{bucket}")
    for tag in ("step-00000004", "step-00000006"):
        assert verify_remote(storage, f"{ckpt.parent.parent.name}/{tag}")[0], tag
    assert not dead.exists() and live.exists()


def test_a_file_damaged_after_the_save_is_never_published(tmp_path: Path) -> None:
    """The bytes sent must be those the save recorded (size and CRC32C in metadata.json): a file damaged on the local
    disk since is named, the checkpoint is marked failed, and no manifest makes the damaged copy look verified."""
    ckpt = fake_checkpoint(tmp_path / "runs" / "run1", 5)
    optim = ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0x01
    optim.write_bytes(bytes(data))
    storage = open_storage(f"file://{tmp_path / 'bucket'}/ckpts")
    with pytest.raises(UploadFailed, match="zero_pp_rank_0_mp_rank_00_optim_states.pt no longer matches"):
        CheckpointUploader(storage, "none", workers=1).upload(ckpt)
    st = read_state(ckpt)
    assert st["state"] == "failed" and "damaged on this disk since" in st["error"]
    assert not verify_remote(storage, "run1/step-00000005")[0] and MANIFEST not in " ".join(storage.list("run1/"))
