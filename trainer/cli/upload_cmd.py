"""`trainer upload status|list|upload` and `trainer upload-all`: the uploader's work, by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from trainer.checkpoint.layout import UploadState
from trainer.errors import UserError

app = typer.Typer(help="Checkpoint uploads: state, and uploading by hand.", no_args_is_help=True)

RunDirArg = Annotated[
    Path, typer.Argument(help="A run folder (runs/<run_id>) or a run_dir holding several runs.", show_default=False)
]
UrlOpt = Annotated[
    Optional[str],
    typer.Option("--url", help="Destination (gs://BUCKET/PREFIX or file:///PATH); default: the run's upload.url."),
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=1, help="Seconds to keep retrying an unreachable bucket before giving up.")
]


def _runs(run_dir: Path) -> list[Path]:
    from trainer.checkpoint.store import run_roots

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    runs = run_roots(run_dir)
    if not runs:
        raise UserError(f"{run_dir}: neither a run folder (with checkpoints/) nor a folder of runs")
    return runs


def _upload_settings(run_root: Path, url: Optional[str]):  # type: ignore[no-untyped-def]
    """The run's saved `upload` section (schema defaults for what it leaves out), --url taking precedence."""
    import yaml
    from pydantic import ValidationError

    from trainer.config.schema import UploadConfig

    cfg_file = run_root / "config.yaml"
    saved = ((yaml.safe_load(cfg_file.read_text()) or {}).get("upload") or {}) if cfg_file.exists() else {}
    try:
        settings = UploadConfig.model_validate({**saved, **({"url": url} if url else {})})
    except ValidationError as exc:
        where = "--url" if url else f"{cfg_file}: upload"
        raise UserError(f"{where}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    if not settings.url:
        raise UserError(f"{run_root}: no upload URL; pass --url gs://BUCKET/PREFIX (the run's upload.url is not set)")
    return settings


def _uploader(settings, timeout: float):  # type: ignore[no-untyped-def]
    from trainer.upload.uploader import checkpoint_uploader

    uploader = checkpoint_uploader(settings)
    uploader.storage.check(timeout)
    return uploader


def _rows(run_dir: Path) -> list[tuple[Path, object, dict]]:
    from trainer.checkpoint.store import CheckpointStore
    from trainer.checkpoint.layout import read_upload_state

    return [(run, c, read_upload_state(c.path)) for run in _runs(run_dir) for c in CheckpointStore(run).committed()]


@app.command("list")
def list_cmd(run_dir: RunDirArg) -> None:
    """Local checkpoints with their upload state."""
    from trainer.checkpoint.store import checkpoint_bytes

    from rich.console import Console
    from rich.table import Table

    table = Table("run", "tag", "step", "size (MB)", "upload", "where / why")
    for run, c, st in _rows(run_dir):
        state = st["state"]
        note = st.get("url", "") if state == UploadState.UPLOADED.value else st.get("error", "")
        table.add_row(run.name[:12], c.tag, str(c.step), f"{checkpoint_bytes(c.path) / 2**20:.1f}", state, note)
    Console(width=160).print(table)


@app.command("status")
def status(run_dir: RunDirArg) -> None:
    """The uploader's queue: in flight, waiting, done and failed, with sizes and rates."""
    from rich.console import Console
    from rich.table import Table

    rows = _rows(run_dir)
    counts: dict[str, int] = {}
    table = Table("tag", "state", "MB", "seconds", "MB/s", "updated", "detail")
    for _, c, st in rows:
        counts[st["state"]] = counts.get(st["state"], 0) + 1
        mb = (st.get("bytes") or 0) / 2**20
        table.add_row(
            c.tag,
            st["state"],
            f"{mb:.1f}",
            str(st.get("seconds", "")),
            str(st.get("rate_mb_s", "")),
            st.get("updated_at", ""),
            st.get("error", "") or st.get("url", ""),
        )
    console = Console(width=160)
    console.print(table)
    order = (UploadState.UPLOADING, UploadState.PENDING, UploadState.UPLOADED, UploadState.FAILED, UploadState.LOCAL)
    console.print(", ".join(f"{counts.get(k.value, 0)} {k.word}" for k in order))


@app.command("upload")
def upload_one(
    run_dir: RunDirArg,
    tag: Annotated[str, typer.Argument(help="Checkpoint tag, e.g. step-00000100.")],
    url: UrlOpt = None,
    timeout: TimeoutOpt = 30.0,
) -> int:
    """Upload one checkpoint now (skipped if it is already verified in the bucket)."""
    from trainer.upload.uploader import UploadFailed

    matches = [(run, c) for run, c, _ in _rows(run_dir) if c.tag == tag]
    if not matches:
        raise UserError(f"{run_dir}: no committed checkpoint {tag}")
    run, ckpt = matches[-1]
    uploader = _uploader(_upload_settings(run, url), timeout)
    try:
        state = uploader.upload(ckpt.path)
    except UploadFailed as exc:
        typer.echo(f"upload failed: {exc}", err=True)
        return 1
    typer.echo(f"{tag}: {state['state']} -> {state.get('url')}")
    return 0


def upload_all(run_dir: RunDirArg, url: UrlOpt = None, timeout: TimeoutOpt = 30.0) -> int:
    """Upload every committed checkpoint not yet verified in the bucket (idempotent)."""
    from trainer.checkpoint.store import checkpoint_bytes

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from trainer.checkpoint.layout import is_uploaded, remote_prefix
    from trainer.checkpoint.remote import verify_remote
    from trainer.checkpoint.store import CheckpointStore
    from trainer.upload.uploader import UploadFailed

    rows = _rows(run_dir)
    done = skipped = 0
    failed: list[str] = []
    uploaders: dict[Path, object] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as progress:
        for run, c, st in rows:
            up = uploaders.get(run) or uploaders.setdefault(run, _uploader(_upload_settings(run, url), timeout))
            if is_uploaded(c.path) and verify_remote(up.storage, remote_prefix(c.metadata))[0]:  # type: ignore[attr-defined]
                skipped += 1
                continue
            bar = progress.add_task(f"{run.name[:12]}/{c.tag}", total=checkpoint_bytes(c.path))
            try:
                state = up.upload(c.path, progress=lambda n, bar=bar: progress.advance(bar, n))  # type: ignore[attr-defined]
                progress.update(bar, completed=progress.tasks[bar].total)
                skipped += 1 if state.get("skipped") else 0
                done += 0 if state.get("skipped") else 1
            except UploadFailed as exc:
                failed.append(f"{c.tag}: {exc}")
    swept = []
    for run in _runs(run_dir):  # incomplete uploads that no local checkpoint will finish cost storage forever
        if run not in uploaders:
            try:
                uploaders[run] = _uploader(_upload_settings(run, url), timeout)
            except UserError:  # a run that never uploaded (no upload.url, no --url): nothing of it in a bucket
                continue
        up = uploaders[run]
        swept += up.sweep_incomplete(run.name, {c.tag for c in CheckpointStore(run).committed()})  # type: ignore[attr-defined]
    typer.echo(
        f"upload-all: {done} uploaded, {skipped} already verified, {len(failed)} failed"
        + (f", {len(swept)} incomplete upload(s) of checkpoints no longer local removed" if swept else "")
    )
    for line in failed:
        typer.echo(f"  failed {line}", err=True)
    return 1 if failed else 0
