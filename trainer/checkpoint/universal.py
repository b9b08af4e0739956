"""Elastic resume: a checkpoint converted once to DeepSpeed's universal format, for another world size.

DeepSpeed ZeRO-1/2 checkpoints hold each rank's slice of the flat fp32 weights and Adam moments; they
load only on the world size that saved them. DeepSpeed's own converter (`ds_to_universal`) writes one
file per parameter and state (`zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`, `step.pt`),
which an engine with `checkpoint.load_universal` slices for any world size.

The conversion lives inside the checkpoint it came from, `step-NNNNNNNN/universal/`, so retention
removes it with its source and nothing lists it as a checkpoint. It is built in a hidden staging
folder beside the checkpoint (`.universal-<tag>-<id>/`, from links to DeepSpeed's files only) and
renamed into place when whole, fsynced, with `conversion.json` written last: a crash leaves only a
staging folder, which the next start removes like any partial, and a finished conversion is reused
by every later resume. Nodes without a shared filesystem each convert their own copy; where two
nodes share one, the first rename wins and the other's copy is dropped.

Plain data-parallel ZeRO-1/2 checkpoints (what this project saves) are converted in one pass in the
rank's process: every rank's states memory-mapped once, each parameter gathered and written once,
the same files DeepSpeed's converter writes (tested tensor for tensor). Anything else goes to
DeepSpeed's `ds_to_universal` in a child process (`python -m trainer.checkpoint.universal`): it
forks worker processes, which a rank holding threads and a process group must not do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainer.checkpoint.store import atomic_write, fsync_dir, fsync_tree
from trainer.errors import UserError
from trainer.log import get_logger
from trainer.progress import gb

log = get_logger("checkpoint")

UNIVERSAL_DIR = "universal"  # inside the source checkpoint
STAGING_PREFIX = ".universal-"  # hidden staging folders beside the source checkpoint (partials: removed at start)
RECORD = "conversion.json"  # written last inside the conversion: it is whole
ELASTIC_STAGES = (1, 2)  # ZeRO stages whose checkpoints resume on another world size here


@dataclass(frozen=True)
class Conversion:
    path: Path  # the universal folder (`<checkpoint>/universal`)
    seconds: Optional[float]  # None: an earlier conversion was reused
    bytes: int


def universal_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir) / UNIVERSAL_DIR


def is_derived(rel: str) -> bool:
    """True for a path (relative to a checkpoint folder) that is not part of the checkpoint as saved but
    derived from it (its universal conversion). Uploads, sizes and listings leave it out."""
    return rel.replace("\\", "/").split("/", 1)[0] == UNIVERSAL_DIR


def existing(ckpt_dir: Path) -> Optional[Path]:
    """The finished conversion of `ckpt_dir`, if there is one."""
    u = universal_dir(ckpt_dir)
    return u if (u / RECORD).is_file() else None


_MODEL_STATES = re.compile(r"mp_rank_\d+_model_states\.pt")  # ZeRO-0/1/2: written by rank 0, read by every rank
_OPTIM_STATES = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def missing_states(ckpt_dir: Path, world_size: int) -> list[str]:
    """What the conversion needs and this folder lacks: every rank's ZeRO optimizer states and the model states.
    (A node of a multi-node run without a shared filesystem holds only its own ranks' files.)"""
    names = [p.name for p in Path(ckpt_dir).iterdir() if p.is_file()]
    ranks = {int(m.group(1)) for n in names if (m := _OPTIM_STATES.match(n))}
    out = [f"rank {r}'s optimizer states" for r in range(world_size) if r not in ranks]
    if not any(n.endswith("_model_states.pt") for n in names):
        out.append("the model states (mp_rank_00_model_states.pt)")
    return out


def needed_by_ranks(name: str, ranks: range, zero_stage: int) -> bool:
    """Does loading a checkpoint on its own world size read `name` on one of `ranks`? (ZeRO-1/2: every rank reads
    the model states rank 0 wrote; ZeRO-3: each rank its own; always each rank's optimizer states and RNG state.)"""
    if zero_stage < 3 and _MODEL_STATES.fullmatch(name):
        return True  # (ZeRO-0: the optimizer states are in there too)
    m = re.fullmatch(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt", name)
    if m:
        return int(m.group(1)) in ranks and (zero_stage >= 3 or name.endswith("_optim_states.pt"))
    m = re.fullmatch(r"rng_state_rank(\d+)\.pt", name)
    return bool(m) and int(m.group(1)) in ranks


def missing_for_ranks(ckpt_dir: Path, ranks: range, zero_stage: int) -> bool:
    """Does this node's copy of a checkpoint lack files its ranks load? (A node of a run without a shared filesystem
    holds only the files its own ranks wrote: under ZeRO-1/2 every node but the first lacks the model states.)"""
    if not Path(ckpt_dir).is_dir():
        return True
    names = {p.name for p in Path(ckpt_dir).iterdir() if p.is_file()}
    if zero_stage < 3 and not any(_MODEL_STATES.fullmatch(n) for n in names):
        return True
    if zero_stage == 0:  # no ZeRO files: the optimizer is in the model states
        return False
    have = {int(m.group(1)) for n in names if (m := _OPTIM_STATES.match(n))}
    return any(r not in have for r in ranks)


def missing_states_error(ckpt_dir: Path, world_size: int, missing: list[str], url: Optional[str]) -> UserError:
    """The one line for a checkpoint that lacks states the conversion needs (and that no bucket can supply)."""
    where = f"{url} does not hold it" if url else "no upload.url to fetch it from"
    return UserError(
        f"--resume: {ckpt_dir} lacks {', '.join(missing)} (saved by {world_size} ranks across nodes without a"
        f" shared filesystem?) and {where}: resume on {world_size} rank(s), or from the bucket"
    )


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ensure_universal(ckpt_dir: Path, workers: Optional[int] = None) -> Conversion:
    """The universal conversion of the committed checkpoint `ckpt_dir`, converting it if not done yet."""
    ckpt_dir = Path(ckpt_dir)
    done = existing(ckpt_dir)
    if done is not None:
        return Conversion(done, None, int(json.loads((done / RECORD).read_text()).get("bytes") or _size(done)))
    sources = sorted(
        p for p in ckpt_dir.iterdir() if p.is_file() and p.name.endswith(("_model_states.pt", "_optim_states.pt"))
    )
    # The converter walks its input folder recursively: it reads a folder of links to DeepSpeed's files
    # only, never a conversion (or another node's staging folder) inside the checkpoint.
    staging = ckpt_dir.parent / f"{STAGING_PREFIX}{ckpt_dir.name}-{uuid.uuid4().hex[:8]}"
    inputs, out = staging / "in", staging / "out"
    inputs.mkdir(parents=True)
    for p in sources:
        (inputs / p.name).symlink_to(p.resolve())
    started = time.monotonic()
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    plain = _plain_data_parallel(inputs)
    log.info(
        "converting %s to DeepSpeed's universal format (%s of ZeRO states, %s)",
        ckpt_dir.name,
        gb(sum(p.stat().st_size for p in sources)),
        "one pass" if plain else "DeepSpeed's ds_to_universal",
    )
    try:
        if plain:
            _convert_one_pass(inputs, out, workers)
        else:  # DeepSpeed's converter forks workers: in a child process, never in a rank holding threads
            cmd = [
                sys.executable,
                "-m",
                "trainer.checkpoint.universal",
                str(inputs),
                str(out),
                "--workers",
                str(workers),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise RuntimeError(f"converting {ckpt_dir} to universal failed (exit {proc.returncode}):\n{tail}")
        seconds = time.monotonic() - started
        size = _size(out)
        fsync_tree(out, files=True)
        atomic_write(
            out / RECORD,
            json.dumps(
                {
                    "source": ckpt_dir.name,
                    "seconds": round(seconds, 3),
                    "bytes": size,
                    "deepspeed": ds_version(),
                },
                indent=2,
            )
            + "\n",
        )
        try:
            os.rename(out, universal_dir(ckpt_dir))
        except OSError:  # another node sharing this filesystem finished first: keep its copy
            if existing(ckpt_dir) is None:
                raise
            return Conversion(universal_dir(ckpt_dir), None, size)
        fsync_dir(ckpt_dir)
        return Conversion(universal_dir(ckpt_dir), seconds, size)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ds_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:  # pragma: no cover - deepspeed is a dependency
        return "(not installed)"


def _convert_with_deepspeed(src: Path, out: Path, workers: int) -> None:
    """DeepSpeed's converter, as its command line would run it (universal info injected: a plain
    data-parallel model has none, and needs none)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(src),
        output_folder=str(out),
        num_extract_workers=workers,
        num_merge_workers=max(1, workers // 2),
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal.main(args)  # (it also points a `latest_universal` file in the staging folder at it)


_PLAIN_OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _plain_data_parallel(src: Path) -> bool:
    """A checkpoint of plain data parallelism under ZeRO-1/2's optimizer (no tensor, pipeline or expert
    parallelism, no bf16 optimizer): the layout the one-pass converter reads. Anything else goes to DeepSpeed's."""
    names = {p.name for p in src.iterdir()}
    optim = [n for n in names if n.endswith("_optim_states.pt")]
    return (
        names & {"mp_rank_00_model_states.pt"} == {"mp_rank_00_model_states.pt"}
        and not any(
            n.startswith(("layer_", "expert_")) or (n.startswith("mp_rank_") and n != "mp_rank_00_model_states.pt")
            for n in names
        )
        and bool(optim)
        and all(_PLAIN_OPTIM.match(n) for n in optim)
    )


def _convert_one_pass(src: Path, out: Path, workers: int) -> None:
    """The same files DeepSpeed's `ds_to_universal` writes for a plain data-parallel ZeRO-1/2 checkpoint, in one
    pass: every rank's states are memory-mapped once, and each parameter's fp32 weights and Adam moments are
    gathered from the ranks' flat partitions and written as `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`.

    DeepSpeed's converter writes every fragment to a temporary folder, reads them back to merge them and
    loads each rank's states three times; at neox-410m that made it 8x the time of reading and writing the
    bytes once. What it writes is the format `checkpoint.load_universal` reads, and the tests check the two
    converters' files are equal tensor for tensor."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        CAT_DIM,
        OPTIMIZER_STATE_DICT,
        PARAM,
        PARAM_GROUPS,
        PARAM_SHAPES,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    files = sorted((int(m.group(1)), p) for p in src.iterdir() if (m := _PLAIN_OPTIM.match(p.name)))
    assert [r for r, _ in files] == list(range(len(files))), f"data-parallel ranks {[r for r, _ in files]} in {src}"
    optim = [torch.load(p, map_location="cpu", mmap=True, weights_only=False)[OPTIMIZER_STATE_DICT] for _, p in files]
    model = torch.load(src / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False)
    zero = out / "zero"
    zero.mkdir(parents=True)

    def flat(rank: int, group: int, state: str) -> torch.Tensor:
        sd = optim[rank]
        return (
            sd[SINGLE_PARTITION_OF_FP32_GROUPS][group]
            if state == "fp32"
            else sd[BASE_OPTIMIZER_STATE]["state"][group][state]
        )

    def one(group: int, name: str, shape: torch.Size) -> str:
        owners = [r for r in range(len(optim)) if name in optim[r][PARAM_SLICE_MAPPINGS][group]]
        if not owners:
            return name  # no optimizer state: its weights come from the model states below
        folder = zero / name
        folder.mkdir(parents=True, exist_ok=True)
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            pieces = []
            for r in owners:
                frag = optim[r][PARAM_SLICE_MAPPINGS][group][name]
                pieces.append(flat(r, group, state).narrow(0, frag.start, frag.numel))
            torch.save({CAT_DIM: 0, PARAM: torch.cat(pieces).reshape(shape)}, folder / f"{state}.pt")
        step = optim[owners[0]][BASE_OPTIMIZER_STATE]["state"][group].get("step")
        if step is not None:
            torch.save(step.clone() if torch.is_tensor(step) else step, folder / "step.pt")
        return ""

    jobs = [(g, name, shape) for g, shapes in enumerate(model[PARAM_SHAPES]) for name, shape in shapes.items()]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        without_state = {n for n in pool.map(lambda job: one(*job), jobs) if n}
    for name, tensor in (model.get("module") or {}).items():  # parameters ZeRO holds no state for (as DeepSpeed does)
        if name in without_state or not (zero / name / "fp32.pt").is_file():
            (zero / name).mkdir(parents=True, exist_ok=True)
            torch.save({PARAM: tensor.float().clone()}, zero / name / "fp32.pt")
    common = {
        k: v
        for k, v in optim[0].items()
        if k not in (BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)
    }
    common[PARAM_GROUPS] = optim[0][BASE_OPTIMIZER_STATE][PARAM_GROUPS]
    torch.save(common, zero / "optimizer_state.pt")
    source = os.path.realpath(src / "mp_rank_00_model_states.pt")  # (`src` may hold links to the checkpoint's files)
    try:  # the model states as they are (DeepSpeed copies them): a hard link costs nothing
        os.link(source, out / "mp_rank_00_model_states.pt")
    except OSError:
        shutil.copy2(source, out / "mp_rank_00_model_states.pt")


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m trainer.checkpoint.universal",
        description="DeepSpeed's ds_to_universal on a folder of ZeRO checkpoint files (the child"
        " process `ensure_universal` runs for layouts the one pass does not read).",
    )
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    _convert_with_deepspeed(Path(a.src), Path(a.out), a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
