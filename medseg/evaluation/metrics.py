"""Overlap metrics per case and class, and folder-against-folder evaluation."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from medseg.data.datasets import list_volumes, read_label_map
from medseg.errors import InputError
from medseg.io import case_id, grid_mismatch, read_volume, to_array, write_text_atomic

__all__ = ["LABELS_FILE", "dice", "dice_per_class", "evaluate"]

LABELS_FILE = "labels.json"  # written by predict beside its masks: class index -> name


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks: 2|A∩B| / (|A|+|B|); NaN when both are empty."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes) -> dict[int, float]:
    """Dice for each class index in ``classes`` between two label maps."""
    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {ref.shape}")
    return {int(c): dice(pred == c, ref == c) for c in classes}


def evaluate(
    pred_dir: str | Path,
    ref_dir: str | Path,
    out: str | Path | None = None,
    labels: dict[int, str] | None = None,
) -> dict:
    """Dice per case and class of the masks in ``pred_dir`` against those in ``ref_dir``.

    Cases are matched by file name (without suffix). Writes ``out`` (CSV) and the same path
    with ``.json`` when given.

    Args:
        pred_dir: predicted masks.
        ref_dir: reference masks.
        out: CSV path for the per-case table (a JSON with the summary goes beside it).
        labels: class index -> name; by default the ``labels.json`` that ``predict`` writes
            beside its masks, else every non-zero value found, named ``class_N``.

    Returns:
        ``{"cases": [{"id", "<class>": dice, ...}], "mean": {"<class>": dice}, "mean_foreground"}``.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise InputError(folder, "no such folder")
    refs = {case_id(p): p for p in list_volumes(ref_dir)}
    preds = {case_id(p): p for p in list_volumes(pred_dir)}
    common = sorted(set(refs) & set(preds))
    if not common:
        raise InputError(pred_dir, f"no file here has a namesake in {ref_dir}")
    pairs = []
    for cid in common:
        pred_img, ref_img = read_volume(preds[cid]), read_volume(refs[cid])
        mismatch = grid_mismatch(pred_img, ref_img)
        if mismatch:
            raise InputError(preds[cid], f"{mismatch} of the reference {refs[cid]}")
        pairs.append((cid, to_array(pred_img), to_array(ref_img)))
    if labels is None and (pred_dir / LABELS_FILE).is_file():
        labels = read_label_map(pred_dir / LABELS_FILE)
    if labels is None:
        found = sorted({int(v) for _, p, r in pairs for v in np.union1d(np.unique(p), np.unique(r))} - {0})
        labels = {c: f"class_{c}" for c in found}
    names = {int(c): n for c, n in labels.items() if int(c) != 0}

    cases = []
    for cid, pred, ref in pairs:
        scores = dice_per_class(pred, ref, names)
        cases.append({"id": cid, **{names[c]: s for c, s in scores.items()}})
    mean = {n: _nanmean([c[n] for c in cases]) for n in names.values()}
    result = {
        "cases": cases,
        "mean": mean,
        "mean_foreground": _nanmean(list(mean.values())),
        "missing_predictions": sorted(set(refs) - set(preds)),
    }
    if out is not None:
        _write_results(result, list(names.values()), Path(out))
    return result


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _write_results(result: dict, columns: list[str], out: Path) -> None:
    rows = result["cases"] + [{"id": "mean", **result["mean"]}]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["id", *columns])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    write_text_atomic(out, table.getvalue())
    write_text_atomic(out.with_suffix(".json"), json.dumps(_nan_to_none(result), indent=2))


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _nan_to_none(value):
    """Strict JSON has no NaN: an undefined Dice (both masks empty) is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
