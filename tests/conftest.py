"""Shared test fixtures: CPU DeepSpeed environment, tiny shards, and helpers to run the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_TINY = REPO / "configs" / "pretrain_tiny.yaml"

# Every process the tests start (CLI, launcher, ranks) runs DeepSpeed on the CPU with gloo,
# one thread per rank, and reuses the JIT-compiled ops cached in the ignored build folder.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `trainer ARGS...` as a user would (a fresh process) and capture its output."""
    return subprocess.run([sys.executable, "-m", "trainer.cli.main", *args], cwd=cwd or REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def run_rank(*args: str, cwd: Path | None = None, env: dict | None = None, port: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run launch/train.py as a single rank (RANK/WORLD_SIZE set by hand: the fast single-process path)."""
    from trainer.launcher.command import free_port

    e = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port or free_port()), **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=cwd or REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


def make_shards(out: Path, vocab: int = 512, tokens: int = 200_000, shards: int = 2, fmt: str = "npy") -> Path:
    subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic_shards.py"), "--out", str(out), "--vocab", str(vocab),
                    "--tokens", str(tokens), "--shards", str(shards), "--format", fmt], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data") / "shards")


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
