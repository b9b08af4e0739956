#!/usr/bin/env python
"""Preemption simulator: kill a training job at random moments, restart it, compare with a clean run.

    python tools/preemptible_sim.py configs/pretrain_tiny.yaml --trials 100 --ranks 2 --max-steps 60

1. A reference run trains CONFIG to --max-steps without interruption.
2. The same command (`trainer train CONFIG --resume auto`, uploads to a local file:// bucket) is
   started again and again. Each start is stopped after a random delay, by SIGTERM (the job saves,
   drains uploads, exits 75) or, with --sigkill-prob, by SIGKILL of every process of the job (a
   hard stop mid-step, mid-save or mid-upload). With --fresh-prob the local run folder is wiped
   before the restart (a new VM: the job must come back from the bucket). After --trials kills the
   job runs to the end.
3. Verdict: the loss of every step and the final fp32 weights equal the reference bit for bit; no
   restart failed (a corrupt resume); no restart went back behind the newest checkpoint that was
   committed locally (same machine) or complete in the bucket (fresh machine) at the kill.

Prints one line per trial (signal, kill point, step, exit code, seconds from SIGTERM to exit, share
of committed checkpoints that were in the bucket at exit, resume step) and the verdict; exit code 0
only if the verdict is PASS.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


@dataclass
class Trial:
    n: int
    signal: str
    point: str = ""
    step: Optional[int] = None  # newest step logged before the kill
    code: Optional[int] = None
    exit_s: Optional[float] = None  # SIGTERM to exit
    in_bucket: Optional[str] = None  # committed checkpoints in the bucket at exit / committed
    fresh: bool = False
    resumed_at: Optional[int] = None  # of the start that followed
    expected_at_least: int = 0
    problem: str = ""


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob("*/checkpoints/step-*/metadata.json"))


def bucket_steps(bucket: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in bucket.glob("*/step-*/manifest.json"))


def kill_point(run_dir: Path, log: str) -> str:
    if not re.search(r"step \d+/\d+", log):
        return "setup"
    ckpt_dirs = list(run_dir.glob("*/checkpoints/step-*"))
    if any(not (d / "metadata.json").exists() for d in ckpt_dirs):
        return "mid-save"
    for d in ckpt_dirs:
        try:
            if json.loads((d / "upload_state.json").read_text()).get("state") in ("pending", "uploading"):
                return "mid-upload"
        except (OSError, ValueError):
            pass
    return "mid-step"


def job_processes(root: int) -> list:
    import psutil

    try:
        parent = psutil.Process(root)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def final_checkpoint(run_dir: Path, step: int) -> Path:
    found = sorted(run_dir.glob(f"*/checkpoints/step-{step:08d}"))
    if not found:
        raise SystemExit(f"no final checkpoint step-{step:08d} under {run_dir}")
    return found[-1]


def weights_equal(a: Path, b: Path) -> bool:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    wa = get_fp32_state_dict_from_zero_checkpoint(str(a.parent), tag=a.name)
    wb = get_fp32_state_dict_from_zero_checkpoint(str(b.parent), tag=b.name)
    return wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape and bool((wa[k] == wb[k]).all()) for k in wa)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--trials", type=int, default=10, help="kills before the job may finish")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--sigkill-prob", type=float, default=0.3, help="share of hard stops (SIGKILL to every process)")
    p.add_argument("--fresh-prob", type=float, default=0.2, help="share of restarts on a wiped run folder (a new VM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grace", type=float, default=25.0, help="preemption.grace_s")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="more config overrides")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="preempt-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    ref_dir, sim_dir, bucket = work / "reference", work / "sim", work / "bucket"
    common = [sys.executable, "-m", "trainer.cli.main", "train", str(args.config.resolve()), "--num-ranks", str(args.ranks),
              "--max-steps", str(args.max_steps), "--set", f"optim.decay_steps={args.max_steps}", "--set", "train.log_every=1",
              "--set", f"checkpoint.save_every={args.save_every}", "--set", "checkpoint.keep_last=2",
              "--set", "tracking.enabled=false", "--set", f"preemption.grace_s={args.grace}"]
    for s in args.sets:
        common += ["--set", s]

    t0 = time.monotonic()
    ref = subprocess.run([*common, "--set", f"run_dir={ref_dir}", "--resume", "none"], cwd=REPO, capture_output=True, text=True)
    ref_s = time.monotonic() - t0
    if ref.returncode != 0:
        print(ref.stdout[-3000:] + ref.stderr[-3000:])
        raise SystemExit(f"the reference run failed with exit code {ref.returncode}")
    m = re.search(r"done: \d+ steps in ([\d.]+) s", ref.stdout + ref.stderr)
    train_s = float(m.group(1)) if m else ref_s / 2
    setup_s = max(1.0, ref_s - train_s)
    print(f"reference: {args.max_steps} steps in {ref_s:.1f} s ({setup_s:.1f} s setup, {train_s:.1f} s training; {work})")

    sim_cmd = [*common, "--set", f"run_dir={sim_dir}", "--set", f"upload.url=file://{bucket}", "--resume", "auto"]
    trials: list[Trial] = []
    starts = 0
    while True:
        starts += 1
        log = work / f"start-{starts:03d}.log"
        proc = start(sim_cmd, log)
        if trials:  # the start that follows a kill: where did it resume?
            prev = trials[-1]
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline and not (
                    RESUMED.search(log.read_text()) or re.search(r"step \d+/\d+", log.read_text())):
                time.sleep(0.05)
            m = RESUMED.search(log.read_text())
            prev.resumed_at = int(m.group(1)) if m else 0
            if prev.resumed_at < prev.expected_at_least:
                prev.problem = f"resumed at {prev.resumed_at}, behind step {prev.expected_at_least}"
        if len(trials) >= args.trials:
            code = proc.wait()
            if code != 0:
                print(log.read_text()[-3000:])
                print(f"the last start exited {code}: FAIL")
                return 1
            break
        aim = rng.choices(["setup", "mid-step", "mid-save", "mid-upload"], weights=[1, 4, 2.5, 2.5])[0]
        if aim == "setup":  # before the first step (or at it, if setup is quicker than the draw)
            deadline = time.monotonic() + rng.uniform(0.2, 1.0) * setup_s
            while proc.poll() is None and time.monotonic() < deadline and not re.search(r"step \d+/\d+", log.read_text()):
                time.sleep(0.01)
        else:
            while proc.poll() is None and not re.search(r"step \d+/\d+", log.read_text()):
                time.sleep(0.02)
            # spread the kills over the run: on average the steps left shared by the kills left
            at = (trials[-1].resumed_at or 0) if trials else 0
            per_kill = max(1.0, (args.max_steps - at) / (args.trials - len(trials) + 1))
            deadline = time.monotonic() + rng.uniform(0.0, 2.0) * per_kill * train_s / args.max_steps
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if aim in ("mid-save", "mid-upload"):  # then wait for the next save, or upload, to be under way
                while proc.poll() is None and kill_point(sim_dir, "step 1/1") != aim:
                    time.sleep(0.001)
        if proc.poll() is not None:  # it got to the end (or failed) before the kill
            if proc.returncode != 0:
                print(log.read_text()[-3000:])
                trials.append(Trial(len(trials) + 1, "none", code=proc.returncode, problem=f"exited {proc.returncode} unprompted"))
            break
        hard = rng.random() < args.sigkill_prob
        text = log.read_text()
        steps = re.findall(r"step (\d+)/\d+", text)
        trial = Trial(len(trials) + 1, "SIGKILL" if hard else "SIGTERM", kill_point(sim_dir, text), int(steps[-1]) if steps else None)
        if hard:
            for q in job_processes(proc.pid) + _upload_workers(sim_dir):
                try:
                    q.kill()
                except Exception:
                    pass
            trial.code = proc.wait()
            _reap(_upload_workers(sim_dir))
        else:
            t_sig = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                trial.code = proc.wait(timeout=args.grace + 60)
            except subprocess.TimeoutExpired:
                trial.problem = "did not exit within the grace period + 60 s"
                for q in job_processes(proc.pid):
                    q.kill()
                trial.code = proc.wait()
            trial.exit_s = time.monotonic() - t_sig
            local, remote = committed_steps(sim_dir), set(bucket_steps(bucket))
            trial.in_bucket = f"{sum(s in remote for s in local)}/{len(local)}"
            if trial.code not in (0, 75) and trial.point != "setup":
                trial.problem = f"exit code {trial.code} after SIGTERM"
        if trial.code == 0:  # the stop came on the last step: the run is complete
            trials.append(trial)
            break
        trial.fresh = rng.random() < args.fresh_prob
        if trial.fresh:
            shutil.rmtree(sim_dir, ignore_errors=True)
            trial.expected_at_least = max(bucket_steps(bucket), default=0)
        else:
            trial.expected_at_least = max(committed_steps(sim_dir), default=0)
        trials.append(trial)

    # Compare with the reference.
    a = final_checkpoint(ref_dir, args.max_steps)
    b = final_checkpoint(sim_dir, args.max_steps)
    la = json.loads((a / "metadata.json").read_text())["loss_history"]
    lb = json.loads((b / "metadata.json").read_text())["loss_history"]
    same_losses = la == lb
    same_weights = weights_equal(a, b)

    print("\n| trial | signal | kill point | step | exit | SIGTERM->exit (s) | in bucket at exit | next start | resumed at | problem |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in trials:
        print(f"| {t.n} | {t.signal} | {t.point} | {t.step if t.step is not None else '-'} | {t.code} | "
              f"{f'{t.exit_s:.1f}' if t.exit_s is not None else '-'} | {t.in_bucket or '-'} | "
              f"{'fresh VM' if t.fresh else 'same VM'} | {t.resumed_at if t.resumed_at is not None else '-'} | {t.problem} |")
    problems = [t for t in trials if t.problem]
    term = [t.exit_s for t in trials if t.exit_s is not None]
    shares = [t.in_bucket for t in trials if t.in_bucket]
    full = sum(1 for s in shares if s.split("/")[0] == s.split("/")[1])
    points = {k: sum(1 for t in trials if t.point == k) for k in ("setup", "mid-step", "mid-save", "mid-upload")}
    print(f"\nkill points: {', '.join(f'{v} {k}' for k, v in points.items())}; "
          f"{sum(t.signal == 'SIGKILL' for t in trials)} SIGKILL, {sum(t.fresh for t in trials)} fresh VMs")
    if term:
        print(f"SIGTERM to exit: median {statistics.median(term):.1f} s, max {max(term):.1f} s (grace {args.grace:.0f} s)")
    if shares:
        print(f"every committed checkpoint in the bucket at exit after SIGTERM: {full} of {len(shares)} stops")
    print(f"losses per step equal to the reference: {same_losses}; final fp32 weights equal: {same_weights}")
    print(f"corrupt resumes or lost checkpoints: {len(problems)}")
    ok = same_losses and same_weights and not problems
    print(f"verdict: {'PASS' if ok else 'FAIL'} ({len(trials)} trials, {starts} starts)")
    if args.workdir is None and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _upload_workers(run_dir: Path) -> list:
    """This job's upload processes: they run in sessions of their own, and a hard stop of the VM takes them too."""
    import psutil

    out = []
    for q in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(q.info["cmdline"] or [])
            if "trainer.upload.worker" in cmd and str(run_dir) in cmd:
                out.append(q)
        except psutil.Error:
            pass
    return out


def _reap(procs: list) -> None:
    import psutil

    psutil.wait_procs(procs, timeout=10)


if __name__ == "__main__":
    sys.exit(main())
