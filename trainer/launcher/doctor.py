"""`trainer doctor`: what a user checks first on a new VM, each PASS/FAIL with a one-line reason.

Torch and the accelerator (CUDA, NCCL, every GPU's name, memory, compute capability and bf16), DeepSpeed and
its ops, and with a config: free disk at `run_dir` against that run's checkpoints, the bucket (a create-only
probe object, deleted), the MLflow server; with a hostfile: every host over ssh. Nothing else is written.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.errors import UserError
from trainer.progress import gb


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _cpu_mode() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu"


def check_torch(precision: Optional[str] = None) -> list[Check]:
    import platform

    import torch

    out = [Check("torch", True, f"torch {torch.__version__}, Python {platform.python_version()}")]
    if torch.cuda.is_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "none"
        out.append(Check("cuda", True, f"CUDA {torch.version.cuda}, NCCL {nccl}, {torch.cuda.device_count()} GPU(s)"))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cc = f"{p.major}.{p.minor}"
            bf16 = p.major >= 8
            out.append(
                Check(
                    f"gpu {i}",
                    bf16 or precision != "bf16",
                    f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute"
                    f" capability {cc},"
                    + (
                        " bf16 supported"
                        if bf16
                        else " no bf16 (compute capability < 8.0)"
                        + (": train.precision bf16 will fail, use fp16" if precision == "bf16" else "")
                    ),
                )
            )
    elif _cpu_mode():
        gloo = torch.distributed.is_available() and torch.distributed.is_gloo_available()
        out.append(
            Check(
                "cuda",
                gloo,
                f"no GPU; DS_ACCELERATOR=cpu: ranks train on the CPU over gloo ({os.cpu_count()} cores)"
                + ("" if gloo else ", but this torch has no gloo"),
            )
        )
    else:
        build = (
            "a CPU-only build of torch"
            if torch.version.cuda is None
            else f"CUDA {torch.version.cuda} build, no device seen"
        )
        out.append(
            Check(
                "cuda",
                False,
                f"no GPU visible ({build}); check the driver with nvidia-smi, or set DS_ACCELERATOR=cpu"
                " to train on the CPU",
            )
        )
    return out


def check_deepspeed(build: bool = False) -> list[Check]:
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as exc:  # an import that fails here fails every rank
        return [Check("deepspeed", False, f"import failed: {type(exc).__name__}: {exc}")]
    out = [
        Check("deepspeed", True, f"DeepSpeed {deepspeed.__version__}, accelerator {get_accelerator().device_name()}")
    ]
    from torch.utils.cpp_extension import is_ninja_available

    builders = _op_builders()
    bad = [name for name, b in builders if not _compatible(b)]
    ninja = is_ninja_available()
    cxx = shutil.which(os.environ.get("CXX", "c++")) is not None
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    names = ", ".join(name for name, _ in builders)
    ok = not bad and ninja and cxx
    detail = (
        f"ops {names}: "
        + ("compatible" if not bad else f"not compatible here: {', '.join(bad)}")
        + ("" if ninja else "; ninja missing (pip install ninja)")
        + ("" if cxx else "; no C++ compiler")
        + f"; JIT builds cached in {where}"
    )
    out.append(Check("deepspeed ops", ok, detail))
    if build and ok:
        for name, builder in builders:
            t0 = time.perf_counter()
            try:
                builder.load(verbose=False)
                out.append(
                    Check(
                        f"build {name}", True, f"built (or loaded from the cache) in {time.perf_counter() - t0:.1f} s"
                    )
                )
            except Exception as exc:
                last = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
                out.append(Check(f"build {name}", False, f"{type(exc).__name__}: {last[0]}"))
    return out


def _op_builders() -> list[tuple[str, Any]]:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    cpu = _cpu_mode() or acc.device_name() == "cpu"
    names = ["CPUAdamBuilder"] + (["ShareMemCommBuilder"] if cpu else ["FusedAdamBuilder"])
    out = []
    for name in names:
        try:
            out.append((name.removesuffix("Builder"), acc.create_op_builder(name)))
        except Exception:
            continue
    return [(n, b) for n, b in out if b is not None]


def _compatible(builder: Any) -> bool:
    try:
        return bool(builder.is_compatible(verbose=False))
    except TypeError:
        return bool(builder.is_compatible())
    except Exception:
        return False


def checkpoint_bytes(cfg: Any) -> tuple[Optional[int], str]:
    """A checkpoint's size: the newest local one's, else the task's estimate (None: unknown before the first)."""
    newest = sorted(Path(cfg.run_dir).glob("*/checkpoints/step-*/metadata.json"), key=lambda p: p.stat().st_mtime)
    if newest:
        ckpt = newest[-1].parent
        from trainer.checkpoint.store import checkpoint_bytes as size_of

        return size_of(ckpt), f"{ckpt.name} of this run_dir"
    from trainer.tasks import build_task

    try:
        estimate = getattr(build_task(cfg), "state_bytes_estimate", lambda: None)()
    except UserError:
        estimate = None  # (the config's own problems are `trainer validate`'s to report)
    return (estimate, "estimated from the model") if estimate else (None, "")


