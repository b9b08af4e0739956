"""`trainer checkpoints list/show/compare/plot`, `trainer monitor` and the MLflow artifacts, against
two real runs: run A (2 CPU ranks under the launcher, ZeRO-3, MLflow on, export logged) and run B
(one rank, ZeRO-2, another learning rate), both uploading to a GCS emulator."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli, run_rank
from storage_servers import BUCKET, Emulator, free_port


@dataclass
class Runs:
    root: Path  # run_dir holding both runs
    a: Path  # run folders
    b: Path
    url: str
    env: dict
    emulator: Emulator
    live: list  # monitor snapshots taken while run A was training


def _meta(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / "metadata.json").read_text())


def _steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run.glob("checkpoints/step-*/metadata.json"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path):
    from trainer.monitor import snapshot

    tmp = tmp_path_factory.mktemp("ckpt_tools")
    emu = Emulator("fake-gcs-server", tmp / "gcs").start()
    env = {"STORAGE_EMULATOR_HOST": emu.url}
    url = f"gs://{BUCKET}/ckpts"
    root = tmp / "runs"
    base = yaml.safe_load((REPO / "configs" / "pretrain_tiny.yaml").read_text())
    base["data"]["path"] = str(tiny_shards)
    base["run_dir"] = str(root)
    base["optim"].update(warmup_steps=2, decay_steps=24)
    base["train"].update(max_steps=24, log_every=2, micro_batch_size=4)
    base["checkpoint"].update(save_every=8, keep_last=5)
    base["upload"] = {"url": url}

    cfg_a = json.loads(json.dumps(base))
    cfg_a["deepspeed"] = {"template": "zero3"}
    cfg_a["tracking"] = {"enabled": True, "log_export": True}
    (tmp / "a.yaml").write_text(yaml.safe_dump(cfg_a))
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli.main", "train", str(tmp / "a.yaml"), "--num-ranks", "2"],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    live = []
    while proc.poll() is None:  # what `trainer monitor` sees while the run trains
        for run in root.glob("*_*"):
            s = snapshot(run)
            if s.state == "running" and s.status and s.status.get("step"):
                live.append(s)
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out[-4000:]
    (a,) = [p for p in root.iterdir() if (p / "checkpoints").is_dir()]

    cfg_b = json.loads(json.dumps(base))
    cfg_b["optim"]["lr"] = 1.0e-3
    cfg_b["tracking"] = {"enabled": False}
    (tmp / "b.yaml").write_text(yaml.safe_dump(cfg_b))
    r = run_rank("--config", str(tmp / "b.yaml"), "--resume", "none", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (b,) = [p for p in root.iterdir() if (p / "checkpoints").is_dir() and p != a]
    yield Runs(root, a, b, url, env, emu, live)
    emu.stop()


def cli(runs: Runs, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env=runs.env)


def assert_user_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_list_groups_runs_newest_first_with_their_numbers(runs: Runs) -> None:
    r = cli(runs, "checkpoints", "list", str(runs.root), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["run_id"], x["step"]) for x in rows] == [(runs.b.name, s) for s in (8, 16, 24)] + [
        (runs.a.name, s) for s in (8, 16, 24)
    ]
    for x in rows:
        meta = _meta(runs.root / x["run_id"], x["step"])
        assert x["loss"] == meta["loss"] and x["epoch"] == meta["epoch"] and x["committed_at"] == meta["committed_at"]
        assert x["upload"] == "uploaded" and x["upload_detail"] == f"{runs.url}/{x['run_id']}/{x['tag']}"
        assert x["reason"] == ("final" if x["step"] == 24 else "scheduled")
    for run in (runs.a, runs.b):
        mine = [x for x in rows if x["run_id"] == run.name]
        assert [x["best"] for x in mine].count(True) == 1
        assert next(x for x in mine if x["best"])["loss"] == min(x["loss"] for x in mine)

    r = cli(runs, "checkpoints", "list", str(runs.root))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.index(f"run {runs.b.name}") < text.index(f"run {runs.a.name}")  # newest run first
    for run in (runs.a, runs.b):
        for step in (8, 16, 24):
            assert f"{_meta(run, step)['loss']:.4f}" in text
    assert text.count("★ best") == 2 and "6 checkpoint(s) in 2 run(s)" in text


def test_list_of_the_bucket_matches_the_local_runs_and_verifies(runs: Runs) -> None:
    r = cli(runs, "checkpoints", "list", runs.url, "--verify", "--json")
    assert r.returncode == 0, r.stderr
    remote = json.loads(r.stdout)
    local = json.loads(cli(runs, "checkpoints", "list", str(runs.root), "--json").stdout)
    assert [(x["run_id"], x["tag"], x["loss"]) for x in remote] == [(x["run_id"], x["tag"], x["loss"]) for x in local]
    assert {x["upload"] for x in remote} == {"verified"}
    r = cli(runs, "checkpoints", "list", str(runs.a), "--verify")  # local checkpoints, checked in their run's bucket
    assert r.returncode == 0 and r.stdout.count("verified") == 3, r.stdout + r.stderr

    # A part replaced behind the uploader's back: found, named, exit 1.
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    os.environ["STORAGE_EMULATOR_HOST"] = runs.emulator.url
    try:
        client = storage.Client(project="emulator", credentials=AnonymousCredentials())
        blob = client.bucket(BUCKET).blob(f"ckpts/{runs.b.name}/step-00000008/part-000.tar")
        original = blob.download_as_bytes()
        blob.upload_from_string(original[:-1] + bytes([original[-1] ^ 1]))
        r = cli(runs, "checkpoints", "list", runs.url, "--verify")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "NOT VERIFIED" in r.stdout and f"{runs.b.name[:8]}/step-00000008" in r.stderr
        r = cli(runs, "checkpoints", "show", f"{runs.url}/{runs.b.name}/step-00000008", "--verify")
        assert r.returncode == 1 and "part-000.tar" in r.stdout, r.stdout
    finally:
        blob.upload_from_string(original)
        del os.environ["STORAGE_EMULATOR_HOST"]


def test_show_prints_the_metadata_and_loss_statistics(runs: Runs) -> None:
    import statistics

    meta = _meta(runs.b, 16)
    r = cli(runs, "checkpoints", "show", f"{runs.b.name[:10]}/16", "-r", str(runs.root))
    assert r.returncode == 0, r.stderr
    values = [v for _, v in meta["loss_history"]]
    for expected in (
        f"step-00000016 of run {runs.b.name}",
        f"{meta['loss']:.4f}",
        f"{meta['best_loss']:.4f} at step {meta['best_step']}",
        f"{statistics.fmean(values):.4f} over {len(values)} logged points",
        f"{statistics.pstdev(values):.4f}",
        f"{meta['lr_history'][-1][1]:.3e}",
        f"{meta['tokens_seen']:,}",
        meta["config_hash"],
        f"deepspeed {meta['system']['deepspeed']}",
        "mp_rank_00_model_states.pt",
        f"uploaded {runs.url}/{runs.b.name}/step-00000016",
    ):
        assert expected in r.stdout, expected
    assert re.search(r"^world size +1 *$", r.stdout, re.M) and re.search(r"^ZeRO stage +2 *$", r.stdout, re.M), r.stdout

    r = cli(runs, "checkpoints", "show", "latest", "-r", str(runs.root), "--json")  # latest: ambiguous across runs
    assert_user_error(r, "latest", "2 runs", "RUN/latest")
    r = cli(runs, "checkpoints", "show", str(runs.a), "--json")  # a run folder: its newest checkpoint
    shown = json.loads(r.stdout)
    assert (
        shown["metadata"]["step"] == 24
        and shown["metadata"]["zero_stage"] == 3
        and shown["metadata"]["world_size"] == 2
    )
    assert shown["loss_stats"]["trend"] == "improving"
    r = cli(
        runs, "checkpoints", "show", f"{runs.url}/{runs.a.name}/step-00000008", "--json"
    )  # straight from the bucket
    assert json.loads(r.stdout)["metadata"] == _meta(runs.a, 8)


def test_compare_shows_deltas_and_only_the_config_keys_that_differ(runs: Runs) -> None:
    ma, mb = _meta(runs.a, 24), _meta(runs.b, 24)
    r = cli(runs, "checkpoints", "compare", f"{runs.a.name[:8]}/24", f"{runs.b.name[:8]}/best", "-r", str(runs.root))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"{mb['loss']:.4f} ({mb['loss'] - ma['loss']:+.4f})" in out
    assert "1 (-1)" in out  # world size 2 -> 1
    diff = json.loads(
        cli(
            runs,
            "checkpoints",
            "compare",
            f"{runs.a.name[:8]}/24",
            f"{runs.b.name[:8]}/24",
            "-r",
            str(runs.root),
            "--json",
        ).stdout
    )["config_differences"]
    assert diff["optim.lr"] == [ma["config"]["optim"]["lr"], 1.0e-3]
    assert diff["deepspeed.template"] == ["zero3", "zero2"] and "tracking.enabled" in diff
    assert "train.max_steps" not in diff and "optim.warmup_steps" not in diff
    r = cli(runs, "checkpoints", "compare", f"{runs.a.name[:8]}/24", "-r", str(runs.root))
    assert_user_error(r, "at least two")


def _png_colors(path: Path) -> tuple[tuple[int, int], set]:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        rgb = im.convert("RGB")
        return rgb.size, set(rgb.getdata())


def test_plot_writes_one_line_per_run(runs: Runs, tmp_path: Path) -> None:
    from matplotlib.colors import to_rgb

    def rgb(name: str) -> tuple:
        return tuple(round(c * 255) for c in to_rgb(name))

    out = tmp_path / "both.png"
    r = cli(runs, "checkpoints", "plot", runs.a.name[:8], runs.b.name[:8], "-r", str(runs.root), "--save", str(out))
    assert r.returncode == 0 and "plotted 2 curve(s)" in r.stdout, r.stdout + r.stderr
    size, colors = _png_colors(out)
    assert size == (1000, 600)
    assert rgb("C0") in colors and rgb("C1") in colors and rgb("C2") not in colors  # two runs, two line colours

    r = cli(runs, "checkpoints", "plot", f"{runs.b.name[:8]}/16", "-r", str(runs.root))  # no --save: next to the run
    assert r.returncode == 0, r.stderr
    written = runs.b / "curves-step-00000016.png"
    assert r.stdout.strip().endswith(str(written)) and written.is_file()
    size, colors = _png_colors(written)
    assert size == (1000, 600) and rgb("C0") in colors and rgb("C1") not in colors

    r = cli(runs, "checkpoints", "plot", runs.a.name[:8], "-r", str(runs.root), "--save", str(tmp_path / "x.jpg"))
    assert_user_error(r, "--save", ".png")


def test_monitor_shows_the_run_live_and_after_it_ended(runs: Runs) -> None:
    assert runs.live, "no status was seen while run A trained"
    seen = runs.live[-1]
    assert seen.state == "running" and 0 < seen.status["step"] <= 24 and seen.status["max_steps"] == 24
    assert seen.status["tokens_per_s"] > 0 and seen.status["eta_s"] >= 0
    assert [s.status["step"] for s in runs.live] == sorted(s.status["step"] for s in runs.live)

    r = cli(runs, "monitor", str(runs.root), "--once")  # the folder of runs: the one active last is shown (B)
    assert r.returncode == 0, r.stderr
    status = json.loads((runs.b / "status.json").read_text())
    for expected in (
        runs.b.name,
        "finished",
        "step 24/24",
        f"{status['loss']:.4f}",
        "step-00000024",
        "3 uploaded",
        "done: 24 steps",
        "goodput",
    ):
        assert expected in r.stdout, expected
    r = cli(runs, "monitor", str(runs.a), "--once", "--logs-only", "-n", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == (runs.a / "train.log").read_text().splitlines()[-6:]
    assert "done: 24 steps" in r.stdout


def test_monitor_tells_a_killed_run_from_a_running_one(tmp_path: Path) -> None:
    from trainer.runstatus import StatusWriter

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    w = StatusWriter(run, run_id="r1", task="pretrain", world_size=1, max_steps=100)
    w.fields["pid"] = dead.pid
    w.update(state="running", step=40, loss=2.5, step_time_s=0.5, tokens_per_s=1000.0, eta_s=30.0)
    (run / "train.log").write_text("line one\nstep 40/100 loss 2.5000\n")
    r = run_cli("monitor", str(tmp_path / "runs"), "--once")
    assert r.returncode == 0, r.stderr
    assert "not running" in r.stdout and "killed?" in r.stdout and "step 40/100" in r.stdout
    w.fields["pid"] = os.getpid()
    w.update()
    r = run_cli("monitor", str(run), "--once")
    assert "running: updated" in r.stdout and "ETA" in r.stdout


def test_mlflow_has_the_curves_config_and_export_of_run_a(runs: Runs) -> None:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    meta = _meta(runs.a, 24)
    client = MlflowClient(tracking_uri=f"sqlite:///{runs.root / 'mlflow.db'}")
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == f"pretrain_{meta['run_id']}"
    names = {a.path for folder in ("plots", "config", "model") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/curves.png", "config/config.yaml", "model/model.safetensors", "model/config.json"} <= names
    art = Path(client.download_artifacts(run.info.run_id, "model"))
    ckpt = runs.a / "checkpoints" / "step-00000024"
    got = AutoModelForCausalLM.from_pretrained(str(art))
    want = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)  # ZeRO-3 shards of 2 ranks
    state = got.state_dict()
    assert set(want) <= set(state)
    for k, v in want.items():
        assert torch.equal(state[k], v), k
    plot = Path(client.download_artifacts(run.info.run_id, "plots/curves.png"))
    assert _png_colors(plot)[0] == (1000, 600)


def test_bad_input_is_one_line_and_exit_2(runs: Runs, tmp_path: Path) -> None:
    root = str(runs.root)
    assert_user_error(
        cli(runs, "checkpoints", "show", "step-00000099", "-r", root), "step-00000099", "no such checkpoint"
    )
    assert_user_error(cli(runs, "checkpoints", "show", "zzzz/8", "-r", root), "zzzz", "no run")
    assert_user_error(
        cli(runs, "checkpoints", "show", f"{runs.a.name[:8]}/12", "-r", root),
        "no checkpoint '12'",
        "it has step-00000008",
    )
    (tmp_path / "empty").mkdir()
    assert_user_error(cli(runs, "checkpoints", "list", str(tmp_path / "empty")), "no committed checkpoints")
    assert_user_error(cli(runs, "checkpoints", "list", str(tmp_path / "nothing")), "no such file or folder")
    assert_user_error(cli(runs, "monitor", str(tmp_path / "empty"), "--once"), "no run")
    assert_user_error(cli(runs, "checkpoints", "list", f"gs://no-such-bucket-{os.getpid()}/x"), "does not exist")
    closed = run_cli(
        "checkpoints",
        "list",
        f"gs://{BUCKET}/ckpts",
        "--timeout",
        "2",
        env={"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}"},
    )
    assert_user_error(closed, "cannot reach")

    # A corrupt metadata file: the other checkpoints are still listed; the bad one is named, exit 2.
    copy = tmp_path / "copy"
    shutil.copytree(runs.a, copy / runs.a.name)
    bad = copy / runs.a.name / "checkpoints" / "step-00000016" / "metadata.json"
    bad.write_text('{"step": 16, "run_id": ')
    r = cli(runs, "checkpoints", "list", str(copy))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "step-00000008" in r.stdout and "step-00000024" in r.stdout and "step-00000016" not in r.stdout
    assert r.stderr.strip() == f"error: {bad}:1: corrupt checkpoint metadata (Expecting value)"
    assert_user_error(cli(runs, "checkpoints", "show", str(bad.parent)), str(bad), "corrupt")

    # Export reads local shards only; a checkpoint named by its bucket URL is refused, nothing written.
    out = tmp_path / "export"
    r = cli(runs, "export", f"{runs.url}/{runs.a.name}/step-00000008", "--out", str(out))
    assert_user_error(r, "in the bucket", "restore it first")
    assert not out.exists()
    # A checkpoint whose metadata carries no loss history has nothing to plot.
    bare = copy / runs.a.name / "checkpoints" / "step-00000008"
    meta = json.loads((bare / "metadata.json").read_text())
    meta.pop("loss_history")
    (bare / "metadata.json").write_text(json.dumps(meta))
    r = cli(runs, "checkpoints", "plot", str(bare), "--save", str(tmp_path / "none.png"))
    assert_user_error(r, "no logged loss to plot")
    assert not (tmp_path / "none.png").exists()


def test_a_stopping_job_shows_as_stopping_while_its_process_lives() -> None:
    """status.json says "stopping" between the agreed stop and the exit (saving, draining uploads): the monitor
    shows that state, not a failure, and "not running" once the process is gone without a final state."""
    import platform

    from trainer.monitor import _state
    from trainer.runstatus import JobState

    alive = {"state": JobState.STOPPING.value, "pid": os.getpid(), "host": platform.node(), "updated_at": time.time()}
    assert _state(alive)[0] == "stopping"
    ended = subprocess.Popen(["true"])
    ended.wait()  # exited and reaped: its pid names no process
    assert _state({**alive, "pid": ended.pid})[0] == "not running"
    assert _state({**alive, "state": JobState.STOPPED.value, "stop_signal": "SIGTERM"})[0] == "stopped"
