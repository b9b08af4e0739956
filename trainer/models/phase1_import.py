"""Bring Phase 1 weights trained elsewhere (a torch `aligner.pt`, a Lightning checkpoint, a safetensors file)
into the trainer-phase1 format (see `trainer.models.multimodal`); `trainer phase1 import` and
`tools/build_phase1.py` both call `import_phase1`.

Torch files are read with `torch.load(weights_only=True)` only: a file that needs code to unpickle is
refused, never loaded another way. Names are mapped in order: `--map OLD=NEW` prefix renames (the
longest matching OLD), then a key that is a tensor name of the model, or becomes one without leading
`model.` / `module.` (Lightning, DDP), or with `aligner.` in front (`image.0.weight`, the aligner-only
layout). Every aligner tensor must come from the file; tensors for the encoders replace the folders'.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trainer.errors import UserError
from trainer.models.multimodal import (
    MODALITIES,
    is_safetensors_file,
    load_pretrained_encoders,
    phase1_architecture,
    phase1_from_encoders,
    phase1_shapes,
    save_phase1,
    verify_phase1,
    written_by_torch_save,
)

STATE_WRAPPERS = ("state_dict", "model_state_dict", "model", "aligner")
STRIPPED_PREFIXES = ("model.", "module.")


def _names(keys: Sequence[str], n: int = 5) -> str:
    """`'a', 'b', ... and N more`: the first few names of a list for a one-line message."""
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(repr(k) for k in list(keys)[:n]) + more


def read_tensors(path: Path) -> dict[str, Any]:
    """The state dict in a weights file: safetensors, or a torch file loaded with `weights_only=True` and unwrapped
    (`state_dict_of`). Anything else, or a pickle that needs code, is a one-line UserError."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"aligner file {path}: no such file")
    if is_safetensors_file(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise UserError(
                f"aligner file {path}: unreadable safetensors file ({str(exc).splitlines()[0][:120]})"
            ) from None
    if not written_by_torch_save(path):
        raise UserError(
            f"aligner file {path}: not a torch or safetensors file (expected what torch.save or safetensors writes)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc) or "Unsupported operand" in str(exc):  # a damaged pickle
            why = re.search(r"WeightsUnpickler error: ([^\n]{1,120})", str(exc))
            raise UserError(
                f"aligner file {path}: unreadable torch file ({why.group(1) if why else 'damaged pickle'})"
            ) from None
        needs = re.search(r"GLOBAL (\S+)", str(exc))
        raise UserError(
            f"aligner file {path} holds Python objects other than tensors"
            f"{f' (first: {needs.group(1)})' if needs else ''}; only tensor state dicts are read: save"
            " `model.state_dict()` (or `{'state_dict': ...}`) with torch.save"
        ) from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"aligner file {path}: unreadable torch file ({first})") from None
    return state_dict_of(obj, path)


def state_dict_of(obj: Any, path: Path) -> dict[str, Any]:
    """The tensors of a loaded torch file: a bare `{name: tensor}` dict, or the dict under the first of
    `STATE_WRAPPERS` a wrapper holds (Lightning's `state_dict`, `model_state_dict`, ...). Non-tensor entries
    (epoch, hyper-parameters, optimizer states next to the wrapper key) are left out."""
    import torch

    if not isinstance(obj, dict):
        raise UserError(f"aligner file {path} holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    inner = next((obj[k] for k in STATE_WRAPPERS if isinstance(obj.get(k), dict)), obj)
    tensors = {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(
            f"aligner file {path} holds no tensors (top-level keys {_names(sorted(map(str, obj)))}); expected a"
            f" state dict or a dict with one under {' / '.join(STATE_WRAPPERS)}"
        )
    return tensors


def parse_maps(specs: Sequence[str]) -> list[tuple[str, str]]:
    """`OLD=NEW` prefix renames from the command line (NEW may be empty: the prefix is dropped)."""
    out = []
    for spec in specs:
        old, eq, new = spec.partition("=")
        if not eq or not old:
            raise UserError(
                f"--map {spec!r}: expected OLD_PREFIX=NEW_PREFIX, e.g. --map image_head.proj.=aligner.image.0."
            )
        out.append((old, new))
    return out


def target_name(key: str, names: Collection[str], maps: Sequence[tuple[str, str]]) -> Optional[str]:
    """The model tensor a file's key stands for (the rules in this module's docstring), or None."""
    old, new = max(((o, n) for o, n in maps if key.startswith(o)), key=lambda m: len(m[0]), default=("", ""))
    key = new + key[len(old) :]
    while True:
        for candidate in (key, f"aligner.{key}"):
            if candidate in names:
                return candidate
        prefix = next((p for p in STRIPPED_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            return None
        key = key[len(prefix) :]


def map_keys(
    state: dict[str, Any],
    names: Collection[str],
    path: Path,
    maps: Sequence[tuple[str, str]] = (),
    ignore: Sequence[str] = (),
) -> dict[str, Any]:
    """The file's tensors under the model's names. A key that matches nothing (and no `ignore` prefix), or two keys
    that land on one name, is a one-line UserError naming them, with a hint to use --map / --ignore."""
    mapped: dict[str, Any] = {}
    source: dict[str, str] = {}
    unmatched = []
    for key, value in state.items():
        if any(key.startswith(p) for p in ignore):
            continue
        name = target_name(key, names, maps)
        if name is None:
            unmatched.append(key)
        elif name in source:
            raise UserError(
                f"aligner file {path}: {source[name]!r} and {key!r} both map to {name!r}; keep one (--ignore PREFIX)"
            )
        else:
            mapped[name], source[name] = value, key
    if unmatched:
        have = {n.split(".")[1] for n in names}
        absent = [m for m in MODALITIES if m not in have and any(f"{m}." in k or f"{m}_" in k for k in unmatched)]
        also = f"; or give --{' / --'.join(absent)} DIR for the {'/'.join(absent)} weights" if absent else ""
        raise UserError(
            f"aligner file {path}: {len(unmatched)} tensor(s) match no Phase 1 tensor name: {_names(unmatched)};"
            f" rename them with --map OLD_PREFIX=NEW_PREFIX (names look like 'aligner.image.0.weight',"
            f" 'encoders.image.<...>') or skip them with --ignore PREFIX{also}"
        )
    return mapped


def aligner_dim(tensors: dict[str, Any], path: Path) -> int:
    """`align_dim` read off the aligner's Linear weights (`aligner.<modality>.0.weight`: [align_dim, encoder width])."""
    dims = {
        k: int(v.shape[0]) for k, v in tensors.items() if re.fullmatch(r"aligner\.\w+\.0\.weight", k) and v.dim() == 2
    }
    if len(set(dims.values())) != 1:
        found = ", ".join(f"{k} {v}" for k, v in sorted(dims.items())) or "no aligner.<modality>.0.weight"
        raise UserError(
            f"aligner file {path}: cannot tell align_dim from its Linear weights ({found}); pass --align-dim D"
        )
    return next(iter(dims.values()))


def check_supplied(tensors: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Every aligner tensor of the architecture comes from the file, and every tensor has the model's shape."""
    missing = sorted(k for k in shapes if k.startswith("aligner.") and k not in tensors)
    if missing:
        raise UserError(
            f"aligner file {path}: {len(missing)} aligner tensor(s) missing: {_names(missing)}"
            " (each modality needs <modality>.0.weight/.bias (Linear) and .1.weight/.bias (LayerNorm))"
        )
    for k, v in tensors.items():
        if tuple(v.shape) != shapes[k]:
            raise UserError(f"aligner file {path}: tensor {k!r} has shape {list(v.shape)}, expected {list(shapes[k])}")


@dataclass
class Phase1Import:
    """What `import_phase1` wrote, for the one summary line."""

    out: Path
    modalities: list[str]
    align_dim: int
    source: Optional[Path]
    from_file: int
    encoder_tensors: int
    parameters: int

    def summary(self) -> str:
        if self.source is None:
            origin = "aligner freshly initialised"
        else:
            replaced = (
                f", {self.encoder_tensors} of them encoder tensors replacing the folders'"
                if self.encoder_tensors
                else ""
            )
            origin = f"{self.from_file} tensors from {self.source}{replaced}"
        return (
            f"wrote {self.out}: {', '.join(self.modalities)} encoders + aligner (align_dim {self.align_dim}); {origin};"
            f" {self.parameters:,} parameters"
        )


def write_phase1_atomically(model: Any, out: Path) -> None:
    """Save, verify as loading does, then rename into place: a failure leaves nothing at `out`."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_phase1(model, tmp)
        verify_phase1(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def import_phase1(
    paths: dict[str, Path],
    out: Path,
    weights: Optional[Path] = None,
    align_dim: Optional[int] = None,
    maps: Sequence[tuple[str, str]] = (),
    ignore: Sequence[str] = (),
    force: bool = False,
    seed: int = 0,
) -> Phase1Import:
    """Write a Phase 1 checkpoint: encoders from the local Hugging Face folders in `paths`, the aligner (and any encoder
    tensors) from `weights` (mapped and checked as described above), or a fresh aligner from `seed` without it."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; expected a file name such as {out / 'phase1.safetensors'}")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if weights is None and align_dim is None:
        raise UserError("--align-dim is needed without an aligner file (it is read off the file's weights otherwise)")
    if align_dim is not None and align_dim < 1:
        raise UserError(f"--align-dim {align_dim}: expected a positive integer")
    state = read_tensors(weights) if weights is not None else None  # before the encoders: a bad file fails fast
    encoders = load_pretrained_encoders(paths)
    tensors: dict[str, Any] = {}
    dim = align_dim
    if state is not None:
        tensors = map_keys(state, phase1_shapes(phase1_architecture(encoders, 1)), weights, maps, ignore)
        dim = align_dim if align_dim is not None else aligner_dim(tensors, weights)
        check_supplied(tensors, phase1_shapes(phase1_architecture(encoders, dim)), weights)
    model = phase1_from_encoders(encoders, dim, tensors, seed)
    write_phase1_atomically(model, out)
    return Phase1Import(
        out,
        list(encoders),
        dim,
        weights,
        len(tensors),
        sum(k.startswith("encoders.") for k in tensors),
        sum(p.numel() for p in model.parameters()),
    )
