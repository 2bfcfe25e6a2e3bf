"""Score a folder of predicted masks against a folder of references, one case at a time.

Cases are matched by name. A prediction that cannot be scored (unreadable, another grid) is
reported by name and scores as a missing one (0, the worst distance), and the rest carry on.
Writes ``metrics.csv`` (a row per case and class) and ``summary.json`` (mean, std and median
per class and metric).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.atomic import refuse_existing, write_text_atomic
from medseg.data.datasets import read_label_map
from medseg.errors import InputError, MedsegError
from medseg.evaluation.metrics import (
    BOTH_EMPTY,
    DEFAULT_TOLERANCE_MM,
    HD_PERCENTILE,
    METRICS,
    MISSING,
    OK,
    PREDICTION_EMPTY,
    REFERENCE_EMPTY,
    evaluate_pair,
    missing_metrics,
    pair_arrays,
    tolerance_for,
    worst_distance,
)
from medseg.files import EXTRAS, LABELS_FILE, case_id, is_volume_file
from medseg.io import read_volume, to_array

__all__ = [
    "ERROR",
    "evaluate",
    "find_masks",
    "match_cases",
    "score_case",
    "failed_rows",
    "is_scored",
    "finish",
    "class_names",
    "write_results",
]

ERROR = "error"
TABLE, SUMMARY = "metrics.csv", "summary.json"
_COUNTS = ("tp", "fp", "fn", "pred_ml", "ref_ml")
COLUMNS = ["case", "label", "class", "status", *METRICS, *_COUNTS, "reason"]
# medseg's own outputs that sit among masks but are not masks
_NOT_MASKS = tuple(f"_{kind}" for kind in EXTRAS)


def find_masks(folder: str | Path) -> dict[str, Path]:
    """Case name -> mask file, for every mask in ``folder`` and its sub-folders (a case in a
    sub-folder is named ``sub/case``, as ``predict`` mirrors its input's folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "no such folder")
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and d != "previews" and not (Path(root) / d / "index.html").exists()
        )  # predict's previews and QC reports hold pictures, not masks
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or not is_volume_file(path) or case_id(name).endswith(_NOT_MASKS):
                continue
            found[(path.parent.relative_to(folder) / case_id(name)).as_posix()] = path
    return found


def match_cases(preds: dict[str, Path], refs: dict[str, Path]) -> list[tuple[str, Path | None, Path | None]]:
    """Pairs ``(case, prediction, reference)`` by case name, sorted; either side may be None.

    A name that has no namesake at the same depth is matched on its last part when that is
    unique on both sides (masks in ``out/site1/a`` against references in ``labels/a``).
    """
    preds, refs = dict(preds), dict(refs)
    pairs = [(k, preds.pop(k), refs.pop(k)) for k in sorted(set(preds) & set(refs))]

    def by_leaf(cases: dict[str, Path]) -> dict[str, str]:
        leaves: dict[str, list[str]] = {}
        for key in cases:
            leaves.setdefault(key.rsplit("/", 1)[-1], []).append(key)
        return {leaf: keys[0] for leaf, keys in leaves.items() if len(keys) == 1}

    pred_leaves, ref_leaves = by_leaf(preds), by_leaf(refs)
    for leaf in sorted(set(pred_leaves) & set(ref_leaves)):
        key = pred_leaves[leaf]
        pairs.append((key, preds.pop(key), refs.pop(ref_leaves[leaf])))
    pairs += [(k, p, None) for k, p in preds.items()] + [(k, None, r) for k, r in refs.items()]
    return sorted(pairs, key=lambda pair: pair[0])


