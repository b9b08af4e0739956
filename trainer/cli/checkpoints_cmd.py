"""`trainer checkpoints list|show|compare|plot`: committed checkpoints, local or in the bucket."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from trainer.checkpoint.layout import UploadState
from trainer.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from trainer.checkpoint.catalog import Catalog, Entry

app = typer.Typer(
    help="Committed checkpoints: list, show, compare, plot (run folders or gs:// / file:// URLs).", no_args_is_help=True
)

SourceArg = Annotated[
    str,
    typer.Argument(
        help="A run folder, a folder of runs, a checkpoint, or an upload URL (gs://BUCKET/PREFIX, file:///PATH)."
    ),
]
RunsOpt = Annotated[
    str, typer.Option("--runs", "-r", help="Where references are looked up: a folder of runs or an upload URL.")
]
RefArg = Annotated[
    str,
    typer.Argument(
        help="TAG (step-00000100, 100, latest, best), RUN/TAG, RUN (its newest), a path or a URL.", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=1, help="Seconds to keep retrying an unreachable bucket.")]
VerifyOpt = Annotated[
    bool, typer.Option("--verify", help="Check each checkpoint in its bucket: manifest, parts, sizes, CRC32C.")
]
UrlOpt = Annotated[
    Optional[str],
    typer.Option("--url", help="Bucket to verify local checkpoints against (default: each run's upload.url)."),
]

UPLOAD_WORDS = {**{s.value: s.word for s in UploadState}, "verified": "verified", "unverified": "NOT VERIFIED"}


def _console() -> Any:
    from rich.console import Console

    return Console(width=160, highlight=False)


def _when(meta: dict) -> str:
    raw = meta.get("committed_at")
    if not raw:
        return ""
    try:
        return dt.datetime.fromisoformat(str(raw)).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(raw)


def _mb(n: Optional[int]) -> str:
    return f"{(n or 0) / 2**20:,.1f} MB"


def _num(v: Any, fmt: str = ".4f") -> str:
    if v is None:
        return ""
    try:
        return format(v, fmt)
    except (TypeError, ValueError):  # metadata from another version: show it as it is
        return str(v)


def _note(e: "Entry", best: Optional["Entry"], metric: str = "train_loss") -> str:
    marks = []
    if best is e:
        marks.append(f"★ best {metric}")
    elif e.metadata.get("reason") == "best":
        marks.append("saved as a new best")
    reason = e.metadata.get("reason")
    if reason == "preemption":
        marks.append("⚡ preemption save")
    elif reason == "final":
        marks.append("final")
    return ", ".join(marks)


def _upload_text(e: "Entry") -> str:
    return UPLOAD_WORDS.get(e.upload["state"], e.upload["state"])


def _finish(cat: "Catalog") -> int:
    """Unreadable metadata or manifests: listed after the output, exit 2. Failed verifications: exit 1."""
    if cat.problems:
        raise UserError("\n".join(cat.problems))
    bad = [e.label for e in cat.entries if e.upload["state"] == "unverified"]
    if bad:
        typer.echo(f"not verified in the bucket: {', '.join(bad)}", err=True)
        return 1
    return 0


@app.command("list")
def list_cmd(
    source: SourceArg = "runs",
    as_json: JsonOpt = False,
    verify: VerifyOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = 30.0,
) -> int:
    """Committed checkpoints, grouped by run (newest run first): step, epoch, loss, val loss, best, time, size, upload
    state."""
    from rich.table import Table

    from trainer.checkpoint.catalog import scan, verify as verify_all
    from trainer.checkpoint.store import best_checkpoint, best_metric_of

    cat = scan(source, timeout)
    if verify:
        verify_all(cat, url, timeout)
    if as_json:
        out = []
        for rid, entries in cat.runs():
            best, metric = best_checkpoint(entries), best_metric_of(entries)
            out += [
                {
                    "run_id": rid,
                    "tag": e.tag,
                    "step": e.step,
                    "epoch": e.metadata.get("epoch"),
                    "loss": e.loss,
                    "val_loss": e.metadata.get("val_loss"),
                    "best": best is e,
                    "best_metric": metric,
                    "reason": e.metadata.get("reason"),
                    "committed_at": e.metadata.get("committed_at"),
                    "size_bytes": e.size,
                    "upload": e.upload["state"],
                    "upload_detail": e.upload["detail"],
                    "where": e.where,
                }
                for e in entries
            ]
        typer.echo(json.dumps(out, indent=1))
        return _finish(cat)
    console = _console()
    for rid, entries in cat.runs():
        best, metric = best_checkpoint(entries), best_metric_of(entries)
        task = entries[-1].metadata.get("task", "")
        table = Table(
            "tag",
            "step",
            "epoch",
            "loss",
            "val loss",
            "time (UTC)",
            "size",
            "upload",
            "note",
            title=f"run {rid} ({task}, {len(entries)} checkpoint{'s' if len(entries) != 1 else ''})",
            title_justify="left",
        )
        for e in entries:
            table.add_row(
                e.tag,
                str(e.step),
                _num(e.metadata.get("epoch"), ".3f"),
                _num(e.loss),
                _num(e.metadata.get("val_loss")),
                _when(e.metadata),
                _mb(e.size),
                _upload_text(e),
                _note(e, best, metric),
            )
        console.print(table)
    console.print(f"{len(cat.entries)} checkpoint(s) in {len(cat.runs())} run(s) under {cat.source}")
    return _finish(cat)


def _trend(stats: dict, points: str = "logged points") -> str:
    if not stats["trend"]:
        return ""
    arrow = {"improving": "↓", "worsening": "↑", "flat": "→"}[stats["trend"]]
    return f"{arrow} {stats['trend']} ({stats['trend_change']:+.2%} over the last {points})"


def _save_text(rec: object) -> str:
    """How the checkpoint was saved: `in the background: training blocked 0.21 s, written in 14.2 s`."""
    if not isinstance(rec, dict):
        return ""
    if rec.get("async"):
        return (
            f"in the background: training blocked {rec.get('blocked_s', 0):.2f} s, on disk after"
            f" {rec.get('written_after_s', 0):.1f} s"
        )
    return f"directly: training blocked {rec.get('blocked_s', 0):.2f} s"


@app.command("show")
def show(
    ref: RefArg,
    runs: RunsOpt = "runs",
    as_json: JsonOpt = False,
    verify: VerifyOpt = False,
    url: UrlOpt = None,
    files: Annotated[int, typer.Option("--files", help="List at most this many files (largest first).")] = 20,
    timeout: TimeoutOpt = 30.0,
) -> int:
    """Everything a checkpoint's metadata says: progress, loss statistics, LR, setup, versions, files, upload."""
    from rich.table import Table

    from trainer.checkpoint.catalog import Catalog, current_lr, loss_stats, resolve, verify as verify_all
    from trainer.engine.goodput import describe as describe_goodput

    e = resolve(ref, runs, timeout)
    cat = Catalog(e.where, [e])
    if verify:
        verify_all(cat, url, timeout)
    stats, vstats = loss_stats(e.metadata), loss_stats(e.metadata, "val")
    metric = e.metadata.get("best_metric") or "train_loss"
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "where": e.where,
                    "metadata": e.metadata,
                    "loss_stats": stats,
                    "val_stats": vstats,
                    "best_metric": metric,
                    "lr": current_lr(e.metadata),
                    "files": [{"path": p, "size": s} for p, s in e.files],
                    "size_bytes": e.size,
                    "upload": e.upload,
                },
                indent=1,
                default=str,
            )
        )
        return _finish(cat)
    m, sysinfo = e.metadata, e.metadata.get("system") or {}
    picked = f" (the `best` reference: the lowest {metric} of its run)" if ref.rpartition("/")[2] == "best" else ""
    rows = [
        ("checkpoint", f"{e.tag} of run {e.run_id}"),
        ("where", e.where),
        ("task", str(m.get("task", ""))),
        ("saved", f"{_when(m)} UTC ({m.get('reason', '')})"),
        ("step", str(e.step)),
        ("epoch", _num(m.get("epoch"), ".3f")),
        ("tokens seen", _num(m.get("tokens_seen"), ",d")),
        ("loss", _num(stats["current"])),
        ("best loss", f"{_num(stats['best'])} at step {stats['best_step']}" if stats["best"] is not None else ""),
        ("steps since best", str(stats.get("steps_since_best", ""))),
        (
            "mean loss",
            f"{_num(stats['mean'])} over {stats['points']} logged points" if stats["mean"] is not None else "",
        ),
        ("loss std", _num(stats["std"])),
        ("loss trend", _trend(stats)),
        (
            "val loss",
            (
                f"{_num(m.get('val_loss'))} (measured at this step)"
                if m.get("val_loss") is not None
                else f"not measured at this step; last {_num(vstats['current'])} at step {vstats['current_step']}"
                if vstats["current"] is not None
                else ""
            ),
        ),
        (
            "val perplexity",
            _num((m.get("validation_metrics") or {}).get("perplexity"), ".3f") if m.get("val_loss") is not None else "",
        ),
        (
            "best val loss",
            f"{_num(vstats['best'])} at step {vstats['best_step']}" if vstats["best"] is not None else "",
        ),
        ("steps since best val", str(vstats.get("steps_since_best", ""))),
        ("val trend", _trend(vstats, "evaluations")),
        ("best metric", f"{metric}{picked}"),
        ("learning rate", _num(current_lr(m), ".3e")),
        ("lr history", f"{len(m.get('lr_history') or [])} points"),
        ("world size", str(m.get("world_size", ""))),
        ("ZeRO stage", str(m.get("zero_stage", ""))),
        ("precision", str(sysinfo.get("precision", ""))),
        ("accelerator", str(sysinfo.get("accelerator", ""))),
        (
            "versions",
            ", ".join(f"{k} {sysinfo[k]}" for k in ("torch", "deepspeed", "transformers", "python") if k in sysinfo),
        ),
        ("config hash", str(m.get("config_hash", ""))),
        ("frozen sha256", str(m.get("frozen_sha256") or "")),
        ("model", ", ".join(f"{k}={v}" for k, v in (m.get("model") or {}).items())),
        ("branched from", str(m.get("branched_from") or "")),
        ("mlflow run", str(m.get("mlflow_run_id") or "")),
        ("upload", f"{_upload_text(e)} {e.upload['detail']}".strip()),
        ("size", f"{_mb(e.size)} in {len(e.files)} files"),
        ("save", _save_text(m.get("save"))),
        ("goodput", describe_goodput(m.get("goodput")).removeprefix("goodput ")),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for k, v in rows:
        if v not in ("", "None"):
            grid.add_row(k, v)
    console = _console()
    console.print(grid)
    if files > 0 and e.files:
        table = Table(
            "file", "size", title=f"largest files ({min(files, len(e.files))} of {len(e.files)})", title_justify="left"
        )
        for p, s in sorted(e.files, key=lambda f: (-f[1], f[0]))[:files]:
            table.add_row(p, f"{s:,} B")
        console.print(table)
    return _finish(cat)


@app.command("compare")
def compare(
    refs: Annotated[
        list[str], typer.Argument(help="Two or more checkpoints (same references as show).", show_default=False)
    ],
    runs: RunsOpt = "runs",
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Metrics side by side with deltas against the first, and the config keys that differ."""
    from rich.table import Table

    from trainer.checkpoint.catalog import config_differences, current_lr, loss_stats, resolve

    if len(refs) < 2:
        raise UserError("compare: give at least two checkpoints")
    entries = [resolve(r, runs, timeout) for r in refs]
    labels = _labels(entries)
    metrics: list[tuple[str, list[Any], str]] = []

    def row(name: str, values: list[Any], fmt: str = ".4f") -> None:
        metrics.append((name, values, fmt))

    stats = [loss_stats(e.metadata) for e in entries]
    vstats = [loss_stats(e.metadata, "val") for e in entries]
    row("step", [e.step for e in entries], "d")
    row("tokens seen", [e.metadata.get("tokens_seen") for e in entries], ",d")
    row("epoch", [e.metadata.get("epoch") for e in entries], ".3f")
    row("loss", [s["current"] for s in stats])
    row("best loss", [s["best"] for s in stats])
    if any(v["points"] for v in vstats):
        row("val loss", [e.metadata.get("val_loss") for e in entries])
        row("best val loss", [v["best"] for v in vstats])
        row("best val step", [v["best_step"] for v in vstats], "d")
    row("mean loss", [s["mean"] for s in stats])
    row("loss std", [s["std"] for s in stats])
    row("learning rate", [current_lr(e.metadata) for e in entries], ".3e")
    row("world size", [e.metadata.get("world_size") for e in entries], "d")
    row("ZeRO stage", [e.metadata.get("zero_stage") for e in entries], "d")
    row("size (MB)", [e.size / 2**20 for e in entries], ",.1f")
    row("config hash", [e.metadata.get("config_hash") for e in entries], "s")
    diffs = config_differences([e.config for e in entries])
    unknown = [lab for lab, e in zip(labels, entries) if e.config is None]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "checkpoints": [{"label": lab, "where": e.where} for lab, e in zip(labels, entries)],
                    "metrics": {n: v for n, v, _ in metrics},
                    "config_differences": diffs,
                    "config_unknown": unknown,
                },
                indent=1,
                default=str,
            )
        )
        return
    console = _console()
    table = Table("metric", *labels, title="metrics (Δ against the first)", title_justify="left")
    for name, values, fmt in metrics:
        cells = []
        for i, v in enumerate(values):
            text = _num(v, fmt) if fmt != "s" else str(v or "")
            base = values[0]
            if i > 0 and fmt != "s" and isinstance(v, (int, float)) and isinstance(base, (int, float)):
                delta = format(v - base, "+" + fmt)
                if delta.strip("+-0.,e") != "":  # a change that shows at this precision
                    text += f" ({delta})"
            cells.append(text)
        table.add_row(name, *cells)
    console.print(table)
    if diffs:
        ctable = Table("config key", *labels, title=f"config differences ({len(diffs)} keys)", title_justify="left")
        for key, values in diffs.items():
            ctable.add_row(key, *["" if v is None else str(v) for v in values])
        console.print(ctable)
    else:
        console.print("config: no differences" + (" among the checkpoints that recorded one" if unknown else ""))
    if unknown:
        console.print(f"config not recorded for: {', '.join(unknown)}")


@app.command("plot")
def plot(
    refs: Annotated[
        list[str],
        typer.Argument(
            help="Checkpoints or runs (a run: its newest checkpoint, whose history is the whole run).",
            show_default=False,
        ),
    ],
    runs: RunsOpt = "runs",
    save: Annotated[
        Optional[Path], typer.Option("--save", help="PNG to write (default: next to the (first) run).")
    ] = None,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Loss (training line, validation markers) and learning-rate curves, one colour per run, written as a PNG."""
    from trainer.checkpoint.catalog import resolve
    from trainer.tracking.plots import Curve, save_curves

    entries = [resolve(r, runs, timeout) for r in refs]
    labels = _labels(entries)
    curves = [
        Curve(
            lab,
            e.metadata.get("loss_history") or [],
            e.metadata.get("lr_history") or [],
            e.metadata.get("val_history") or [],
        )
        for lab, e in zip(labels, entries)
    ]
    if not any(c.loss for c in curves):
        raise UserError(f"{', '.join(refs)}: no logged loss to plot (the checkpoints carry no loss_history)")
    if save is None:
        root = entries[0].run_root()
        name = f"curves-{entries[0].tag}.png" if len(entries) == 1 else f"curves-{len(entries)}-runs.png"
        save = root / name if root is not None else Path.cwd() / f"{entries[0].run_id[:8]}-{name}"
    elif save.suffix.lower() != ".png":
        raise UserError(f"--save {save}: expected a .png file name")
    title = f"run {entries[0].run_id}" if len({e.run_id for e in entries}) == 1 else f"{len(entries)} runs"
    out = save_curves(curves, save, title)
    typer.echo(f"plotted {len(curves)} curve(s) ({', '.join(labels)}): {out}")


def _labels(entries: list["Entry"]) -> list[str]:
    """Run id prefixes, with the tag where a run appears more than once."""
    runs = [e.run_id for e in entries]
    return [e.label if runs.count(e.run_id) > 1 else e.run_id[:8] + f" ({e.tag})" for e in entries]
