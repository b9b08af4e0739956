"""Real training runs: the `deepspeed` launcher with 2 CPU ranks (gloo) for ZeRO stages 1-3, exact resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TEARDOWN_S, run_cli


def committed(run_dir: Path) -> list[Path]:
    return sorted(p.parent for p in run_dir.glob("*/checkpoints/step-*/metadata.json"))


def metadata(ckpt: Path) -> dict:
    return json.loads((ckpt / "metadata.json").read_text())


def fp32_weights(ckpt: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def write_config(tiny_config: Path, run_dir: Path, **sections: dict) -> Path:
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["run_dir"] = str(run_dir)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    out = run_dir.parent / f"{run_dir.name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.launcher
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_resume_is_exact(tiny_config: Path, tmp_path: Path, stage: int) -> None:
    """8 uninterrupted steps == a resume from that run's step 4 to step 8: same losses, validation losses and
    weights, bit for bit.

    The step-4 checkpoint is written in the background (checkpoint.async, the default) while steps 5-8
    train; dropout makes the resumed losses depend on the restored RNG states; with stage 2 each
    step accumulates two micro-batches (the stop agreement between them runs too). Every 2 steps both
    ranks evaluate their halves of the held-out windows (data.val_fraction); under ZeRO-3 too."""
    accum = 2 if stage == 2 else 1
    cfg = write_config(
        tiny_config,
        tmp_path / "runs",
        train={"max_steps": 8, "log_every": 1, "micro_batch_size": 4, "grad_accum": accum},
        model={"dropout": 0.1},
        optim={"decay_steps": 8, "warmup_steps": 2},
        eval={"every": 2, "batches": 3},
        checkpoint={"save_every": 4, "keep_last": 5},
        deepspeed={"template": f"zero{stage}"},
    )
    r = run_cli("train", str(cfg), "--num-ranks", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "state captured in" in r.stdout and "writing" in r.stdout  # step 4 went to the background writer
    full = committed(tmp_path / "runs")
    assert [p.name for p in full] == ["step-00000004", "step-00000008"]
    assert metadata(full[0])["save"]["async"] is True and metadata(full[1])["save"]["async"] is False

    val4 = metadata(full[0])["val_loss"]
    if stage == 1:  # as a stop on step 4 leaves it: saved before step 4's evaluation, which the resume must run
        m4 = metadata(full[0])
        m4["val_history"] = m4["val_history"][:-1]
        (full[0] / "metadata.json").write_text(json.dumps(m4))
    r = run_cli("train", str(cfg), "--num-ranks", "2", "--resume", str(full[0]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    (branch,) = [p for p in committed(tmp_path / "runs") if p.parent.parent != full[0].parent.parent]
    assert branch.name == "step-00000008" and metadata(branch)["branched_from"] == str(full[0])

    ma, mb = metadata(full[-1]), metadata(branch)
    assert [s for s, _ in ma["loss_history"]] == list(range(1, 9))
    assert ma["loss_history"] == mb["loss_history"]  # bitwise: JSON floats round-trip exactly
    assert [s for s, _ in ma["val_history"]] == [0, 2, 4, 6, 8]
    assert ma["val_history"] == mb["val_history"]  # the evaluations after the resume too
    assert ma["val_loss"] == ma["val_history"][-1][1] and ma["best_metric"] == "val_loss"
    assert val4 == ma["val_history"][2][1]  # the step-4 checkpoint holds the state evaluated
    assert ma["lr_history"] == mb["lr_history"]
    assert ma["loss_history"][-1][1] < ma["loss_history"][0][1]
    assert mb["world_size"] == 2 and mb["zero_stage"] == stage
    assert mb["data_position"]["samples_seen"] == 8 * 4 * 2 * accum
    wa, wb = fp32_weights(full[-1]), fp32_weights(branch)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape and bool((wa[k] == wb[k]).all()), k
    if stage != 2:
        return
    # the same run without evaluation trains the same: losses and weights bit for bit
    off = write_config(
        tiny_config,
        tmp_path / "off",
        **{
            k: v
            for k, v in yaml.safe_load(cfg.read_text()).items()
            if k in ("train", "model", "optim", "checkpoint", "deepspeed")
        },
        eval={"enabled": False},
    )
    r = run_cli("train", str(off), "--num-ranks", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (last_off,) = [p for p in committed(tmp_path / "off") if p.name == "step-00000008"]
    assert metadata(last_off)["loss_history"] == ma["loss_history"] and not metadata(last_off)["val_history"]
    wo = fp32_weights(last_off)
    assert all(bool((wo[k] == wa[k]).all()) for k in wa)
    # the val loss at step 4 == the exported model in plain transformers over the same validation windows
    out = tmp_path / "export4"
    r = run_cli("export", str(full[0]), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(_plain_val_loss(out, tiny_config, batches=3, micro=4, world=2) - ma["val_history"][2][1]) < 1e-5


def _plain_val_loss(model_dir: Path, config: Path, batches: int, micro: int, world: int) -> float:
    """Token-weighted cross-entropy of an exported model over the evaluation subset, in one process."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import GPTNeoXForCausalLM

    from trainer.data.shards import TokenShards, WindowSplit, find_shards
    from trainer.engine.evaluate import eval_subset

    data = yaml.safe_load(config.read_text())["data"]
    shards = TokenShards(find_shards(Path(data["path"])), 128)
    split = WindowSplit(len(shards), data["val_fraction"])
    rows = np.stack(
        [shards.window(split.val_window(int(i))) for i in eval_subset(split.num_val, batches, micro, world)]
    )
    model = GPTNeoXForCausalLM.from_pretrained(str(model_dir)).eval()
    tokens = torch.from_numpy(rows)
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits
    return float(
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").double()
        / tokens[:, 1:].numel()
    )