def score_case(
    case: str,
    pred: Path | sitk.Image | None,
    ref: Path | sitk.Image,
    labels: dict[int, str],
    tolerance: float | dict,
    discover: bool = True,
) -> list[dict]:
    """The rows of one case, a row per class of ``labels``. ``pred`` and ``ref`` are files or
    images; with ``discover``, classes the masks hold that ``labels`` lacks are added to it.

    A missing prediction scores as one that found nothing. A prediction that cannot be scored
    (unreadable, another grid) does too, with status ``error`` and the reason; only when the
    reference itself cannot be read is the case left out, as one ``error`` row without scores.
    A case with no class in either mask (yet) is one ``both empty`` row without a class.
    """
    try:
        if pred is None:
            return _missing_rows(case, ref, labels, discover, MISSING)
        pred_array, ref_array, spacing = pair_arrays(pred, ref)
        check_label_map(
            pred_array, pred if isinstance(pred, (str, Path)) else "prediction", None if discover else labels
        )
        if discover:
            _add_found(labels, pred_array)
            _add_found(labels, ref_array)
        rows = evaluate_pair(pred_array, ref_array, spacing, dict(_foreground(labels)), tolerance)
    except MedsegError as err:
        return failed_rows(case, ref, labels, discover, str(err))
    return [{"case": case, **row} for row in rows] or [{"case": case, "label": None, "status": BOTH_EMPTY}]


def failed_rows(case: str, ref, labels: dict[int, str], discover: bool, reason: str) -> list[dict]:
    """The rows of a case whose prediction could not be scored: as a missing one, with status
    ``error``; one row without scores if the reference cannot be read either."""
    try:
        return _missing_rows(case, ref, labels, discover, ERROR, reason)
    except MedsegError:
        return [{"case": case, "status": ERROR, "reason": reason}]


def _missing_rows(case, ref, labels, discover, status, reason=None) -> list[dict]:
    ref_image = ref if isinstance(ref, sitk.Image) else read_volume(ref)
    ref_array, spacing = to_array(ref_image), ref_image.GetSpacing()
    if discover:
        _add_found(labels, ref_array)
    worst = worst_distance(ref_array.shape, spacing)
    extra = {"status": status, "worst_mm": worst, **({"reason": reason} if reason else {})}
    rows = [
        {"case": case, "label": c, "class": n, **missing_metrics(ref_array == c, spacing), **extra}
        for c, n in _foreground(labels)
    ]
    return rows or [{"case": case, "label": None, **extra}]


def check_label_map(array: np.ndarray, where, labels: dict[int, str] | None = None) -> None:
    """Refuse a mask that is not a label map: NaN, fractions (a probability map), or, when the
    classes are known, a label they do not name. Each is a failed case, scored under POLICY,
    never a crash nor a silent truncation.

    Raises:
        InputError: naming the file and what it holds.
    """
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(where, "holds NaN or infinite values: not a label map")
        fractions = array[array != np.round(array)]
        if fractions.size:
            raise InputError(
                where, f"holds values that are not whole numbers ({fractions.flat[0]:g}): not a label map"
            )
    if labels is not None:
        unknown = sorted({int(v) for v in np.unique(array)} - {0, *map(int, labels)})
        if unknown:
            named = ", ".join(str(c) for c in sorted({0, *map(int, labels)}))
            raise InputError(where, f"holds label {unknown} that the label map ({named}) does not name")


def is_scored(row: dict) -> bool:
    """Whether a row counts in the means (all do but a case whose reference cannot be read)."""
    return "dice" in row or row["status"] != ERROR


def _foreground(labels: dict[int, str]) -> list[tuple[int, str]]:
    return sorted((int(c), n) for c, n in labels.items() if int(c) != 0)


def _add_found(labels: dict[int, str], array: np.ndarray) -> None:
    for value in np.unique(array):
        if int(value) != 0 and int(value) not in labels:
            labels[int(value)] = f"class_{int(value)}"


