"""`trainer config show|fields`: the resolved config and DeepSpeed JSON, and the field reference."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from trainer.cli.options import (
    BatchSizeOpt,
    ConfigArg,
    HostfileOpt,
    LearningRateOpt,
    MaxStepsOpt,
    NumEpochsOpt,
    NumRanksOpt,
    SetOpt,
    overrides,
)

app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)


@app.command("show")
def show(
    config: ConfigArg,
    sets: SetOpt = None,
    max_steps: MaxStepsOpt = None,
    num_epochs: NumEpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    learning_rate: LearningRateOpt = None,
    hostfile: HostfileOpt = None,
    num_ranks: NumRanksOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document instead of YAML.")] = False,
) -> None:
    """Print the resolved config (defaults filled, overrides applied) and the rendered DeepSpeed JSON."""
    import yaml

    from trainer.config.batch import resolve_batch
    from trainer.config.deepspeed import render_ds_config
    from trainer.config.load import config_hash, config_to_dict, load_config
    from trainer.launcher.hostfile import parse_hostfile
    from trainer.tasks import build_task

    cfg = load_config(config, overrides(sets, max_steps, batch_size, learning_rate, epochs=num_epochs))
    world = sum(parse_hostfile(hostfile).values()) if hostfile else (num_ranks or 1)
    written_hash = config_hash(cfg)
    cfg = resolve_batch(cfg, world, str(config))
    ds = render_ds_config(cfg, world, build_task(cfg).model_hints().get("hidden_size"), str(config))
    resolved: dict = {"world_size": world, "config_hash": written_hash}
    if cfg.task == "pretrain":
        from trainer.models.neox import dims_of

        resolved["model"] = dims_of(cfg.model)  # the preset's sizes with the config's overrides
    doc = {**config_to_dict(cfg), "resolved": {**resolved, "deepspeed_json": ds}}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(yaml.safe_dump(doc, sort_keys=False), nl=False)


@app.command("fields")
def fields() -> None:
    """List every config key with its type, default and meaning."""
    from trainer.config.schema import RunConfig

    def walk(model: type, prefix: str = "") -> None:
        import typing

        for name, f in model.model_fields.items():
            ann = f.annotation
            inner = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(inner) == 1 and isinstance(inner[0], type) and hasattr(inner[0], "model_fields"):
                ann = inner[0]  # an optional section (lora): list its fields too
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")
                continue
            default = (
                "(required)"
                if f.is_required()
                else repr(f.default if f.default_factory is None else f.default_factory())
            )
            typer.echo(f"{prefix}{f.alias or name} = {default}\n    {f.description or ''}")

    walk(RunConfig)