@pytest.mark.launcher
def test_deepspeed_command_from_readme(tiny_config: Path, tmp_path: Path) -> None:
    """`deepspeed --hostfile hostfile launch/train.py --config ...` as the README writes it, then a bad resume."""
    from trainer.launcher.command import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cfg = write_config(
        tiny_config, tmp_path / "runs", train={"max_steps": 3, "log_every": 1}, checkpoint={"save_every": 3}
    )
    deepspeed = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(hostfile),
        "--no_ssh_check",
        "--master_addr",
        "127.0.0.1",
    ]
    r = subprocess.run(
        [*deepspeed, "--master_port", str(free_port()), "launch/train.py", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [p.name for p in committed(tmp_path / "runs")] == ["step-00000003"]

    # A worker-side user error reaches the caller as exit code 2 with one line, no traceback.
    single = tmp_path / "hostfile1"
    single.write_text("localhost slots=1\n")
    # (another world size is fine for ZeRO-1/2: ZeRO-3 is refused)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            str(single),
            "--no_ssh_check",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "launch/train.py",
            "--config",
            str(cfg),
            "--resume",
            "latest",
            "--max-steps",
            "6",
            "--set",
            "deepspeed.template=zero3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "saved by 2 ranks" in errors[0], r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr


def _job_process(wrapper_pid: int, target: str):  # type: ignore[no-untyped-def]
    """The process of a running `trainer train` job that gets the signal."""
    import psutil

    wrapper = psutil.Process(wrapper_pid)
    if target == "wrapper":
        return wrapper
    for p in wrapper.children(recursive=True):
        cmd = " ".join(p.cmdline())
        if (target == "launcher" and "trainer.launcher.ds_launch" in cmd) or (
            target == "worker" and "--local_rank=1" in cmd
        ):
            return p
    raise AssertionError(f"no {target} process under {wrapper_pid}")


@pytest.mark.launcher
@pytest.mark.parametrize(
    "target,storage", [("wrapper", "file"), ("launcher", "file"), ("worker", "file"), ("worker", "fake-gcs-server")]
)
def test_sigterm_to_any_process_of_the_job_stops_both_ranks_on_one_step(
    tiny_config: Path, tmp_path: Path, target: str, storage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to the `trainer train` wrapper, DeepSpeed's per-node launcher (which passes it to its ranks' process
    trees) or one worker: the ranks agree on a step, save, upload, and the job exits 75 within the grace. (A runner
    that dies of the signal, leaving its ranks to notice: test_sigterm_to_the_deepspeed_runner_started_by_hand.)"""
    from storage_servers import BUCKET, Emulator

    if storage == "file":
        _sigterm_one_process(tiny_config, tmp_path, target, f"file://{tmp_path / 'bucket'}")
        return
    emu = Emulator(storage, tmp_path / "emu").start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
    try:
        _sigterm_one_process(tiny_config, tmp_path, target, f"gs://{BUCKET}/ckpts")
    finally:
        emu.stop()


def _sigterm_one_process(tiny_config: Path, tmp_path: Path, target: str, url: str) -> None:
    import os
    import signal
    import time

    from trainer.storage import open_storage
    from trainer.checkpoint.remote import verify_remote

    cfg = write_config(
        tiny_config,
        tmp_path / "runs",
        train={"max_steps": 100000, "log_every": 5},
        checkpoint={"save_every": 100000},
        upload={"url": url},
        preemption={"grace_s": 20},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli.main", "train", str(cfg), "--num-ranks", "2"],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen, deadline = "", time.monotonic() + 300
    while "step 10/" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stdout.readline()
    t0 = time.monotonic()
    _job_process(proc.pid, target).send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 75, (seen + out)[-4000:]
    assert elapsed <= 20 + TEARDOWN_S, elapsed  # the grace, and the teardown it leaves out
    (ckpt,) = committed(tmp_path / "runs")
    meta = metadata(ckpt)
    assert meta["reason"] == "preemption" and meta["world_size"] == 2 and meta["step"] >= 10
    # both ranks wrote their state for that same step before the commit
    assert sorted(p.name for p in ckpt.glob("rng_state_rank*.pt")) == [
        "rng_state_rank00000.pt",
        "rng_state_rank00001.pt",
    ]
    ok, why, _ = verify_remote(open_storage(url), f"{meta['run_id']}/{ckpt.name}")
    assert ok, why
    assert json.loads((ckpt / "upload_state.json").read_text())["state"] == "uploaded"
    assert f"checkpoint {ckpt.name}: uploaded" in out


@pytest.mark.launcher
def test_sigterm_to_the_deepspeed_runner_started_by_hand(tiny_config: Path, tmp_path: Path) -> None:
    """`deepspeed ... launch/train.py` without the wrapper: SIGTERM kills DeepSpeed's runner at once (it has
    no handler); its ranks notice, stop on one step, save and leave; the next start resumes from that step."""
    import os
    import signal
    import time

    from trainer.launcher.command import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cfg = write_config(
        tiny_config, tmp_path / "runs", train={"max_steps": 100000, "log_every": 5}, checkpoint={"save_every": 100000}
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            str(hostfile),
            "--no_ssh_check",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "launch/train.py",
            "--config",
            str(cfg),
        ],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen, deadline = "", time.monotonic() + 300
    while "step 10/" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)  # the pipe closes when the ranks and their launcher are gone too
    assert proc.returncode == -signal.SIGTERM, (seen + out)[-3000:]
    assert "is gone: stopping" in out and "stopped at step" in out, (seen + out)[-3000:]
    (ckpt,) = committed(tmp_path / "runs")
    meta = metadata(ckpt)
    assert meta["reason"] == "preemption" and meta["world_size"] == 2
    assert sorted(p.name for p in ckpt.glob("rng_state_rank*.pt")) == [
        "rng_state_rank00000.pt",
        "rng_state_rank00001.pt",
    ]


@pytest.mark.launcher
def test_two_simulated_nodes_upload_one_complete_checkpoint(tiny_config: Path, tmp_path: Path) -> None:
    """Two "nodes" on 127.0.0.1 (two launchers, --no_ssh --node_rank 0/1), separate run dirs, no shared
    filesystem: each node uploads the files its rank wrote; node 0 writes the manifest after node 1 reported.
    Then one node of one rank on a fresh machine continues the run from the bucket: restored, converted to
    the universal format for its world size, trained on, uploaded (without the conversion)."""
    import os

    from trainer.launcher.command import free_port
    from trainer.storage import open_storage
    from trainer.checkpoint.remote import verify_remote

    bucket = tmp_path / "bucket"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    common = dict(
        train={"max_steps": 4, "log_every": 1}, checkpoint={"save_every": 4}, upload={"url": f"file://{bucket}"}
    )
    cfg_a = write_config(tiny_config, tmp_path / "node_a", **common)
    cfg_b = write_config(tiny_config, tmp_path / "node_b", **common)
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainer.cli.main",
                "train",
                str(cfg),
                "--hostfile",
                str(hostfile),
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
            ],
            cwd=REPO,
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, cfg in ((0, cfg_a), (1, cfg_b))
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    (a,) = committed(tmp_path / "node_a")
    (b,) = committed(tmp_path / "node_b")
    assert a.parent.parent.name == b.parent.parent.name  # one run id, chosen by rank 0
    assert (a / "rng_state_rank00000.pt").exists() and not (a / "rng_state_rank00001.pt").exists()
    assert (b / "rng_state_rank00001.pt").exists() and not (b / "rng_state_rank00000.pt").exists()
    storage = open_storage(f"file://{bucket}")
    ok, why, manifest = verify_remote(storage, f"{a.parent.parent.name}/{a.name}")
    assert ok, why
    paths = {f["path"] for f in manifest["files"]}
    assert {"rng_state_rank00000.pt", "rng_state_rank00001.pt", "mp_rank_00_model_states.pt", "metadata.json"} <= paths
    assert any(p.startswith("zero_pp_rank_1_") for p in paths) and any(p.startswith("zero_pp_rank_0_") for p in paths)
    assert any(p["name"].startswith("node01-part-") for p in manifest["parts"])

    cfg_c = write_config(tiny_config, tmp_path / "fresh", **common)
    r = run_cli("train", str(cfg_c), "--num-ranks", "1", "--max-steps", "8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no local checkpoint: looking for the newest complete one" in r.stdout
    assert "resuming step-00000004 saved on 2 ranks onto 1: converted to universal in" in r.stdout, r.stdout[-3000:]
    c4, c8 = committed(tmp_path / "fresh")
    assert (c4 / "universal" / "conversion.json").is_file() and c8.name == "step-00000008"
    m8 = metadata(c8)
    assert m8["run_id"] == a.parent.parent.name and m8["resumed_from_world_size"] == 2 and m8["grad_accum"] == 2
    losses = dict((int(s), v) for s, v in m8["loss_history"])
    assert (
        losses[4] == metadata(a)["loss"] and abs(losses[5] - losses[4]) < 0.1 < losses[1] - losses[4]
    )  # continued, not restarted
    ok, why, manifest = verify_remote(storage, f"{c8.parent.parent.name}/{c8.name}")
    assert ok, why
    assert not any(f["path"].startswith("universal") for f in manifest["files"])

    # Node A's machine came back alone: its step 4 holds only rank 0's files; rank 1's come from the bucket
    import shutil

    shutil.copytree(bucket, tmp_path / "bucket2")  # (node A's new uploads must not collide with the fresh node's)
    cfg_a1 = write_config(
        tiny_config, tmp_path / "node_a", **{**common, "upload": {"url": f"file://{tmp_path / 'bucket2'}"}}
    )
    r = run_cli("train", str(cfg_a1), "--num-ranks", "1", "--max-steps", "8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "fetching 2 file(s) of step-00000004 that this node lacks" in r.stdout, r.stdout[-3000:]
    assert (a / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file() and (
        a / "universal" / "conversion.json"
    ).is_file()
    (a8,) = [p for p in committed(tmp_path / "node_a") if p.name == "step-00000008"]
    assert metadata(a8)["loss_history"] == m8["loss_history"]  # the same state on the same world size: the same run


@pytest.mark.launcher
@pytest.mark.parametrize("when", ["importing", "one rank in setup"])
def test_a_stop_while_the_ranks_start_ends_the_job_at_once_with_75(
    tiny_config: Path, tmp_path: Path, when: str
) -> None:
    """Found by the preemption simulator. `importing`: SIGTERM to `trainer train` while the ranks are still importing
    (no handler yet: they die of it) is the stop's exit code 75 and one line, not the launcher's 241. `one rank in
    setup`: rank 1 alone stopped during setup leaves at once; rank 0, which may be blocked in a collective with it,
    is signalled by the launcher and leaves from its signal thread, not 30 s later by the launcher's SIGKILL."""
    import os
    import signal
    import time

    cfg = write_config(tiny_config, tmp_path / "runs", train={"max_steps": 100000, "log_every": 1})
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli.main", "train", str(cfg), "--num-ranks", "2"],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    needle = "process " if when == "importing" else "[rank0] run "
    seen, deadline = "", time.monotonic() + 300
    while needle not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stdout.readline()  # type: ignore[union-attr]
    assert needle in seen, seen[-3000:]
    t0 = time.monotonic()
    if when == "importing":
        proc.send_signal(signal.SIGTERM)
    else:
        _job_process(proc.pid, "worker").send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 75, (seen + out)[-4000:]
    assert elapsed <= TEARDOWN_S, (elapsed, out[-3000:])  # nothing to save: only the teardown
    if when == "importing":
        assert "stopped by SIGTERM while the ranks were starting: nothing trained, nothing to save" in out, out[-3000:]
    else:
        assert "while the job was starting: nothing trained yet, nothing to save" in out, out[-3000:]
    assert not committed(tmp_path / "runs")


def test_deepspeed_is_imported_without_mlflow_and_mlflow_stays_importable() -> None:
    """The launcher and the ranks import DeepSpeed without the MLflow its autotuner pulls in (over a second per
    process); a rank that tracks imports MLflow afterwards as usual."""
    code = (
        "import sys; from trainer.dsimport import import_deepspeed; ds = import_deepspeed(); "
        "assert 'mlflow' not in sys.modules, sorted(m for m in sys.modules if 'mlflow' in m); "
        "import mlflow; from deepspeed.autotuning import autotuner; print(ds.__version__, mlflow.__version__)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.split()) == 2, r.stdout + r.stderr[-2000:]
