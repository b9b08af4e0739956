"""The `trainer` command: one Typer app, sub-apps mounted here, one error handler in `main()`.

User errors (`UserError`) print one line and exit 2; anything else is a bug and shows its
traceback. Heavy libraries are imported inside the commands, so `trainer --help` stays fast.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from trainer.cli import (
    checkpoints_cmd,
    config_cmd,
    doctor_cmd,
    export_cmd,
    generate_cmd,
    monitor_cmd,
    phase1_cmd,
    train_cmd,
    upload_cmd,
    validate_cmd,
)
from trainer.errors import UserError

app = typer.Typer(
    name="trainer",
    help="DeepSpeed training service: GPT-NeoX pretraining and multimodal LoRA fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train_cmd.train)
app.add_typer(config_cmd.app, name="config")
app.add_typer(checkpoints_cmd.app, name="checkpoints")
app.command("monitor")(monitor_cmd.monitor)
app.add_typer(upload_cmd.app, name="upload")
app.command("upload-all")(upload_cmd.upload_all)
app.command("export")(export_cmd.export)
app.command("generate")(generate_cmd.generate)
app.command("validate")(validate_cmd.validate)
app.command("doctor")(doctor_cmd.doctor)
app.add_typer(phase1_cmd.app, name="phase1")


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        from trainer.version import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        result = app(args=argv, standalone_mode=False)
        return int(result or 0)
    except UserError as exc:
        typer.echo("\n".join(exc.lines()), err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:  # click's usage errors are user errors too
        import click

        # typer >= 0.20 carries its own copy of click: its usage errors are not click's classes
        usage = (click.ClickException, getattr(getattr(typer, "_click", None), "exceptions", click).ClickException)
        if isinstance(exc, usage):
            exc.show()
            return 2
        raise  # a bug: the traceback is the report


if __name__ == "__main__":
    sys.exit(main())
