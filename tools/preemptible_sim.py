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
3. Verdict, strict: FAIL, with the trial named, when the loss or the learning rate of any step or the
   final fp32 weights differ from the reference; a restart did not resume, or resumed behind the newest
   checkpoint committed locally (same machine), or behind the newest one any start reported uploaded
   (fresh machine; the bucket must hold every one of those); a SIGTERM stop exited with a code other
   than 0/75, or later than grace + --teardown; its save fit the budget but no checkpoint was
   committed at the stop step; it left a committed checkpoint neither in the bucket nor reported as
   local; fewer trials ran than asked (a run that finishes first is extended, with its reference);
   or, after a final `trainer upload-all`, the bucket holds an object no manifest names.

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


def reported(log_text: str) -> tuple[set[int], set[int]]:
    """Steps the job said were uploaded (verified in the bucket), and steps it said were left local at exit."""
    up = {int(m) for m in re.findall(r"\buploaded step-(\d+)", log_text)}
    up |= {int(m) for m in re.findall(r"checkpoint step-(\d+): uploaded \(", log_text)}
    local = {int(m) for m in re.findall(r"checkpoint step-(\d+): [^\n]*still local", log_text)}
    return up, local


def manifest_named(bucket: Path) -> set[str]:
    """Every object some manifest names: the manifests themselves and their parts (and nodes' reports)."""
    named = set()
    for m in bucket.rglob("manifest.json"):
        prefix = m.parent.relative_to(bucket)
        named.add(str(prefix / "manifest.json"))
        for part in json.loads(m.read_text()).get("parts", []):
            named.add(str(prefix / part["name"]))
        named |= {str(prefix / n.name) for n in m.parent.glob("node*.json")}
    return named


