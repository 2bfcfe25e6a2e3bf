"""A run's history: ``metrics.csv`` (a row per epoch) and its picture, ``curves.png``."""

from __future__ import annotations

import csv
from pathlib import Path

from medseg.atomic import atomic_path
from medseg.evaluation.pictures import plt, save_figure

__all__ = ["write_metrics", "plot_curves"]


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
