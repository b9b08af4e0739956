"""Render the DeepSpeed JSON from a `ds_configs/` template and the run config.

Values written as "auto" in a template are filled from the run config; the batch identity
`train_batch_size = micro_batch x grad_accum x world_size` and the precision switches are checked
after the overrides are merged, so a hand-edited template cannot drift from the run config.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Optional

from trainer.config.schema import RunConfig
from trainer.errors import UserError

AUTO = "auto"


def template_dirs() -> list[Path]:
    """Where template names are looked up: the source checkout, then the installed data files."""
    repo = Path(__file__).resolve().parents[2] / "ds_configs"
    return [repo, Path(sys.prefix) / "share" / "trainer" / "ds_configs"]


def list_templates() -> list[str]:
    names: set[str] = set()
    for d in template_dirs():
        names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def load_template(name: str) -> dict:
    if name.endswith(".json") or "/" in name:
        path = Path(name)
        if not path.exists():
            raise UserError(f"deepspeed.template: file {path} not found")
    else:
        path = next((d / f"{name}.json" for d in template_dirs() if (d / f"{name}.json").exists()), None)
        if path is None:
            raise UserError(
                f"deepspeed.template: unknown template {name!r}; expected one of {', '.join(list_templates())} or a "
                "JSON path"
            )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON in DeepSpeed template: {exc.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a DeepSpeed template must be a JSON object")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _fill(node: Any, values: dict[str, Any], path: str = "") -> Any:
    """Replace "auto" leaves whose dotted path is in `values`; leave other autos for the check."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            filled = _fill(value, values, f"{path}.{key}" if path else key)
            if filled is not _DROP:
                out[key] = filled
        return out
    if node == AUTO and path in values:
        return values[path]
    if node == AUTO and path in _DROP_IF_UNKNOWN:
        return _DROP
    return node


_DROP = object()
# Size hints that DeepSpeed chooses well itself when the model's hidden size is not known.
_DROP_IF_UNKNOWN = {
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.allgather_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
}


def _autos_left(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        out: list[str] = []
        for k, v in node.items():
            out += _autos_left(v, f"{path}.{k}" if path else k)
        return out
    return [path] if node == AUTO else []


BUCKET_FLOOR = 50_000_000  # elements: the smallest gradient bucket rendered (see render_ds_config)


def render_ds_config(
    cfg: RunConfig, world_size: int, hidden_size: Optional[int] = None, source: str = "config"
) -> dict:
    """The DeepSpeed config dict for `cfg` on `world_size` ranks; `UserError` if inconsistent."""
    if world_size < 1:
        raise UserError(f"world size must be >= 1, got {world_size}")
    t, o = cfg.train, cfg.optim
    if t.global_batch_size is not None and t.global_batch_size != t.micro_batch_size * t.grad_accum * world_size:
        raise UserError(
            f"{source}: train.global_batch_size: {t.global_batch_size} != train.micro_batch_size {t.micro_batch_size}"
            f" x train.grad_accum {t.grad_accum} x world size {world_size} = "
            f"{t.micro_batch_size * t.grad_accum * world_size}"
        )
    values: dict[str, Any] = {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": o.grad_clip,
        "bf16.enabled": t.precision == "bf16",
        "fp16.enabled": t.precision == "fp16",
        "optimizer.params.lr": o.lr,
        "optimizer.params.betas": list(o.betas),
        "optimizer.params.eps": o.eps,
        "optimizer.params.weight_decay": o.weight_decay,
    }
    if hidden_size:
        # Buckets of at least BUCKET_FLOOR elements. hidden^2 alone (Hugging Face's "auto") is 4,096 elements at
        # neox-tiny, 4.2M at neox-1.2b: DeepSpeed then copies and reduces gradients in hundreds of small buckets per
        # step, 1.2x the bare engine's step at neox-tiny (tools/bench_train.py --compare-bare). DeepSpeed's own default
        # is 5e8; the floor keeps a 1.2B model's gradients in ~24 buckets (100 MB each in bf16) to overlap with the
        # backward pass, and the two buffers ZeRO-2 allocates at 200 MB in bf16.
        h2 = hidden_size * hidden_size
        values.update(
            {
                "zero_optimization.reduce_bucket_size": max(h2, BUCKET_FLOOR),
                "zero_optimization.allgather_bucket_size": max(h2, BUCKET_FLOOR),
                "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * h2),
                "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
            }
        )
    # Keys that the run config always owns, even when a custom template leaves them out.
    owned = {
        "train_batch_size": AUTO,
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": AUTO,
        "gradient_clipping": AUTO,
        "bf16": {"enabled": AUTO},
        "fp16": {"enabled": AUTO},
    }
    template = _merge(owned, load_template(cfg.deepspeed.template))
    merged = _merge(template, cfg.deepspeed.overrides)
    ds = _fill(merged, values)
    problems = [f'{source}: deepspeed: {key} is "auto" but nothing fills it' for key in _autos_left(ds)]
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    if (
        isinstance(micro, int)
        and isinstance(accum, int)
        and isinstance(total, int)
        and total != micro * accum * world_size
    ):
        problems.append(
            f"{source}: deepspeed: train_batch_size {total} != micro batch {micro} x grad accum {accum}"
            f" x world size {world_size} = {micro * accum * world_size}"
        )
    if micro != t.micro_batch_size or accum != t.grad_accum:
        problems.append(
            f"{source}: deepspeed: micro batch / grad accum ({micro}, {accum}) differ from train.micro_batch_size /"
            f" train.grad_accum ({t.micro_batch_size}, {t.grad_accum}); set them in train, not in the DeepSpeed JSON"
        )
    if "scheduler" in ds:
        problems.append(
            f'{source}: deepspeed: a "scheduler" section is not used; set the LR schedule with optim.schedule,'
            " optim.warmup_steps and optim.decay_steps"
        )
    if ds.get("gradient_clipping") != o.grad_clip:
        problems.append(
            f"{source}: deepspeed: gradient_clipping {ds.get('gradient_clipping')!r} differs from optim.grad_clip"
            f" {o.grad_clip}; set it in optim, not in the DeepSpeed JSON"
        )
    if ds.get("bf16", {}).get("enabled") is True and ds.get("fp16", {}).get("enabled") is True:
        problems.append(f"{source}: deepspeed: bf16 and fp16 are both enabled; choose one with train.precision")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"{source}: deepspeed: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if problems:
        raise UserError("\n".join(problems))
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def uses_ds_optimizer(ds: dict) -> bool:
    """True when the template asks DeepSpeed to build the optimizer (needed for ZeRO-Offload)."""
    return "optimizer" in ds
