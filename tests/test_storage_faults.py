"""Storage faults from a real HTTP server: fake-gcs-server behind `FaultProxy`, which loses a chunk mid-part, refuses
writes with 403, stops answering, or closes connections, as real storage and the network between do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from conftest import REPO, TEARDOWN_S, fake_checkpoint
from storage_servers import BUCKET, Emulator, FaultProxy
from trainer.checkpoint.layout import read_upload_state
from trainer.checkpoint.remote import verify_remote
from trainer.storage import open_storage
from trainer.upload.restore import restore_newest
from trainer.upload.uploader import CheckpointUploader, UploadFailed

URL = f"gs://{BUCKET}/ckpts"


@pytest.fixture
def proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    emu = Emulator("fake-gcs-server", tmp_path / "emu").start()
    p = FaultProxy(emu.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", p.url)
    try:
        yield p
    finally:
        p.close()
        emu.stop()


def _chunk_ranges(p: FaultProxy) -> list[str]:
    return [
        rng for method, path, rng in p.log if method == "PUT" and "upload_id" in path and not rng.startswith("bytes */")
    ]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_chunk_lost_mid_part_is_sent_again_from_where_the_server_is(
    proxy: FaultProxy, tmp_path: Path, compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 MiB chunks, the third one lost on the way: the same resumable session goes on from the server's offset
    (the client seeks the part's stream back and sends that chunk again), with no re-sending of the whole part."""
    import trainer.storage.gcs

    monkeypatch.setattr(trainer.storage.gcs, "CHUNK_BYTES", 1024 * 1024)  # what TRAINER_UPLOAD_CHUNK_MB=1 sets
    ckpt = fake_checkpoint(tmp_path / "runs" / "run1", 5, size=6_000_000)
    proxy.drop_chunk = 3
    state = CheckpointUploader(open_storage(URL, retry_deadline_s=30), compression, workers=1, retries=0).upload(ckpt)
    assert state["state"] == "uploaded"
    ranges = _chunk_ranges(proxy)
    assert len(ranges) >= 6 and ranges[2] == ranges[3] and ranges[2].startswith("bytes 2097152-")  # resent in place
    assert len(ranges) == len(set(ranges)) + 1  # no other chunk twice: the part was not started over
    ok, why, _ = verify_remote(open_storage(URL), "run1/step-00000005")
    assert ok, why
    restored = restore_newest(open_storage(URL), tmp_path / "vm2")
    assert restored is not None
    assert all(
        (restored / p.name).read_bytes() == p.read_bytes() for p in ckpt.iterdir() if p.name != "upload_state.json"
    )


