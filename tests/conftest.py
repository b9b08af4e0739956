"""Shared test fixtures: CPU DeepSpeed environment, tiny shards, and helpers to run the real CLI."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage_servers import BUCKET, Emulator
from trainer.checkpoint.store import CheckpointStore

REPO = Path(__file__).resolve().parents[1]
CONFIG_TINY = REPO / "configs" / "pretrain_tiny.yaml"

# Every process the tests start (CLI, launcher, ranks) runs DeepSpeed on the CPU with gloo,
# one thread per rank, and reuses the JIT-compiled ops cached in the ignored build folder.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _shm_buffers() -> set[str]:
    shm = Path("/dev/shm")
    return {f.name for f in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


@pytest.fixture(autouse=True, scope="module")
def no_shared_memory_left_behind_by_the_module():
    """The same for runs that module-scoped fixtures make (set up before, and torn down after, any test's own check)."""
    before = _shm_buffers()
    yield
    left = sorted(_shm_buffers() - before)
    assert not left, f"left in /dev/shm by this module's shared runs: {left}"


@pytest.fixture(autouse=True)
def no_shared_memory_left_behind():
    """However a test's ranks end (done, SIGTERM, SIGKILL), they leave no DeepSpeed segments in /dev/shm (RAM)."""
    before = _shm_buffers()
    yield
    left = sorted(_shm_buffers() - before)
    assert not left, f"left in /dev/shm: {left}"


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `trainer ARGS...` as a user would (a fresh process) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli.main", *args],
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_rank(
    *args: str, cwd: Path | None = None, env: dict | None = None, port: int | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run launch/train.py as a single rank (RANK/WORLD_SIZE set by hand: the fast single-process path)."""
    from trainer.launcher.command import free_port

    e = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port or free_port()),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *args],
        cwd=cwd or REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_shards(out: Path, vocab: int = 512, tokens: int = 200_000, shards: int = 2, fmt: str = "npy") -> Path:
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_synthetic_shards.py"),
            "--out",
            str(out),
            "--vocab",
            str(vocab),
            "--tokens",
            str(tokens),
            "--shards",
            str(shards),
            "--format",
            fmt,
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data") / "shards")


@pytest.fixture(scope="session")
def tiny_mm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny multimodal fixtures (Qwen2 folder, Phase 1 checkpoint, JSONL with images, audio, text), made offline."""
    out = tmp_path_factory.mktemp("tiny_mm")
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_tiny_multimodal.py"), "--out", str(out), "--samples", "32"],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    return out


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_shards: Path) -> Path:
    """A copy of configs/pretrain_tiny.yaml pointing at the test shards and a temporary run_dir."""
    import yaml

    cfg = yaml.safe_load(CONFIG_TINY.read_text())
    cfg["data"]["path"] = str(tiny_shards)
    cfg["run_dir"] = str(tmp_path / "runs")
    cfg["tracking"]["enabled"] = False
    cfg["optim"]["warmup_steps"] = 2  # the tests train for a handful of steps
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# The contract a stopped job keeps, and so the only bound a test puts on a stop: exit within preemption.grace_s plus
# the launcher's teardown, which the default grace (25 s) leaves of a preemptible VM's 30 s. Not a guess at how fast
# this machine is: a busy machine that takes longer breaks the contract a VM would enforce.
TEARDOWN_S = 5.0

# Checkpoint uploads: the same tests run against file:// and two real GCS emulators.
BACKENDS = ["file", "fake-gcs-server", "gcp-storage-emulator"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(upload URL, emulator or None) with STORAGE_EMULATOR_HOST set for the GCS emulators."""
    if request.param == "file":
        monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
        yield f"file://{tmp_path / 'bucket'}/ckpts", None
        return
    emu = Emulator(request.param, tmp_path / request.param).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
    try:
        yield f"gs://{BUCKET}/ckpts", emu
    finally:
        emu.stop()


def fake_checkpoint(
    run_root: Path, step: int, world: int = 1, size: int = 300_000, loss: float = 1.0, **meta: object
) -> Path:
    """A committed checkpoint folder with DeepSpeed-like file names and random bytes (`meta`: more metadata)."""
    store = CheckpointStore(run_root)
    d = store.path(f"step-{step:08d}")
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(size))
    for r in range(world):
        (d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(size // 2))
        (d / f"rng_state_rank{r:05d}.pt").write_bytes(os.urandom(100))
    store.commit(
        d.name,
        {
            "step": step,
            "tag": d.name,
            "run_id": run_root.name,
            "loss": loss,
            "world_size": world,
            "zero_stage": 2,
            "config_hash": "abc",
            **meta,
        },
        {"config.yaml": "task: pretrain\n"},
    )
    return d


def crc32c_b64(data: bytes) -> str:
    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


@pytest.fixture(scope="session")
def ssh_bed(tmp_path_factory: pytest.TempPathFactory):
    """Two nodes reached over a real sshd and pdsh on this machine (tests/sshbed.py); skipped, saying why, where
    sshd cannot run."""
    import sshbed

    why = sshbed.unavailable()
    if why:
        pytest.skip(why)
    bed = sshbed.SshBed(tmp_path_factory.mktemp("sshbed")).start()
    yield bed
    bed.stop()