def reference_run(common: list[str], ref_dir: Path, max_steps: int) -> tuple[float, float]:
    """An uninterrupted run to `max_steps`; returns (wall s, training s)."""
    shutil.rmtree(ref_dir, ignore_errors=True)
    t0 = time.monotonic()
    ref = subprocess.run(
        [*common, "--max-steps", str(max_steps), "--set", f"run_dir={ref_dir}", "--resume", "none"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - t0
    if ref.returncode != 0:
        print(ref.stdout[-3000:] + ref.stderr[-3000:])
        raise SystemExit(f"the reference run failed with exit code {ref.returncode}")
    m = re.search(r"done: \d+ steps in ([\d.]+) s", ref.stdout + ref.stderr)
    return wall, float(m.group(1)) if m else wall / 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument(
        "--trials", type=int, default=10, help="kills before the job may finish (a run that ends first is extended)"
    )
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--sigkill-prob", type=float, default=0.3, help="share of hard stops (SIGKILL to every process)")
    p.add_argument("--fresh-prob", type=float, default=0.2, help="share of restarts on a wiped run folder (a new VM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grace", type=float, default=25.0, help="preemption.grace_s")
    p.add_argument(
        "--teardown",
        type=float,
        default=5.0,
        help="seconds a stopped job may take beyond its grace period (a preemptible VM's 30 s less the default"
        " 25 s grace): a later exit fails the trial",
    )
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="more config overrides")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="preempt-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    ref_dir, sim_dir, bucket = work / "reference", work / "sim", work / "bucket"
    # decay_steps stays at the first --max-steps: a run extended later keeps the schedule of the steps before
    common = [
        sys.executable,
        "-m",
        "trainer.cli.main",
        "train",
        str(args.config.resolve()),
        "--num-ranks",
        str(args.ranks),
        "--set",
        f"optim.decay_steps={args.max_steps}",
        "--set",
        "train.log_every=1",
        "--set",
        f"checkpoint.save_every={args.save_every}",
        "--set",
        "checkpoint.keep_last=2",
        "--set",
        "tracking.enabled=false",
        "--set",
        f"preemption.grace_s={args.grace}",
    ]
    for s in args.sets:
        common += ["--set", s]

    keep_remote = next(
        (
            int(s.split("=", 1)[1])
            for s in args.sets
            if s.startswith("upload.keep_remote=") and s.split("=", 1)[1] not in ("", "null", "none")
        ),
        None,
    )
    max_steps = args.max_steps
    ref_s, train_s = reference_run(common, ref_dir, max_steps)
    setup_s = max(1.0, ref_s - train_s)
    print(f"reference: {max_steps} steps in {ref_s:.1f} s ({setup_s:.1f} s setup, {train_s:.1f} s training; {work})")

    def extend(steps: int, ran: int) -> tuple[int, tuple[float, float]]:
        """The run finished with trials still to run: go on to more steps (the reference too) rather than pass on
        fewer."""
        steps += max(args.save_every * 2, args.max_steps // 2)
        print(
            f"the run finished after {ran} of {args.trials} trials: extending it to {steps} steps (and the reference)"
        )
        return steps, reference_run(common, ref_dir, steps)

    trials: list[Trial] = []
    uploaded: set[int] = set()  # every step any start said was uploaded
    starts = 0
    extended = 0
    while True:
        starts += 1
        log = work / f"start-{starts:03d}.log"
        sim_cmd = [
            *common,
            "--max-steps",
            str(max_steps),
            "--set",
            f"run_dir={sim_dir}",
            "--set",
            f"upload.url=file://{bucket}",
            "--resume",
            "auto",
        ]
        proc = start(sim_cmd, log)
        prev = trials[-1] if trials else None
        if len(trials) >= args.trials:
            code = proc.wait()
            _check_resume(prev, log.read_text())
            uploaded |= reported(log.read_text())[0]
            if code != 0:
                print(log.read_text()[-3000:])
                print(f"the last start exited {code}: FAIL")
                return 1
            break
        # aim at a moment of this start, from its first instant on (a restart can be stopped during its setup too)
        aim = rng.choices(["setup", "mid-step", "mid-save", "mid-upload"], weights=[1, 4, 2.5, 2.5])[0]
        if aim == "setup":  # before the first step (or at it, if setup is quicker than the draw)
            deadline = time.monotonic() + rng.uniform(0.2, 1.0) * setup_s
            while (
                proc.poll() is None and time.monotonic() < deadline and not re.search(r"step \d+/\d+", log.read_text())
            ):
                time.sleep(0.01)
        else:
            while proc.poll() is None and not re.search(r"step \d+/\d+", log.read_text()):
                time.sleep(0.02)
            # spread the kills over the run: on average the steps left shared by the kills left
            m = RESUMED.search(log.read_text())
            at = int(m.group(1)) if m else 0
            per_kill = max(1.0, (max_steps - at) / (args.trials - len(trials) + 1))
            deadline = time.monotonic() + rng.uniform(0.0, 2.0) * per_kill * train_s / max_steps
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if aim in ("mid-save", "mid-upload"):  # then wait for the next save, or upload, to be under way
                while proc.poll() is None and kill_point(sim_dir, "step 1/1") != aim:
                    time.sleep(0.001)
        if proc.poll() is not None:  # it got to the end (or failed) before the kill
            text = log.read_text()
            _check_resume(prev, text)
            uploaded |= reported(text)[0]
            if proc.returncode != 0:
                print(text[-3000:])
                trials.append(
                    Trial(len(trials) + 1, "none", code=proc.returncode, problem=f"exited {proc.returncode} unprompted")
                )
                break
            # finished with trials still to run: extend the run (and the reference) rather than pass on fewer trials
            extended += 1
            max_steps, (ref_s, train_s) = extend(max_steps, len(trials))
            continue
        hard = rng.random() < args.sigkill_prob
        text = log.read_text()
        steps = re.findall(r"step (\d+)/\d+", text)
        trial = Trial(
            len(trials) + 1,
            "SIGKILL" if hard else "SIGTERM",
            kill_point(sim_dir, text),
            int(steps[-1]) if steps else None,
        )
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
                for q in job_processes(proc.pid):
                    q.kill()
                trial.code = proc.wait()
            trial.exit_s = time.monotonic() - t_sig
        text = log.read_text()
        _check_resume(prev, text)
        said_uploaded, said_local = reported(text)
        uploaded |= said_uploaded
        local = committed_steps(sim_dir)
        if not hard:
            remote = set(bucket_steps(bucket))
            trial.in_bucket = f"{sum(s in remote for s in local)}/{len(local)}"
            trial.problem = _sigterm_problems(
                trial, text, local, remote, said_local, sim_dir, args.grace + args.teardown
            )
        if trial.code == 0:  # the stop came on the last step: the run is complete
            trials.append(trial)
            if len(trials) >= args.trials:
                break
            extended += 1
            max_steps, (ref_s, train_s) = extend(max_steps, len(trials))
            continue
        trial.fresh = rng.random() < args.fresh_prob
        if trial.fresh:
            remote = set(bucket_steps(bucket))
            # (with upload.keep_remote the job deletes older uploads itself: only the newest reported must be there)
            must_have = {max(uploaded)} if keep_remote and uploaded else uploaded
            if lost := sorted(must_have - remote):
                trial.problem = _join(trial.problem, f"the bucket lacks step(s) {lost} reported uploaded")
            shutil.rmtree(sim_dir, ignore_errors=True)
            trial.expected_at_least = max(uploaded | remote, default=0)
        else:
            trial.expected_at_least = max(local, default=0)
        if prev is not None and prev.resumed_at is None:  # this start was stopped before it chose: the floor carries on
            trial.expected_at_least = max(trial.expected_at_least, prev.expected_at_least)
        trials.append(trial)

    # After the last start: every committed checkpoint uploaded, and nothing in the bucket that no manifest names.
    up_all = subprocess.run(
        [sys.executable, "-m", "trainer.cli.main", "upload-all", str(sim_dir), "--url", f"file://{bucket}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    objects = {str(q.relative_to(bucket)) for q in bucket.rglob("*") if q.is_file() and not q.name.endswith(".partial")}
    orphans = sorted(objects - manifest_named(bucket))

    # Compare with the reference.
    a = final_checkpoint(ref_dir, max_steps)
    b = final_checkpoint(sim_dir, max_steps)
    ma, mb = json.loads((a / "metadata.json").read_text()), json.loads((b / "metadata.json").read_text())
    same_losses = ma["loss_history"] == mb["loss_history"]
    same_lrs = ma["lr_history"] == mb["lr_history"]
    same_weights = weights_equal(a, b)

    print(
        "\n| trial | signal | kill point | step | exit | SIGTERM->exit (s) | in bucket at exit | next start | resumed "
        "at | problem |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in trials:
        resumed = (
            t.resumed_at if t.resumed_at is not None else "-" if t.code == 0 else "- (next start stopped in setup)"
        )
        print(
            f"| {t.n} | {t.signal} | {t.point} | {t.step if t.step is not None else '-'} | {t.code} | "
            f"{f'{t.exit_s:.1f}' if t.exit_s is not None else '-'} | {t.in_bucket or '-'} | "
            f"{'fresh VM' if t.fresh else 'same VM'} | {resumed} | {t.problem} |"
        )
    problems = [t for t in trials if t.problem]
    term = [t.exit_s for t in trials if t.exit_s is not None]
    shares = [t.in_bucket for t in trials if t.in_bucket]
    full = sum(1 for s in shares if s.split("/")[0] == s.split("/")[1])
    points = {k: sum(1 for t in trials if t.point == k) for k in ("setup", "mid-step", "mid-save", "mid-upload")}
    print(
        f"\nkill points: {', '.join(f'{v} {k}' for k, v in points.items())}; "
        f"{sum(t.signal == 'SIGKILL' for t in trials)} SIGKILL, {sum(t.fresh for t in trials)} fresh VMs"
        f"{f'; run extended {extended} time(s) to {max_steps} steps' if extended else ''}"
    )
    if term:
        print(
            f"SIGTERM to exit: median {statistics.median(term):.1f} s, max {max(term):.1f} s (grace {args.grace:.0f} s"
            f" + teardown {args.teardown:.0f} s allowed)"
        )
    if shares:
        print(f"every committed checkpoint in the bucket at exit after SIGTERM: {full} of {len(shares)} stops")
    print(
        f"losses per step equal to the reference: {same_losses}; learning rates equal: {same_lrs};"
        f" final fp32 weights equal: {same_weights}"
    )
    print(
        f"upload-all after the last start: exit {up_all.returncode}; objects in the bucket no manifest names:"
        f" {len(orphans)}{f' ({orphans[:5]})' if orphans else ''}"
    )
    print(f"corrupt resumes or lost checkpoints: {len(problems)}")
    enough = len(trials) >= args.trials
    if not enough:
        print(f"only {len(trials)} of {args.trials} trials ran")
    ok = (
        same_losses and same_lrs and same_weights and not problems and not orphans and up_all.returncode == 0 and enough
    )
    print(f"verdict: {'PASS' if ok else 'FAIL'} ({len(trials)} trials, {starts} starts)")
    if args.workdir is None and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _check_resume(prev: Optional[Trial], text: str) -> None:
    """Where the start after `prev`'s kill resumed, checked against the newest checkpoint that had to survive. A start
    stopped before it chose (during its setup) leaves `prev` unchecked; the next trial's floor covers the same steps."""
    if prev is None or prev.resumed_at is not None:
        return
    m = RESUMED.search(text)
    if m is None and not re.search(r"step \d+/\d+", text):
        return  # stopped before it chose where to resume
    prev.resumed_at = int(m.group(1)) if m else 0
    if prev.resumed_at < prev.expected_at_least:
        what = "did not resume, though" if prev.resumed_at == 0 else f"resumed at {prev.resumed_at}, behind"
        prev.problem = _join(prev.problem, f"{what} step {prev.expected_at_least} was committed")


def _sigterm_problems(
    t: Trial, text: str, local: list[int], remote: set[int], said_local: set[int], run_dir: Path, limit_s: float
) -> str:
    """What a SIGTERM stop got wrong: its exit code and time, its emergency checkpoint, where it left each
    checkpoint."""
    out = ""
    if t.code not in (0, 75):
        out = _join(out, f"exit code {t.code} after SIGTERM")
    if t.exit_s is not None and t.exit_s > limit_s:
        out = _join(out, f"exit {t.exit_s:.1f} s after SIGTERM, later than grace + teardown ({limit_s:.0f} s)")
    m = re.search(r"stopped at step (\d+)", text)
    if t.code == 75 and m and not re.search(r"not saving at step", text):  # the save fit the budget: it must be there
        at = int(m.group(1))
        meta = next(iter(run_dir.glob(f"*/checkpoints/step-{at:08d}/metadata.json")), None)
        if meta is None:
            out = _join(out, f"no checkpoint committed at the stop step {at}")
        elif (reason := json.loads(meta.read_text()).get("reason")) not in ("preemption", "scheduled", "best", "final"):
            out = _join(out, f"the checkpoint at the stop step {at} says reason {reason!r}")
    if unaccounted := [s for s in local if s not in remote and s not in said_local]:
        out = _join(out, f"committed step(s) {unaccounted} neither in the bucket nor reported as local")
    return out


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
