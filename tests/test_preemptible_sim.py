"""The preemption simulator, briefly: random SIGTERM/SIGKILL stops and restarts of a 2-rank job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.launcher
def test_random_stops_and_restarts_end_where_an_uninterrupted_run_does(tiny_config: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "preemptible_sim.py"),
            str(tiny_config),
            "--trials",
            "3",
            "--max-steps",
            "30",
            "--save-every",
            "4",
            "--sigkill-prob",
            "0.5",
            "--fresh-prob",
            "0.5",
            "--seed",
            "3",
            "--workdir",
            str(tmp_path / "sim"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert (
        "losses per step equal to the reference: True; learning rates equal: True; final fp32 weights equal: True"
        in out
    )
    assert "objects in the bucket no manifest names: 0" in out
    assert "corrupt resumes or lost checkpoints: 0" in out and "verdict: PASS" in out
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) >= 1
