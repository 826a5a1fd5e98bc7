"""The training curves as one picture in the MLflow run (``plots/curves.png``): loss, the
evaluation metrics, and per upsampling block the share of candidates split against the
share the ground truth would split, so the selection's progress is seen, not read.

Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot, no global backend state).
"""
from __future__ import annotations

from matplotlib.figure import Figure

History = dict[str, list[tuple[int, float]]]  # metric -> [(step, value), ...]

BLOCKS = 3
CURVE_KEYS = ("train/loss", "val/mIoU", "val/aAcc", "val/top1", "val/top5",
              *(f"val/{kind}_block{b + 1}" for kind in ("split_ratio", "oracle_ratio") for b in range(BLOCKS)))


def curves_figure(history: History) -> Figure:
    """Three panels: training loss; validation metrics (%); split ratio (solid) against the
    ground truth's (dashed) per block. A panel without data says so."""
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    loss, metrics, split = fig.subplots(1, 3)

    def draw(ax, key, label=None, **style):
        points = sorted(history.get(key, []))
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], label=label or key, **style)
        return bool(points)

    if draw(loss, "train/loss", "train loss"):
        loss.set_yscale("log")
    loss.set_title("training loss")
    shown = [draw(metrics, key, key[4:], marker="o") for key in ("val/mIoU", "val/aAcc", "val/top1", "val/top5")]
    metrics.set_title("validation (%)")
    colours = ("tab:blue", "tab:orange", "tab:green")
    scales = (32, 16, 8)
    for b in range(BLOCKS):
        draw(split, f"val/split_ratio_block{b + 1}", f"block {b + 1} ({scales[b]} px) split",
             color=colours[b], marker="o")
        draw(split, f"val/oracle_ratio_block{b + 1}", f"block {b + 1} ground truth",
             color=colours[b], linestyle="--", marker="x")
    split.set_title("share of candidates split")
    split.set_ylim(0, 1.05)
    for ax, any_data in ((loss, "train/loss" in history), (metrics, any(shown)), (split, bool(split.lines))):
        ax.set_xlabel("step")
        if any_data:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    return fig
