"""Loss and learning-rate curves as PNG (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_curves(loss: Sequence[Sequence[float]], lr: Sequence[Sequence[float]], out: Path, title: str = "") -> Path:
    """Write a two-panel PNG: loss vs step and LR vs step. `loss`/`lr` are [step, value] pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    if loss:
        ax_loss.plot([p[0] for p in loss], [p[1] for p in loss], color="tab:blue")
    ax_loss.set_ylabel("train loss")
    ax_loss.grid(alpha=0.3)
    if lr:
        ax_lr.plot([p[0] for p in lr], [p[1] for p in lr], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
