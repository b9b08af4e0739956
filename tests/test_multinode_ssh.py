"""Multi-node as users run it: DeepSpeed's runner reaching two nodes through pdsh and a real sshd (tests/sshbed.py).

node-a is this machine's view; node-b has its own disk for the run folder, so every node keeps its own
checkpoint files, uploads them itself, and writes its own node log, as on two VMs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from storage_servers import BUCKET, Emulator

pytestmark = pytest.mark.launcher

GRACE_S = 20


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory):
    emu = Emulator("fake-gcs-server", tmp_path_factory.mktemp("mn-emu")).start()
    yield emu
    emu.stop()


def write_cfg(tiny_shards: Path, path: Path, run_dir: Path, url: str, **train: object) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "pretrain_tiny.yaml").read_text())
    cfg["data"]["path"] = str(tiny_shards)
    cfg["run_dir"] = str(run_dir)
    cfg["tracking"]["enabled"] = False
    cfg["optim"].update(warmup_steps=2, decay_steps=200)  # the LR does not depend on max_steps: resumes may change it
    cfg["train"].update(log_every=1, **train)
    cfg["eval"].update(every=10, batches=2)
    cfg["checkpoint"].update(save_every=100000, keep_last=3)
    cfg["upload"]["url"] = url
    cfg["preemption"] = {"grace_s": GRACE_S}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def committed(run_dir: Path) -> list[Path]:
    return sorted(p.parent for p in run_dir.glob("*/checkpoints/step-*/metadata.json"))


def meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "metadata.json").read_text())


def read_until(proc: subprocess.Popen, pred, timeout: float = 300) -> str:  # type: ignore[no-untyped-def]
    """The job's output up to the first line for which `pred(line)` holds; fails fast if the job ends first."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line and proc.poll() is not None:
            raise AssertionError(f"the job ended ({proc.returncode}) first:\n" + "".join(seen)[-4000:])
        seen.append(line)
        if pred(line):
            return "".join(seen)
    raise AssertionError("timed out:\n" + "".join(seen)[-4000:])


def step_at_least(n: int):  # type: ignore[no-untyped-def]
    import re

    def pred(line: str) -> bool:
        m = re.search(r"\] step (\d+)/", line)
        return bool(m) and int(m.group(1)) >= n

    return pred


def ranks_of(cfg: Path) -> list:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            cmd = p.cmdline()
            if (
                str(cfg) in cmd
                and any(a.startswith("--local_rank") for a in cmd)
                and p.status() != psutil.STATUS_ZOMBIE
            ):
                out.append(p)
        except psutil.Error:
            pass
    return out