def check_disk(cfg: Any) -> Check:
    where = Path(cfg.run_dir).absolute()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    size, source = checkpoint_bytes(cfg)
    if size is None:
        return Check("disk", True, f"{gb(free)} free at {where} (a checkpoint's size is known after the first one)")
    need = size * (cfg.checkpoint.keep_last + 1)  # the kept ones and the one being written
    detail = (
        f"{gb(free)} free at {where}; a checkpoint is {gb(size)} ({source}), checkpoint.keep_last"
        f" {cfg.checkpoint.keep_last} + 1 being written need {gb(need)}"
    )
    return Check("disk", free >= need, detail)


def check_bucket(url: str) -> Check:
    from trainer.log import redact
    from trainer.storage import describe_error, open_storage

    try:
        storage = open_storage(url, retry_deadline_s=20)
        storage.check(timeout_s=20)
        name = f".trainer-doctor-{uuid.uuid4().hex[:12]}"
        t0 = time.perf_counter()
        storage.put_bytes(name, b"trainer doctor probe\n")
        try:
            storage.delete(name)
        except Exception as exc:
            return Check(
                "bucket",
                False,
                f"{redact(url)}: created a probe object but could not delete it ({describe_error(exc)}):"
                f" uploads work, retention of old checkpoints in the bucket will not",
            )
        return Check(
            "bucket",
            True,
            f"{redact(url)}: listed, created and deleted a probe object in {time.perf_counter() - t0:.2f} s",
        )
    except UserError as exc:
        return Check("bucket", False, str(exc))
    except Exception as exc:
        return Check("bucket", False, f"{redact(url)}: {describe_error(exc)}")


def check_mlflow(cfg: Any) -> Check:
    from trainer.log import redact

    uri = cfg.tracking.uri
    if not cfg.tracking.enabled:
        return Check("mlflow", True, "tracking.enabled is false")
    if not uri:
        return Check("mlflow", True, f"a local store under {cfg.run_dir} (tracking.uri not set)")
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return Check("mlflow", True, f"{redact(uri)} answers ({r.status})")
        except urllib.error.HTTPError as exc:
            return Check(
                "mlflow",
                exc.code < 500 and exc.code not in (401, 403),
                f"{redact(uri)} answers HTTP {exc.code}"
                + (" (credentials: MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD)" if exc.code in (401, 403) else ""),
            )
        except Exception as exc:
            return Check("mlflow", False, f"{redact(uri)} unreachable: {getattr(exc, 'reason', exc)}")
    return Check("mlflow", True, f"{redact(uri)} (a local store)")


def check_hosts(hostfile: Path) -> list[Check]:
    from trainer.launcher.hostfile import is_local, parse_hostfile
    from trainer.launcher.over_ssh import ssh_unreachable

    hosts = list(parse_hostfile(hostfile))
    if len(hosts) == 1:  # DeepSpeed's runner starts one host's ranks on this machine, without ssh
        return [Check(f"host {hosts[0]}", True, "one host: the ranks start on this machine (no ssh, no pdsh)")]
    out = [
        Check(
            "pdsh",
            shutil.which("pdsh") is not None,
            "found"
            if shutil.which("pdsh")
            else "not installed: DeepSpeed's runner reaches the hosts through it (apt-get install pdsh)",
        )
    ]
    bad = ssh_unreachable(hosts)  # this machine too: pdsh reaches every host, its own included, over ssh
    for h in hosts:
        note = " (this machine)" if is_local(h) else ""
        out.append(Check(f"host {h}", h not in bad, bad.get(h, "ssh without a password works") + note))
    return out


def run_doctor(
    cfg: Optional[Any], hostfile: Optional[Path], echo: Callable[[str], None], build_ops: bool = False
) -> bool:
    precision = cfg.train.precision if cfg is not None else None
    checks: list[Callable[[], list[Check]]] = [lambda: check_torch(precision), lambda: check_deepspeed(build_ops)]
    if cfg is not None:
        checks.append(lambda: [check_disk(cfg)])
        if cfg.upload.url:
            checks.append(lambda: [check_bucket(cfg.upload.url)])
        checks.append(lambda: [check_mlflow(cfg)])
    if hostfile is not None:
        checks.append(lambda: check_hosts(hostfile))
    failed = 0
    total = 0
    for check in checks:
        for c in check():
            total += 1
            failed += not c.ok
            echo(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<14} {c.detail}")
    echo(f"{total - failed}/{total} checks passed")
    return failed == 0
