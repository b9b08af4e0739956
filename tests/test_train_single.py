"""Single-process runs (RANK/WORLD_SIZE set by hand): checkpoints, retention, partials, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import TEARDOWN_S, run_cli, run_rank


def _cfg(tiny_config: Path, **sections: dict) -> Path:
    cfg = yaml.safe_load(tiny_config.read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    tiny_config.write_text(yaml.safe_dump(cfg))
    return tiny_config


def test_checkpoints_metadata_retention_and_mlflow(tiny_config: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs"
    cfg = _cfg(
        tiny_config,
        train={"max_steps": 12, "log_every": 2},
        checkpoint={"save_every": 3, "keep_last": 2},
        tracking={"enabled": True},
        eval={"enabled": False},
    )  # (without evaluation, the best is by training loss)
    r = run_rank("--config", str(cfg))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_root,) = [p for p in run_dir.iterdir() if p.is_dir() and (p / "checkpoints").is_dir()]
    run_id = run_root.name
    assert len(run_id.split("_")[0]) == 32 and len(run_id.split("_", 1)[1]) == 15  # {uuid hex}_{YYYYmmdd_HHMMSS}

    ckpts = sorted(p.name for p in (run_root / "checkpoints").glob("step-*"))
    metas = {n: json.loads((run_root / "checkpoints" / n / "metadata.json").read_text()) for n in ckpts}
    # Retention: the newest two, plus the best by loss among every checkpoint the run saved (3, 6, 9, 12: a save is a
    # log point, so their losses are in the final history), not only among those that survived
    losses = dict(metas["step-00000012"]["loss_history"])
    best = min((3, 6, 9, 12), key=lambda step: losses[step])
    assert ckpts[-2:] == ["step-00000009", "step-00000012"] and f"step-{best:08d}" in ckpts
    assert len(ckpts) == (2 if best in (9, 12) else 3)
    assert metas["step-00000012"]["best_metric"] == "train_loss"
    # the buffers of the background saves were reserved after step 1 by a dry run that leaves nothing behind
    assert "of host memory for background saves" in r.stdout
    assert {p.name for p in (run_root / "checkpoints").iterdir() if p.is_dir()} == set(ckpts)
    assert metas["step-00000009"]["save"]["async"] is True and metas["step-00000012"]["save"]["async"] is False
    m = metas["step-00000012"]
    for key in (
        "step",
        "epoch",
        "tokens_seen",
        "loss",
        "best_loss",
        "loss_history",
        "lr_history",
        "data_position",
        "run_id",
        "mlflow_run_id",
        "config_hash",
        "world_size",
        "zero_stage",
        "system",
        "committed_at",
    ):
        assert key in m, key
    assert m["step"] == 12 and m["run_id"] == run_id and m["reason"] == "final"
    assert m["tokens_seen"] == 12 * 8 * 128
    assert m["system"]["torch"] and m["system"]["deepspeed"] and m["system"]["precision"] == "fp32"
    assert m["best_loss"] == min(loss for _, loss in m["loss_history"])
    saved = yaml.safe_load((run_root / "checkpoints" / "step-00000012" / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 12 and saved["data"]["path"]
    assert (
        json.loads((run_root / "checkpoints" / "step-00000012" / "ds_config.json").read_text())["train_batch_size"] == 8
    )

    # MLflow: the local store under run_dir, status FINISHED, metrics, params and artifacts.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["train.max_steps"] == "12"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(x.step for x in losses) == [2, 3, 4, 6, 8, 9, 10, 12]  # every log_every steps and at each save
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "plots"} <= artifacts

    # A partial checkpoint (no metadata.json) is removed at the next start; the resume continues
    # the same run folder and the same MLflow run.
    partial = run_root / "checkpoints" / "step-00000013"
    partial.mkdir()
    (partial / "junk").write_text("half-written")
    r = run_rank("--config", str(cfg), "--resume", "latest", "--max-steps", "14")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not partial.exists()
    m14 = json.loads((run_root / "checkpoints" / "step-00000014" / "metadata.json").read_text())
    assert m14["mlflow_run_id"] == m["mlflow_run_id"] and m14["run_id"] == run_id
    assert m14["loss_history"][: len(m["loss_history"])] == m["loss_history"]
    assert client.get_run(m["mlflow_run_id"]).info.status == "FINISHED"
    assert max(x.step for x in client.get_metric_history(run.info.run_id, "train/loss")) == 14


def test_resume_unknown_tag_is_a_user_error(tiny_config: Path) -> None:
    r = run_rank("--config", str(tiny_config), "--resume", "step-00000999")
    assert r.returncode == 2
    assert "step-00000999" in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_sigterm_saves_marks_killed_and_exits_75(tiny_config: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from trainer.launcher.command import free_port

    run_dir = tmp_path / "runs"
    cfg = _cfg(
        tiny_config,
        train={"max_steps": 100000, "log_every": 5},
        checkpoint={"save_every": 100000},
        tracking={"enabled": True},
    )
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    seen = ""
    while "step 10/" not in seen and time.monotonic() < deadline:  # wait until it is training
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, seen + out
    (ckpt,) = list(run_dir.glob("*/checkpoints/step-*/metadata.json"))
    meta = json.loads(ckpt.read_text())
    assert meta["reason"] == "preemption" and meta["step"] >= 10
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").get_run(meta["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert (
        run.data.tags["trainer.stopped_at_step"] == str(meta["step"])
        and run.data.tags["trainer.stopped_by"] == "SIGTERM"
    )
    assert run.data.tags["trainer.emergency_checkpoint"] == meta["tag"]


def test_sigterm_without_time_for_a_save_skips_it_and_says_so(tiny_config: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from trainer.launcher.command import free_port

    run_dir = tmp_path / "runs"
    cfg = _cfg(
        tiny_config,
        train={"max_steps": 100000, "log_every": 1},
        checkpoint={"save_every": 5, "keep_last": 5},
        preemption={"grace_s": 1.0, "exit_reserve_s": 1.0},
    )
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    seen = ""
    while "step 12/" not in seen and time.monotonic() < deadline:  # two scheduled saves measured
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, seen + out
    assert "not saving at step" in out and "newest committed checkpoint: step-00000010" in out, out
    metas = [json.loads(p.read_text()) for p in run_dir.glob("*/checkpoints/step-*/metadata.json")]
    assert sorted(m["step"] for m in metas) == [5, 10] and {m["reason"] for m in metas} == {"scheduled"}
    stopped_at = int(out.split("stopped at step ")[1].split()[0])
    assert stopped_at > 10

    # The same command again: it resumes from step 10, and the steps after 10 are counted as done twice.
    r = run_rank("--config", str(cfg), "--max-steps", str(stopped_at + 2), "--set", "preemption.grace_s=25")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (final,) = run_dir.glob(f"*/checkpoints/step-{stopped_at + 2:08d}")
    good = json.loads((final / "metadata.json").read_text())["goodput"]
    assert good["attempts"] == 2 and good["seconds"]["recomputed"] > 0 and good["seconds"]["productive"] > 0
    assert 0 < good["goodput"] < 1 and abs(sum(good["seconds"].values()) - good["total_s"]) < 0.01
    assert good["seconds"]["startup"] > 0 and good["seconds"]["exit"] > 0  # the first attempt's exit is in the total
    shown = run_cli("checkpoints", "show", str(final))
    assert shown.returncode == 0 and "goodput" in shown.stdout and "recomputed" in shown.stdout, (
        shown.stdout + shown.stderr
    )


def test_sigkill_mid_save_leaves_the_previous_checkpoint_to_resume(tiny_config: Path, tmp_path: Path) -> None:
    """A hard stop in the middle of a save: the half-written folder is never listed, the next start removes
    it and resumes from the previous committed checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from trainer.checkpoint.store import CheckpointStore, resolve_resume
    from trainer.launcher.command import free_port

    run_dir = tmp_path / "runs"
    # A larger vocabulary makes each save take long enough (~0.3 s) to be caught in the middle.
    cfg = _cfg(
        tiny_config,
        model={"vocab_size": 100_000},
        train={"max_steps": 100000, "log_every": 1, "micro_batch_size": 1},
        checkpoint={"save_every": 3, "keep_last": 10},
    )
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    victim = None
    deadline = time.monotonic() + 300
    try:
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            for meta in run_dir.glob("*/checkpoints/step-00000003/metadata.json"):  # one committed checkpoint first
                folder = meta.parent.parent / "step-00000006"
                while time.monotonic() < deadline and not (folder.is_dir() and any(folder.iterdir())):
                    time.sleep(0.001)
                os.kill(proc.pid, signal.SIGKILL)  # DeepSpeed is writing step 6
                victim = folder
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert victim is not None and victim.is_dir()
    assert not (victim / "metadata.json").exists(), "the kill came after the commit: the save was too fast to catch"
    run_root = victim.parent.parent
    assert [c.tag for c in CheckpointStore(run_root).committed()] == ["step-00000003"]
    assert resolve_resume(run_dir, "latest").tag == "step-00000003"
    assert (
        resolve_resume(run_dir, "latest").metadata["save"]["async"] is True
    )  # the killed save was a background one too
    r = run_rank("--config", str(cfg), "--resume", "latest", "--max-steps", "4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "removed partial checkpoint" in r.stdout + r.stderr and "at step 3" in r.stdout
    assert not victim.exists()
    assert [c.tag for c in CheckpointStore(run_root).committed()] == ["step-00000003", "step-00000004"]


def test_the_same_command_after_the_run_completed_does_nothing(tiny_config: Path, tmp_path: Path) -> None:
    """`--resume auto` is the default: a finished run is not trained again (exit 0, one line, nothing launched)."""
    import yaml

    from trainer.checkpoint.store import CheckpointStore

    cfg = yaml.safe_load(tiny_config.read_text())
    store = CheckpointStore(Path(cfg["run_dir"]) / "run-done")
    store.path("step-00000300").mkdir(parents=True)
    store.commit("step-00000300", {"step": 300, "run_id": "run-done", "task": "pretrain", "world_size": 1}, {})
    before = set(tmp_path.rglob("*"))
    r = run_cli("train", str(tiny_config), "--num-ranks", "1", "--max-steps", "300")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip() == (
        "nothing to do: run run-done is complete (step-00000300, train.max_steps 300); raise"
        " --max-steps to train further, or pass --resume none for a new run"
    )
    assert "launcher.ds_launch" not in r.stdout and set(tmp_path.rglob("*")) == before


def test_export_of_a_pretraining_checkpoint_loads_with_transformers(tiny_config: Path, tmp_path: Path) -> None:
    """ZeRO shards -> a transformers folder: AutoModelForCausalLM loads it and gives the checkpoint's logits."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    from trainer.config.load import load_config
    from trainer.models.neox import neox_config

    cfg = _cfg(tiny_config, train={"max_steps": 4}, checkpoint={"save_every": 4})
    r = run_rank("--config", str(cfg))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (ckpt,) = sorted((tmp_path / "runs").glob("*/checkpoints/step-00000004"))
    out = tmp_path / "hf"
    r = run_cli("export", str(ckpt), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    m = load_config(cfg).model
    want = GPTNeoXForCausalLM(neox_config(m))
    want.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
    got = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[1, 5, 9, 200, 511, 3]])
    with torch.no_grad():
        assert torch.equal(want.eval()(input_ids=ids).logits, got.eval()(input_ids=ids).logits)
    r = run_cli("export", str(ckpt), "--out", str(out))
    assert r.returncode == 2 and "not an empty folder" in r.stderr

    # `trainer generate`: the checkpoint and its export continue a prompt with the same tokens, those greedy
    # decoding of the checkpoint's model gives
    greedy = want.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
    )[0, ids.shape[1] :].tolist()
    answers = []
    for src in (ckpt, out):
        r = run_cli("generate", str(src), "--prompt-ids", "1 5 9 200 511 3", "--max-new-tokens", "6")
        assert r.returncode == 0, r.stderr[-2000:]
        answers.append([int(x) for x in r.stdout.split()])
    assert answers[0] == answers[1] == greedy
    r = run_cli("generate", str(ckpt), "--prompt", "hello")
    assert r.returncode == 2 and r.stderr.startswith("error: --prompt needs --tokenizer"), r.stderr
    r = run_cli("generate", str(ckpt), "--prompt-ids", "1 99999")
    assert r.returncode == 2 and "prompt token id 99999 is outside the model's vocabulary" in r.stderr, r.stderr


def _start(cfg: Path, *args: str):  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    from conftest import REPO
    from trainer.launcher.command import free_port

    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(cfg), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _sigterm_when(proc, needle: str) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    """Read the job's output until `needle`, SIGTERM it, return (all output, seconds from the signal to exit)."""
    import signal
    import time

    seen, deadline = "", time.monotonic() + 300
    while needle not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stdout.readline()
    assert needle in seen, seen[-3000:]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return seen + out, time.monotonic() - t0


def test_sigterm_during_a_background_write_finishes_it_or_abandons_it(tiny_config: Path, tmp_path: Path) -> None:
    """A stop while a checkpoint is still being written: with time enough, the write is finished and committed
    (then the emergency save); with a grace too short for it, it is abandoned, never listed, and the job
    still leaves within the grace (plus teardown)."""
    from trainer.checkpoint.store import CheckpointStore

    run_dir = tmp_path / "runs"
    # ~1 GB of state (a 500k vocabulary) and 8-token sequences: the background write takes seconds here, a
    # micro-batch ~0.1 s, so the stop is seen while the write is still going
    # (ZeRO-1: gradients are reduced once per step, not after every micro-batch)
    cfg = _cfg(
        tiny_config,
        model={"vocab_size": 500_000, "seq_len": 8},
        checkpoint={"save_every": 3, "keep_last": 10},
        train={"max_steps": 100000, "log_every": 1, "micro_batch_size": 1, "grad_accum": 4},
        preemption={"grace_s": 25},
        deepspeed={"template": "zero1"},
    )
    out, _ = _sigterm_when(_start(cfg), "step-00000003 (scheduled): state captured in")
    assert "stop: the write of step-00000003 has " in out, out[-3000:]
    (run_root,) = [p for p in run_dir.iterdir() if p.is_dir()]
    ckpts = CheckpointStore(run_root).committed()
    assert ckpts[0].tag == "step-00000003" and ckpts[0].metadata["save"]["async"] is True
    stop_step = int(out.split("stopped at step ")[1].split()[0])
    assert ckpts[-1].step == stop_step, out[-3000:]  # the state it stopped with is committed ...
    assert stop_step == 3 or ckpts[-1].metadata["reason"] == "preemption"  # ... by the emergency save if it is newer
    assert not [p for p in (run_root / "checkpoints").iterdir() if p.is_dir() and not (p / "metadata.json").exists()]

    due = (stop_step // 3 + 1) * 3
    proc = _start(cfg, "--set", "preemption.grace_s=1.5", "--set", "preemption.exit_reserve_s=0.5")
    out, elapsed = _sigterm_when(proc, f"{tag(due)} (scheduled): state captured in")
    assert proc.returncode == 75, out[-3000:]
    assert f"abandoned the write of {tag(due)}" in out and "not saving at step" in out, out[-3000:]
    assert elapsed <= 1.5 + TEARDOWN_S, elapsed  # the grace, and the teardown it leaves out
    assert [c.tag for c in CheckpointStore(run_root).committed()] == [c.tag for c in ckpts]  # the partial is not listed
    assert (run_root / "checkpoints" / tag(due)).is_dir()  # left for the next start to remove


def tag(step: int) -> str:
    return f"step-{step:08d}"


_STOP_MID_STEP = """
import sys
from trainer.config.load import load_config
from trainer.engine.loop import Trainer
from trainer.log import setup_logging
from trainer.tasks import build_task

setup_logging()
cfg = load_config(sys.argv[1])
trainer = Trainer(cfg, build_task(cfg), source=sys.argv[1])
trainer.setup()
batch = trainer.task.batch

STOP_AT = (int(sys.argv[2]), int(sys.argv[3]))  # (0-based step, micro-batch) during which the stop is requested

def stop_at(step, micro, device):
    if (step, micro) == STOP_AT:
        trainer.stop.request("test")
    return batch(step, micro, device)

trainer.task.batch = stop_at
sys.exit(trainer.train())
"""


def test_a_stop_between_micro_batches_saves_the_last_complete_step_and_resumes_exactly(
    tiny_config: Path, tmp_path: Path
) -> None:
    """grad_accum 4 with dropout: a stop during step 6 saves the state after step 5 with the RNG of step 6's start;
    the resumed run reproduces the uninterrupted one bit for bit (with the RNG of the stop instead, it would not).
    A stop at the end of step 6, an evaluation step, evaluates before its save: that checkpoint holds step 6's
    validation loss, and its resume ends with the uninterrupted run's validation history."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from trainer.launcher.command import free_port

    common = dict(
        model={"dropout": 0.1},
        train={"max_steps": 8, "log_every": 1, "micro_batch_size": 2, "grad_accum": 4},
        optim={"decay_steps": 8},
        checkpoint={"save_every": 100, "keep_last": 5},
        eval={"every": 3, "batches": 2},
    )
    ref = _cfg(tiny_config, run_dir=str(tmp_path / "ref"), **common)
    r = run_rank("--config", str(ref))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (ref_final,) = (tmp_path / "ref").glob("*/checkpoints/step-00000008")

    def stopped_run(config: Path, step: int, micro: int) -> subprocess.CompletedProcess:
        """One rank of `config`, stopped during (0-based) step `step`'s micro-batch `micro`."""
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        return subprocess.run(
            [sys.executable, "-c", _STOP_MID_STEP, str(config), str(step), str(micro)],
            cwd=REPO,
            env={**env, "MASTER_PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=600,
        )

    cfg = _cfg(tiny_config, run_dir=str(tmp_path / "runs"))
    r = stopped_run(cfg, 5, 1)  # step 6's second micro-batch
    assert r.returncode == 75, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stopped at step 5 (between micro-batches" in r.stdout, r.stdout[-3000:]
    (saved,) = (tmp_path / "runs").glob("*/checkpoints/step-*/metadata.json")
    meta = json.loads(saved.read_text())
    assert meta["step"] == 5 and meta["reason"] == "preemption" and meta["data_position"]["samples_seen"] == 5 * 4 * 2

    # The same resume without the saved RNG state (its file and its record gone) must NOT reproduce the reference:
    # with dropout, exactness depends on the RNG, so the equality below tests that it is restored.
    import shutil

    shutil.copytree(tmp_path / "runs", tmp_path / "no_rng")
    (no_rng_meta,) = (tmp_path / "no_rng").glob("*/checkpoints/step-*/metadata.json")
    (no_rng_meta.parent / "rng_state_rank00000.pt").unlink()
    m = json.loads(no_rng_meta.read_text())
    del m["files"]["rng_state_rank00000.pt"]
    no_rng_meta.write_text(json.dumps(m))
    no_rng = tmp_path / "no_rng.yaml"
    no_rng.write_text(cfg.read_text().replace(str(tmp_path / "runs"), str(tmp_path / "no_rng")))
    r = run_rank("--config", str(no_rng))
    assert r.returncode == 0 and "no RNG state for rank 0" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    (unseeded,) = (tmp_path / "no_rng").glob("*/checkpoints/step-00000008")
    ref_losses = json.loads((ref_final / "metadata.json").read_text())["loss_history"]
    assert json.loads((unseeded / "metadata.json").read_text())["loss_history"][5:] != ref_losses[5:]

    r = run_rank("--config", str(cfg))
    assert r.returncode == 0 and "at step 5" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    (final,) = (tmp_path / "runs").glob("*/checkpoints/step-00000008")
    a, b = json.loads((ref_final / "metadata.json").read_text()), json.loads((final / "metadata.json").read_text())
    assert a["loss_history"] == b["loss_history"] and a["lr_history"] == b["lr_history"]
    assert [s for s, _ in a["val_history"]] == [0, 3, 6, 8] and a["val_history"] == b["val_history"]

    # a stop at the end of step 6 (its last micro-batch), an evaluation step: evaluated first, then saved
    # (saving at step 3 too: with no save measured yet, the job would not risk the evaluation before its save)
    at6 = _cfg(tiny_config, run_dir=str(tmp_path / "at6"), checkpoint={"save_every": 3, "keep_last": 5})
    r = stopped_run(at6, 5, 3)
    assert r.returncode == 75 and "stop on evaluation step 6: evaluating first" in r.stdout, r.stdout[-3000:]
    (saved6,) = (tmp_path / "at6").glob("*/checkpoints/step-00000006/metadata.json")
    m6 = json.loads(saved6.read_text())
    assert m6["step"] == 6 and m6["reason"] == "preemption" and m6["val_loss"] == a["val_history"][2][1]
    r = run_rank("--config", str(at6))
    assert r.returncode == 0 and "at step 6" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    (final6,) = (tmp_path / "at6").glob("*/checkpoints/step-00000008")
    c = json.loads((final6 / "metadata.json").read_text())
    assert c["loss_history"] == a["loss_history"] and c["val_history"] == a["val_history"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    wa = get_fp32_state_dict_from_zero_checkpoint(str(ref_final.parent), tag=ref_final.name)
    wb = get_fp32_state_dict_from_zero_checkpoint(str(final.parent), tag=final.name)
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)


def test_epochs_evaluation_best_saves_and_tracking_across_a_stop(tiny_config: Path, tmp_path: Path) -> None:
    """train.epochs 2 derives the run's steps from the data; a SIGTERM and the same command again end at that step.
    Evaluations every 10 steps save a checkpoint when they improve (checkpoint.save_best), `epoch` saves come at the
    step that completes each pass, and the validation loss reaches the console, MLflow, TensorBoard, status.json
    and every checkpoint's metadata."""
    run_dir = tmp_path / "runs"
    cfg = _cfg(
        tiny_config,
        data={"max_files": 1},
        train={"max_steps": None, "epochs": 2, "micro_batch_size": 32, "log_every": 5},
        eval={"every": 10, "batches": 1},
        checkpoint={"save_every": "epoch", "save_best": True, "keep_last": 1},
        tracking={"enabled": True, "tensorboard": True},
        optim={"warmup_steps": None, "warmup_ratio": 0.1},
    )
    plan_line = (
        "plan: train.epochs 2 x 731 samples / global batch 32 (22.84 steps per epoch) = 46 steps; warmup 5 steps"
    )
    out, _ = _sigterm_when(_start(cfg), "step 15/46 epoch 0.66 loss")
    assert plan_line in out, out[-3000:]
    assert "checkpoint step-00000010 (best): state captured" in out
    r = run_rank("--config", str(cfg))  # the same command: resumes, and stops at the same derived step
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert plan_line in r.stdout and "resumed from" in r.stdout
    steps = [line for line in (out + r.stdout).splitlines() if "] step " in line and " loss " in line]
    assert steps and all(" epoch " in line for line in steps)
    assert "checkpoint step-00000023 (scheduled)" in r.stdout  # the step whose samples complete the first pass

    (run_root,) = [p for p in run_dir.iterdir() if (p / "checkpoints").is_dir()]
    final = json.loads((run_root / "checkpoints" / "step-00000046" / "metadata.json").read_text())
    assert (
        final["plan"]["max_steps"] == 46 and final["plan"]["epochs"] == 2 and final["epoch"] == round(46 * 32 / 731, 6)
    )
    evals = [s for s, _ in final["val_history"]]
    assert evals[0] == 0 and evals[-1] == 46 and {10, 20, 30, 40} <= set(evals)
    vm = final["validation_metrics"]
    assert (
        vm["current_val_loss"] == final["val_loss"] == final["val_history"][-1][1] and vm["best_metric"] == "val_loss"
    )
    assert vm["best_val_loss"] == min(v for _, v in final["val_history"]) and vm["trend"] in (
        "improving",
        "flat",
        "worsening",
    )
    kept = sorted(p.name for p in (run_root / "checkpoints").glob("step-*"))
    best_tag = f"step-{final['best_val_step']:08d}"
    assert best_tag in kept and kept[-1] == "step-00000046"  # retention: the newest and the best by val_loss

    status = json.loads((run_root / "status.json").read_text())
    assert (
        status["val_loss"] == final["val_loss"]
        and status["val_step"] == 46
        and status["epoch"] == round(46 * 32 / 731, 4)
    )

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    hist = client.get_metric_history(final["mlflow_run_id"], "val/loss")
    assert sorted({m.step for m in hist}) == evals  # the stopped attempt's points and the resumed ones, one run
    assert {m.step: m.value for m in hist}[46] == final["val_loss"]
    assert client.get_metric_history(final["mlflow_run_id"], "val/ppl")
    assert client.get_metric_history(final["mlflow_run_id"], "train/epoch")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_root / "tensorboard"))
    acc.Reload()
    assert {"val/loss", "train/loss", "train/epoch"} <= set(acc.Tags()["scalars"])
    assert {e.step for e in acc.Scalars("val/loss")} == set(evals)

    r = run_cli("checkpoints", "show", "best", "--runs", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert (
        f"{best_tag} of run" in r.stdout
        and "val_loss (the `best` reference: the lowest val_loss of its run)" in r.stdout
    )


def _run_roots(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if (p / "checkpoints").is_dir())


def _flip_a_byte(path: Path) -> None:
    """Change one byte in the middle of a file, keeping its size (silent corruption)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_damaged_local_checkpoint_is_named_repaired_from_the_bucket_or_stepped_back(
    tiny_config: Path, tmp_path: Path
) -> None:
    """Every file's size and CRC32C is in metadata.json. A truncated or bit-flipped shard of a checkpoint is found
    before DeepSpeed loads anything: `--resume` of it exactly is one line, exit 2; `--resume auto` replaces the damaged
    file from its verified copy in the bucket, or, without one, steps back to the newest intact checkpoint (a new
    run)."""
    from trainer.checkpoint.integrity import file_record

    runs, bucket = tmp_path / "runs", f"file://{tmp_path / 'bucket'}/ckpts"
    base = dict(
        train={"max_steps": 6, "log_every": 1},
        checkpoint={"save_every": 2, "keep_last": 3},
        eval={"enabled": False},
        optim={"decay_steps": 10},
    )
    cfg = _cfg(tiny_config, upload={"url": bucket}, **base)
    no_bucket = tmp_path / "no_bucket.yaml"
    no_bucket.write_text(cfg.read_text().replace(bucket, "null"))
    r = run_rank("--config", str(cfg))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_root,) = _run_roots(runs)
    ck = run_root / "checkpoints"
    meta6 = json.loads((ck / tag(6) / "metadata.json").read_text())
    recorded = meta6["files"]
    on_disk = {str(p.relative_to(ck / tag(6))) for p in (ck / tag(6)).rglob("*") if p.is_file()}
    assert set(recorded) == on_disk - {"metadata.json", "upload_state.json"}  # every file, with its size and CRC32C
    assert all(file_record(ck / tag(6) / rel) == rec for rel, rec in recorded.items())

    model6 = ck / tag(6) / "mp_rank_00_model_states.pt"
    good = model6.read_bytes()
    model6.write_bytes(good[: len(good) // 2])  # truncated
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    r = run_rank("--config", str(no_bucket), "--resume", tag(6), "--max-steps", "8")
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert any(f"--resume {tag(6)}: the checkpoint is damaged" in ln and str(model6) in ln for ln in err), err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing written

    r = run_rank("--config", str(cfg), "--max-steps", "8")  # auto: the damaged file comes back from the bucket
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"repaired {ck / tag(6)}: mp_rank_00_model_states.pt replaced by verified copies" in r.stdout, r.stdout[
        -4000:
    ]
    assert f"resumed from {ck / tag(6)} at step 6" in r.stdout and model6.read_bytes() == good
    assert _run_roots(runs) == [run_root]  # the same run went on

    # Without a bucket: the two newest are damaged (a truncated model file, a flipped byte in optimizer states), so
    # the run steps back to step 4, naming both, and branches into a new run (it never overwrites the later ones).
    model8 = ck / tag(8) / "mp_rank_00_model_states.pt"
    model8.write_bytes(model8.read_bytes()[:-100])
    (optim6,) = (ck / tag(6)).glob("*optim_states.pt")
    _flip_a_byte(optim6)
    r = run_rank("--config", str(no_bucket), "--max-steps", "10")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert f"not resuming {ck / tag(8)}: {model8} has" in out and "metadata.json says" in out, out[-4000:]
    assert f"not resuming {ck / tag(6)}: {optim6} has CRC32C" in out, out[-4000:]
    assert f"resumed from {ck / tag(4)} at step 4" in out and "continuing as a new run" in out
    assert len(_run_roots(runs)) == 2 and model8.exists() and optim6.exists()  # nothing of the user's deleted


def _small_disk(path: Path, size_mb: float):  # type: ignore[no-untyped-def]
    """A tmpfs of `size_mb` mounted at `path` (a disk that fills), or a skip where this process may not mount."""
    import contextlib
    import subprocess

    path.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(size_mb * 1024)}k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {r.stderr.strip()}")

    @contextlib.contextmanager
    def mounted():  # type: ignore[no-untyped-def]
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)

    return mounted()


@pytest.mark.parametrize("how", ["background", "direct"])
def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(tiny_config: Path, tmp_path: Path, how: str) -> None:
    """run_dir on a disk with room for two checkpoints and a bit: the third save runs out of space. One line names the
    disk and the bytes missing, exit 2, no traceback; the partial folder is gone (never listed) and the two committed
    checkpoints are intact (they verify and resume)."""
    with _small_disk(tmp_path / "disk", 7.0) as disk:
        cfg = _cfg(
            tiny_config,
            run_dir=str(disk / "runs"),
            train={"max_steps": 30, "log_every": 5},
            checkpoint={"save_every": 5, "keep_last": 5, "async": how == "background"},
            eval={"enabled": False},
        )
        r = run_rank("--config", str(cfg))
        out = r.stdout + r.stderr
        assert r.returncode == 2 and "Traceback" not in out, out[-4000:]
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, r.stderr[-3000:]
        assert f"no space left on the disk mounted at {disk} (tmpfs)" in errors[0] and "more is needed" in errors[0], (
            errors
        )
        (run_root,) = _run_roots(disk / "runs")
        folders = sorted(p.name for p in (run_root / "checkpoints").iterdir() if p.is_dir())
        from trainer.checkpoint.integrity import damaged_files
        from trainer.checkpoint.store import CheckpointStore

        committed = CheckpointStore(run_root).committed()
        assert [c.tag for c in committed] == folders and len(folders) >= 2  # nothing partial left, nothing lost
        assert f"newest: {folders[-1]}" in errors[0]
        assert all(not damaged_files(c.path, c.metadata) for c in committed)
