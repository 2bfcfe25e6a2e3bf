"""Pictures people would rather look at: training curves and QC overlays (PNG)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from medseg.io import atomic_path, to_array  # noqa: E402

__all__ = ["write_metrics", "plot_curves", "overlay_png"]


def write_metrics(history: list[dict], columns: list[str], path: str | Path) -> None:
    """Write a run's per-epoch rows as ``metrics.csv``, whole and atomically (so a resumed run's
    table matches its checkpoint)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot_curves(metrics_csv: str | Path, png: str | Path) -> Path:
    """Plot loss and validation Dice per epoch from a run's ``metrics.csv``."""
    rows = list(csv.DictReader(Path(metrics_csv).open(encoding="utf-8")))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [float(r["loss"]) for r in rows], marker=".")
    ax_loss.set(xlabel="epoch", ylabel="training loss (Dice + CE)", title="loss")
    dice_columns = [c for c in rows[0] if c.startswith("dice_")] if rows else []
    plotted = False
    for column in dice_columns:
        points = [(e, float(r[column])) for e, r in zip(epochs, rows) if r[column] not in ("", "nan")]
        if points:
            ax_dice.plot(*zip(*points), marker=".", label=column.removeprefix("dice_"))
            plotted = True
    ax_dice.set(xlabel="epoch", ylabel="validation Dice", title="validation Dice", ylim=(0, 1))
    if plotted:
        ax_dice.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, png)


def overlay_png(image: sitk.Image, mask: sitk.Image, png: str | Path, title: str = "") -> Path:
    """Three slices through the mask's centre along the last voxel axis, label contours on the
    image (a 2D image is its one slice)."""
    array, labels = to_array(image).astype(float), to_array(mask)
    if labels.ndim == 2:
        array, labels = array[..., :1] if array.ndim == 3 else array[..., None], labels[..., None]
    filled = np.nonzero(labels.any(axis=(0, 1)))[0]
    middle = int(filled.mean()) if len(filled) else labels.shape[2] // 2
    picks = sorted({max(0, middle - 2), middle, min(labels.shape[2] - 1, middle + 2)})
    low, high = np.percentile(array, [1, 99])
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4))
    for ax, k in zip(np.atleast_1d(axes), picks):
        ax.imshow(array[:, :, k].T, cmap="gray", vmin=low, vmax=high, origin="lower")
        for value, colour in zip(range(1, int(labels.max()) + 1), plt.cm.tab10.colors):
            if (labels[:, :, k] == value).any():
                ax.contour((labels[:, :, k] == value).T, levels=[0.5], colors=[colour], linewidths=1)
        ax.set_title(f"{title} slice {k}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, png)


def save_figure(fig, png: str | Path) -> Path:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return Path(png)