def wait_ranks_gone(cfg: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while ranks_of(cfg) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = ranks_of(cfg)
    for p in left:
        p.kill()
    assert not left, f"ranks still running {timeout:.0f} s after the signal: {[p.pid for p in left]}"


def trainer_train(bed, cfg: Path, hostfile: Path, *args: str, env: dict | None = None) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.cli.main", "train", str(cfg), "--hostfile", str(hostfile), *args],
        cwd=REPO,
        env=bed.env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_nodes_over_ssh_stop_save_upload_and_resume_exactly(
    ssh_bed, tiny_shards: Path, tmp_path: Path, emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's `deepspeed --hostfile` command and `trainer train --hostfile` on two nodes (1 rank each):

    - reference: `trainer train --hostfile` to step 40 uninterrupted, exit 0;
    - the same run started with `deepspeed --hostfile hostfile launch/train.py` (settings for the remote ranks in
      `.deepspeed_env`, as documented), SIGTERM to that runner mid-run: both nodes stop on one step, each commits
      and uploads its own files, and the ranks are gone within the grace period (the runner itself exits at once);
    - `trainer train --hostfile` continues it (every setting the ranks need forwarded by it, a secret masked),
      SIGTERM to trainer train: 75, rank 0's code, after the ranks stopped and uploaded;
    - node-b, which held only its own rank's files, fetched the model states from the bucket; then node-b is replaced
      by a fresh VM (its disk wiped) and `trainer train --hostfile` again restores the checkpoint there and finishes: 0.
      The losses and learning rates equal the reference's at every step; each node's log is on its own disk, and
      `trainer monitor --node 1` reads node-b's over ssh.
    """
    from trainer.checkpoint.remote import verify_remote
    from trainer.storage import open_storage

    bed = ssh_bed
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    hostfile = bed.hostfile(tmp_path / "hostfile")
    url = f"gs://{BUCKET}/mn-{uuid.uuid4().hex[:6]}"
    storage = open_storage(url)

    # its own bucket prefix: with the same one, the run below would start from this run's checkpoint, as --resume auto
    # does on a fresh VM
    ref_cfg = write_cfg(tiny_shards, tmp_path / "ref.yaml", bed.disk / "ref", f"{url}-ref", max_steps=40)
    ref = trainer_train(bed, ref_cfg, hostfile)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-4000:]
    (ref_final,) = committed(bed.disk / "ref")
    assert ref_final.name == "step-00000040"

    # 1. The README's command, run by hand: the ranks' settings come from .deepspeed_env
    work = tmp_path / "work"
    work.mkdir()
    env_lines = {k: os.environ[k] for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR")}
    env_lines["STORAGE_EMULATOR_HOST"] = emulator.url
    (work / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in env_lines.items()))
    (work / "hostfile").write_text(hostfile.read_text())
    cfg = write_cfg(tiny_shards, tmp_path / "run.yaml", bed.disk / "runs", url, max_steps=100000)
    deepspeed = Path(sys.executable).parent / "deepspeed"
    runner = subprocess.Popen(
        [str(deepspeed), "--hostfile", "hostfile", str(REPO / "launch" / "train.py"), "--config", str(cfg)],
        cwd=work,
        env=bed.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = read_until(runner, step_at_least(10))
    assert "node-b:" in seen and "Running on the following workers: node-a,node-b" in seen
    t0 = time.monotonic()
    runner.send_signal(signal.SIGTERM)
    rest, _ = runner.communicate(timeout=60)
    runner_s = time.monotonic() - t0
    assert runner.returncode == 1, rest[-3000:]  # DeepSpeed's runner: pdsh killed, launchers pkilled, exit 1
    wait_ranks_gone(cfg, GRACE_S)
    (a1,) = committed(bed.node_disk("node-a") / "runs")
    (b1,) = committed(bed.node_disk("node-b") / "runs")
    s1 = meta(a1)["step"]
    assert a1.name == b1.name and meta(a1)["reason"] == meta(b1)["reason"] == "preemption" and s1 >= 10
    assert (a1 / "rng_state_rank00000.pt").is_file() and not (a1 / "rng_state_rank00001.pt").exists()
    assert (b1 / "rng_state_rank00001.pt").is_file() and not (b1 / "rng_state_rank00000.pt").exists()
    run_a = a1.parent.parent
    run_b = bed.node_disk("node-b") / "runs" / run_a.name
    ok, why, manifest = verify_remote(storage, f"{run_a.name}/{a1.name}")
    assert ok, why
    assert any(p["name"].startswith("node01-part-") for p in manifest["parts"])  # node-b saw the emulator
    # each node's log on its own disk: the node's first rank at info, how it left
    log_a = (run_a / "logs" / "node-0-node-a.log").read_text()
    log_b = (run_b / "logs" / "node-1-node-b.log").read_text()
    assert f"stopped at step {s1}" in log_a and "rank 0 exits with code 75" in log_a
    assert f"stopped at step {s1}" in log_b and "rank 1 exits with code 75" in log_b, log_b[-2000:]
    assert not (run_a / "logs" / "node-1-node-b.log").exists()
    assert (bed.node_disk("node-b") / "runs" / "latest-node-1.log").resolve() == (run_b / "logs" / "node-1-node-b.log")
    assert json.loads((run_a / "logs" / "nodes.json").read_text()) == {"hosts": ["node-a", "node-b"]}

    # 2. trainer train --hostfile continues it; SIGTERM to it. No .deepspeed_env here: trainer train forwards.
    secret = f"pw-{uuid.uuid4().hex}"
    job = trainer_train(bed, cfg, hostfile, "--max-steps", "40", env={**os.environ, "MLFLOW_TRACKING_PASSWORD": secret})
    seen = read_until(job, step_at_least(s1 + 5))
    assert f"resumed from {a1}" in seen
    t0 = time.monotonic()
    job.send_signal(signal.SIGTERM)
    rest, _ = job.communicate(timeout=120)
    stop_s = time.monotonic() - t0
    out = seen + rest
    assert job.returncode == 75, out[-4000:]
    assert "node-a: trainer: rank 0 exit code 75" in out  # rank 0's own code, back through pdsh
    assert stop_s < GRACE_S, stop_s
    assert not ranks_of(cfg)
    assert secret not in out and "MLFLOW_TRACKING_PASSWORD=***" in out
    env_file = next(
        line.split("deepspeed_env file = ")[1].strip() for line in out.splitlines() if "deepspeed_env file = " in line
    )
    assert not Path(env_file).exists()  # the private env file lived only as long as the job
    a2 = committed(bed.node_disk("node-a") / "runs")[-1]
    s2 = meta(a2)["step"]
    assert s1 < s2 < 40 and meta(a2)["reason"] == "preemption"
    assert (run_b / "checkpoints" / a2.name / "metadata.json").is_file()
    ok, why, manifest = verify_remote(storage, f"{run_a.name}/{a2.name}")
    assert ok, why
    assert any(p["name"].startswith("node01-part-") for p in manifest["parts"])  # forwarded: node-b saw the emulator

    # node-b had only its own rank's files: it fetched the model states rank 0 wrote, from the bucket
    assert f"fetching 1 file(s) of {a1.name} that this node lacks" in (run_b / "logs" / "node-1-node-b.log").read_text()

    # 3. node-b replaced by a fresh VM (an empty disk), and the same command again, to the end
    import shutil

    shutil.rmtree(run_b)
    job = trainer_train(bed, cfg, hostfile, "--max-steps", "40")
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-4000:]
    final = committed(bed.node_disk("node-a") / "runs")[-1]
    assert final.name == "step-00000040" and (run_b / "checkpoints" / final.name / "metadata.json").is_file()
    ok, why, _ = verify_remote(storage, f"{run_a.name}/{final.name}")
    assert ok, why
    assert f"restored {a2}" in (run_b / "logs" / "node-1-node-b.log").read_text()  # (its path as node-b sees it)
    m, r = meta(final), meta(ref_final)
    assert [s for s, _ in m["loss_history"]] == list(range(1, 41))
    assert m["loss_history"] == r["loss_history"]  # bitwise, across two SIGTERMs on two nodes
    assert m["lr_history"] == r["lr_history"] and m["val_history"] == r["val_history"]
    for d in (bed.node_disk("node-a"), bed.node_disk("node-b")):  # the secret is in no file of either node
        for f in d.rglob("*"):
            if f.is_file() and not f.is_symlink():
                assert secret.encode() not in f.read_bytes(), f

    # trainer monitor: node 1's log lives on node-b only; it is read over ssh
    r1 = run_cli("monitor", str(run_a), "--node", "1", "--once", "-n", "400", env=bed.env())
    assert r1.returncode == 0, r1.stderr
    assert "[rank1]" in r1.stdout and "rank 1 exits with code 0" in r1.stdout
    r0 = run_cli("monitor", str(run_a), "--node", "0", "--once", env=bed.env())
    assert r0.returncode == 0 and "rank 0 exits with code 0" in r0.stdout
    r2 = run_cli("monitor", str(run_a), "--node", "2", "--once", env=bed.env())
    assert r2.returncode == 2 and "no log of node 2 here" in r2.stderr and "the run had 2 node(s)" in r2.stderr
    print(f"SIGTERM over pdsh: runner exit {runner_s:.1f} s; trainer train stop to exit {stop_s:.1f} s")


def test_a_rank_failing_on_the_second_node_ends_the_job_with_its_error(
    ssh_bed, tiny_shards: Path, tmp_path: Path
) -> None:
    """node-b's disk cannot hold the run folder (a file where the folder goes): its rank crashes; the job ends
    with 1 instead of hanging, node-b's error line shown with the node named."""
    bed = ssh_bed
    hostfile = bed.hostfile(tmp_path / "hostfile")
    cfg = write_cfg(tiny_shards, tmp_path / "fail.yaml", bed.disk / "fail", None, max_steps=20)  # type: ignore[arg-type]
    bed.node_disk("node-b").joinpath("fail").write_text("not a folder\n")
    try:
        t0 = time.monotonic()
        job = trainer_train(bed, cfg, hostfile)
        out, _ = job.communicate(timeout=300)
        assert job.returncode == 1, out[-4000:]
        assert time.monotonic() - t0 < 120
        assert "node-b: " in out and "Traceback" in out
        assert "node-a: trainer: rank 0 exit code 1" in out  # rank 0 failed its next collective
        summary = [line for line in out.splitlines() if line.startswith("trainer: node node-b exited with 1: ")]
        assert len(summary) == 1 and "NotADirectoryError" in summary[0], out[-3000:]
        assert not ranks_of(cfg)
    finally:
        bed.node_disk("node-b").joinpath("fail").unlink()


def test_trainer_train_names_the_hosts_ssh_cannot_reach(ssh_bed, tiny_config: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-c slots=1\n")
    r = run_cli("train", str(tiny_config), "--hostfile", str(hostfile), env=ssh_bed.env())
    assert r.returncode == 2
    assert r.stderr.strip().startswith(f"error: {hostfile}: host node-c is not reachable by ssh without a password:"), (
        r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_doctor_checks_the_machine_the_bucket_and_every_host(
    ssh_bed, tiny_config: Path, tmp_path: Path, emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.storage import open_storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\nnode-c slots=1\n")
    url = f"gs://{BUCKET}/doctor-{uuid.uuid4().hex[:6]}"
    r = run_cli(
        "doctor", str(tiny_config), "--hostfile", str(hostfile), "--set", f"upload.url={url}", env=ssh_bed.env()
    )
    assert r.returncode == 1, r.stdout + r.stderr
    checks = [line for line in r.stdout.splitlines() if line.startswith(("PASS  ", "FAIL  "))]
    lines = {line[6:21].strip(): line for line in checks}  # the name column
    for name in (
        "torch",
        "cuda",
        "deepspeed",
        "deepspeed ops",
        "disk",
        "bucket",
        "mlflow",
        "pdsh",
        "host node-a",
        "host node-b",
    ):
        assert lines[name].startswith("PASS"), r.stdout
    assert lines["host node-c"].startswith("FAIL") and "node-c" in lines["host node-c"]
    assert "ranks train on the CPU over gloo" in lines["cuda"]
    assert "listed, created and deleted a probe object" in lines["bucket"]
    assert "a checkpoint is" in lines["disk"] and "estimated from the model" in lines["disk"]
    assert open_storage(url).list("") == []  # the probe is gone
    assert [c[:4] for c in checks].count("FAIL") == 1
    assert r.stdout.strip().splitlines()[-1] == f"{len(checks) - 1}/{len(checks)} checks passed"


def test_trainer_train_without_pdsh_says_so_in_one_line(tiny_config: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    env = {"PATH": str(Path(sys.executable).parent)}  # no pdsh on this PATH
    r = run_cli("train", str(tiny_config), "--hostfile", str(hostfile), env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {hostfile}: the hosts are reached through pdsh"), r.stderr
    assert "Traceback" not in r.stdout + r.stderr and not (tmp_path / "runs").exists()