def test_a_chunk_stored_but_unanswered_never_reaches_a_manifest_corrupt(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The third chunk reaches the server but its answer is lost; the client sends it again. GCS ignores bytes it
    already has; this emulator appends them again, so the stored object is longer than the part. The CRC32C the
    client compares at the end catches it, the part is uploaded again, and the manifest names only good bytes."""
    import trainer.storage.gcs

    monkeypatch.setattr(trainer.storage.gcs, "CHUNK_BYTES", 1024 * 1024)
    ckpt = fake_checkpoint(tmp_path / "runs" / "run1", 5, size=6_000_000)
    proxy.drop_chunk, proxy.drop_after_forwarding = 3, True
    state = CheckpointUploader(
        open_storage(URL, retry_deadline_s=30), "none", workers=1, retries=1, backoff_s=0.05
    ).upload(ckpt)
    assert state["state"] == "uploaded"
    assert (
        sum(1 for method, path, _ in proxy.log if method == "POST" and "uploadType=resumable" in path) == 2
    )  # part resent
    ok, why, _ = verify_remote(open_storage(URL), "run1/step-00000005")
    assert ok, why


def test_permission_denied_fails_the_checkpoint_in_one_line_without_retrying(proxy: FaultProxy, tmp_path: Path) -> None:
    """A service account that may list and read but not write: 403 on the first write, the checkpoint is marked
    failed with the server's reason, and nothing is sent again (retrying cannot grant a permission)."""
    ckpt = fake_checkpoint(tmp_path / "runs" / "run1", 5, size=2_000_000)
    proxy.deny = {"POST", "PUT"}
    t0 = time.monotonic()
    with pytest.raises(UploadFailed) as info:
        CheckpointUploader(open_storage(URL), "none", workers=1, retries=5, backoff_s=1.0).upload(ckpt)
    assert time.monotonic() - t0 < 5  # five retries with backoff would take longer: there were none
    assert proxy.denied == 1
    st = read_upload_state(ckpt)
    assert (
        st["state"] == "failed" and st["error"] == "no permission (caller does not have storage.objects.create access)"
    )
    assert "\n" not in st["error"] and "\n" not in str(info.value)


def test_a_bucket_that_goes_away_mid_restore_is_raised_not_skipped(proxy: FaultProxy, tmp_path: Path) -> None:
    """Connections closed while the newest checkpoint downloads: after the client's retries this is raised (the
    job says so in one line), never answered by restoring an older checkpoint or starting over."""
    storage = open_storage(URL, retry_deadline_s=3)
    for step in (5, 10):
        CheckpointUploader(storage, "none", workers=1).upload(fake_checkpoint(tmp_path / "vm1" / "run1", step))
    proxy.hang("part-000")  # (the manifests still come back; the parts never do)
    proxy.hang_match, proxy.refuse = "no such path", True
    with pytest.raises(Exception) as info:
        restore_newest(storage, tmp_path / "vm2")
    from trainer.storage import describe_error, is_storage_error

    assert is_storage_error(info.value), repr(info.value)
    assert "cannot reach the storage service" in describe_error(info.value) or "storage error" in describe_error(
        info.value
    )
    assert not any((tmp_path / "vm2").rglob("metadata.json"))  # nothing restored, nothing older put in its place


def _job(cfg: Path, proxy: FaultProxy) -> subprocess.Popen:
    from trainer.launcher.command import free_port

    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "STORAGE_EMULATOR_HOST": proxy.url,
    }
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(proc: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    seen, deadline = "", time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stdout.readline()  # type: ignore[union-attr]
    assert needle in seen, seen[-3000:]
    return seen


def _sigterm(proc: subprocess.Popen) -> tuple[str, float]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return out, time.monotonic() - t0


def test_a_hung_bucket_holds_no_job_past_its_grace_period(proxy: FaultProxy, tiny_config: Path, tmp_path: Path) -> None:
    """The bucket stops answering (connections open, no replies). During uploads: a SIGTERM still ends the job within
    preemption.grace_s (+ the launcher's teardown), the checkpoints it saved named as local. During the restore on a
    fresh machine: a SIGTERM leaves at once (nothing trained yet, nothing to save), and nothing half-restored is
    listed."""
    grace = 10.0
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["train"].update(max_steps=100_000, log_every=1)
    cfg["checkpoint"].update(save_every=10, keep_last=2)
    cfg["eval"]["enabled"] = False
    cfg["upload"]["url"] = URL
    cfg["preemption"] = {"grace_s": grace}
    tiny_config.write_text(yaml.safe_dump(cfg))
    proc = _job(tiny_config, proxy)
    _read_until(proc, "uploaded step-00000010", timeout=120)
    proxy.hang()
    _read_until(proc, "queued step-", timeout=120)  # a checkpoint saved after the bucket hung
    out, took = _sigterm(proc)
    assert proc.returncode == 75, out[-3000:]
    assert took <= grace + TEARDOWN_S, (took, out[-3000:])
    assert "still local" in out and "preemption" in out

    cfg["run_dir"] = str(tmp_path / "fresh_vm")  # the same bucket, nothing local
    tiny_config.write_text(yaml.safe_dump(cfg))
    proxy.close()
    fresh = FaultProxy(proxy.upstream)
    try:
        fresh.hang("part-")  # the listing and the manifests answer, the checkpoint's parts never do
        proc = _job(tiny_config, fresh)
        _read_until(proc, "downloading step-")
        time.sleep(1.0)
        out, took = _sigterm(proc)
        assert proc.returncode == 75, out[-3000:]
        assert took <= 5.0, (took, out[-3000:])
        assert "while the job was starting: nothing trained yet, nothing to save" in out
        assert not list((tmp_path / "fresh_vm").rglob("metadata.json"))
    finally:
        fresh.close()