def evaluate(
    pred_dir: str | Path,
    ref_dir: str | Path,
    out: str | Path | None = None,
    labels: dict[int, str] | None = None,
    tolerance: float | dict = DEFAULT_TOLERANCE_MM,
    overwrite: bool = False,
    on_case: Callable[[str, str], None] | None = None,
) -> dict:
    """Every metric per case and class of the masks in ``pred_dir`` against ``ref_dir``.

    Cases are matched by name, read a pair at a time and scored with ``evaluate_pair``, under
    ``POLICY``: a reference without a prediction (``missing_predictions``) and a prediction
    that cannot be scored (``errors``) score Dice 0 and the worst distance; a case whose
    reference cannot be read is left out (``summary["cases_not_scored"]``); a prediction
    without a reference is listed (``no_reference``).

    Args:
        pred_dir: predicted masks (sub-folders included).
        ref_dir: reference masks.
        out: folder for ``metrics.csv`` and ``summary.json``; None writes nothing.
        labels: class index -> name; by default the ``labels.json`` that ``predict`` writes
            beside its masks, else every non-zero value found, named ``class_N``.
        tolerance: surface-Dice tolerance in mm, one value or a dict by class name.
        overwrite: replace an earlier ``metrics.csv``/``summary.json`` in ``out``.
        on_case: called with (case, status) as each case is done, for progress.

    Returns:
        ``rows`` (as in metrics.csv), ``summary`` (as in summary.json), ``cases``
        (``{"id", "status", <class>: Dice}`` per case), ``mean`` (Dice per class),
        ``mean_foreground``, ``missing_predictions``, ``no_reference`` and ``errors``.

    Raises:
        InputError: a folder is missing, no prediction has a reference, or ``out`` already
            holds results and ``overwrite`` is off.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    pairs = match_cases(find_masks(pred_dir), find_masks(ref_dir))
    if not any(p and r for _, p, r in pairs):
        raise InputError(pred_dir, f"no mask here has a namesake in {ref_dir}")
    if out is not None:
        refuse_existing(*(Path(out) / n for n in (TABLE, SUMMARY)), overwrite=overwrite)
    labels, discover = class_names(pred_dir, labels)
    rows = []
    for case, pred, ref in pairs:
        if ref is None:
            continue
        found = score_case(case, pred, ref, labels, tolerance, discover)
        rows += found
        if on_case:
            on_case(case, found[0]["status"] if found[0]["status"] in (ERROR, MISSING) else OK)
    result = finish(rows, labels, tolerance, pairs)
    if out is not None:
        write_results(result, Path(out))
    return result


def class_names(pred_dir: Path, labels: dict | None) -> tuple[dict[int, str], bool]:
    """The class names to score by: ``labels``, else the ``labels.json`` predict wrote beside
    the masks; and whether classes the masks hold beyond them are to be found and added (only
    when neither named any)."""
    if labels is None and (pred_dir / LABELS_FILE).is_file():
        labels = read_label_map(pred_dir / LABELS_FILE)
    return {int(c): n for c, n in (labels or {}).items()}, not labels


def fill_absent(rows: list[dict], labels: dict[int, str]) -> list[dict]:
    """Add the rows of classes found only in later cases: absent from both masks of an earlier
    case, they are ``both empty`` there (a failure, as the case's other classes, for a missing
    or unscoreable prediction)."""
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    foreground = _foreground(labels)
    filled = []
    for case, mine in by_case.items():
        if not is_scored(mine[0]) or not foreground:
            filled += mine
            continue
        have = {r["label"]: r for r in mine if r.get("label") is not None}
        first = mine[0]
        failed = first["status"] in (MISSING, ERROR)
        for index, name in foreground:
            filled.append(
                have.get(index) or {"case": case, "label": index, "class": name, **_absent(first, failed)}
            )
    return filled


def _absent(first: dict, failed: bool) -> dict:
    if not failed:
        scores = {"status": BOTH_EMPTY, "dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    else:
        worst = first["worst_mm"]
        scores = {
            "status": first["status"],
            "dice": 0.0,
            "iou": 0.0,
            "hd95": worst,
            "assd": worst,
            "nsd": 0.0,
        }
        scores.update({k: first[k] for k in ("worst_mm", "reason") if k in first})
    return {**scores, **dict.fromkeys(_COUNTS, 0)}


def finish(rows: list[dict], labels: dict[int, str], tolerance, pairs: list[tuple]) -> dict:
    """The evaluation of scored ``rows``: classes found late filled in, summarised, and the
    predictions of ``pairs`` that had no reference listed."""
    result = summarise(fill_absent(rows, labels), labels, tolerance)
    result["no_reference"] = result["summary"]["no_reference"] = [c for c, _, ref in pairs if ref is None]
    return result


POLICY = (
    "both empty: Dice 1, distances 0; one empty, a missing prediction or one that cannot be "
    "scored (another grid, unreadable): Dice 0 and, as HD95 and ASSD, the worst case (the "
    "image's diagonal); a case whose reference cannot be read is left out and listed"
)
FAILED = (PREDICTION_EMPTY, REFERENCE_EMPTY, MISSING, ERROR)  # statuses that score the worst distance


def summarise(rows: list[dict], labels: dict[int, str], tolerance) -> dict:
    """Means, standard deviations and medians per class and metric, and the per-case view."""
    scored = [r for r in rows if is_scored(r) and r.get("label") is not None]
    classes = {}
    for index, name in _foreground(labels):
        mine = [r for r in scored if r["label"] == index]
        classes[name] = {
            "label": index,
            "tolerance_mm": tolerance_for(tolerance, index, name),
            **{metric: _stats([r[metric] for r in mine]) for metric in METRICS},
            "statuses": {s: sum(r["status"] == s for r in mine) for s in sorted({r["status"] for r in mine})},
            "worst_case": sum(r["status"] in FAILED for r in mine),
        }
    mean = {name: stats["dice"]["mean"] for name, stats in classes.items()}
    cases, errors, not_scored = {}, {}, []
    for row in rows:
        if row["status"] == ERROR:
            errors[row["case"]] = row["reason"]
        if not is_scored(row):
            not_scored.append(row["case"])
            continue
        entry = cases.setdefault(row["case"], {"id": row["case"], "status": OK})
        if row["status"] in (MISSING, ERROR):
            entry["status"] = row["status"]
        if row.get("label") is not None:
            entry[row["class"]] = row["dice"]
    foreground = _mean_of(list(mean.values()))
    summary = {
        "cases_scored": len(cases),
        "cases_not_scored": not_scored,
        "mean_foreground_dice": foreground,
        "classes": classes,
        "missing_predictions": sorted(c for c, e in cases.items() if e["status"] == MISSING),
        "errors": errors,
        "hd_percentile": HD_PERCENTILE,
        "empty_mask_policy": POLICY,
    }
    return {
        "rows": rows,
        "summary": summary,
        "cases": list(cases.values()),
        "mean": mean,
        "mean_foreground": foreground,
        "missing_predictions": summary["missing_predictions"],
        "errors": errors,
    }


def _stats(values: list[float]) -> dict:
    defined = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if defined.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0, "undefined": len(values)}
    return {
        "mean": float(defined.mean()),
        "std": float(defined.std()),
        "median": float(np.median(defined)),
        "n": int(defined.size),
        "undefined": len(values) - int(defined.size),
    }


def _mean_of(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def write_results(result: dict, folder: Path) -> None:
    """``metrics.csv`` and ``summary.json`` in ``folder``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in result["rows"]:
        writer.writerow({k: _cell(k, v) for k, v in row.items()})
    write_text_atomic(folder / TABLE, table.getvalue())
    write_text_atomic(folder / SUMMARY, json.dumps(nan_to_none(result["summary"]), indent=2))


def _cell(key: str, value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4f}" if key in ("dice", "iou", "nsd") else f"{value:.3f}"
    return str(value)


def nan_to_none(value):
    """Strict JSON has no NaN: an undefined value is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return value
