"""`trainer validate CONFIG [--quick]`: the preflight of a run config, one process, PASS/FAIL per check."""

from __future__ import annotations

from typing import Annotated

import typer

from trainer.cli.options import ConfigArg, SetOpt, overrides


def validate(
    config: ConfigArg,
    sets: SetOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="A 3-step training run instead of 10.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the traceback of a check that fails with a bug.")
    ] = False,
) -> int:
    """Check a run config end to end on this machine: configuration, model, freezing, data, forward, step,
    checkpoint round trip, MLflow, a short run. Exit 0 only if every check passes (1 otherwise)."""
    from trainer.engine.validate import Validator

    ok = Validator(config, overrides(sets, None, None, None), quick, verbose, typer.echo).run()
    return 0 if ok else 1
