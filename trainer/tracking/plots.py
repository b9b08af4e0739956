"""Loss and learning-rate curves as PNG.

Built on `matplotlib.figure.Figure` directly, not pyplot: no display, no global state, so the
tracker's background thread can render while the training thread goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

FIGSIZE = (10.0, 6.0)  # inches
DPI = 100  # -> 1000 x 600 pixels


@dataclass(frozen=True)
class Curve:
    """One run's history: [step, value] pairs as the checkpoint metadata stores them."""

    label: str
    loss: Sequence[Sequence[float]]
    lr: Sequence[Sequence[float]]
    val: Sequence[Sequence[float]] = ()


def curves_figure(curves: Sequence[Curve], title: str = "") -> Any:
    """Two panels sharing the step axis: loss (top: training as a line, validation as dashed markers of the
    same colour) and learning rate (bottom), one colour per curve."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for i, c in enumerate(curves):
        color = f"C{i % 10}"
        if c.loss:
            ax_loss.plot([p[0] for p in c.loss], [p[1] for p in c.loss], color=color, label=f"{c.label} train")
        if c.val:
            ax_loss.plot(
                [p[0] for p in c.val],
                [p[1] for p in c.val],
                color=color,
                linestyle="--",
                marker="o",
                markersize=4,
                label=f"{c.label} val",
            )
        if c.lr:
            ax_lr.plot([p[0] for p in c.lr], [p[1] for p in c.lr], color=color, label=c.label)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    if any(c.loss or c.val for c in curves):
        ax_loss.legend(loc="upper right", fontsize="small")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_curves(curves: Sequence[Curve], out: Path, title: str = "") -> Path:
    """Write the curves as a PNG of FIGSIZE * DPI pixels; the file appears whole (temp file, rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    curves_figure(curves, title).savefig(tmp, format="png", dpi=DPI)
    tmp.replace(out)
    return out
