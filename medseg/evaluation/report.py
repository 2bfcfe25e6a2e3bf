"""The QC report: a picture per case and an ``index.html`` that ties them together, worst case
first. It is plain HTML beside its PNGs: it opens from the folder in any browser, offline."""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk

from medseg.atomic import refuse_existing, write_text_atomic
from medseg.errors import MedsegError
from medseg.evaluation.folders import (
    ERROR,
    SUMMARY,
    TABLE,
    class_names,
    failed_rows,
    find_masks,
    finish,
    match_cases,
    score_case,
    write_results,
)
from medseg.evaluation.metrics import BOTH_EMPTY, DEFAULT_TOLERANCE_MM, MISSING, OK, volume_unit
from medseg.evaluation.pictures import case_figure
from medseg.files import channel_groups, is_volume_file, safe_name
from medseg.io import read_volume

__all__ = ["qc_report", "INDEX"]

INDEX = "index.html"
PICTURES = "cases"


def qc_report(
    pred_dir: str | Path,
    out_dir: str | Path,
    images: str | Path | None = None,
    ref_dir: str | Path | None = None,
    labels: dict[int, str] | None = None,
    tolerance: float | dict = DEFAULT_TOLERANCE_MM,
    overwrite: bool = False,
    on_case: Callable[[str, str], None] | None = None,
) -> dict:
    """Write a QC report of the masks in ``pred_dir``: ``out_dir/index.html`` and a PNG per case.

    Each case is read once: its mask, its scan from ``images`` (matched by name, nnU-Net's
    ``CASE_0000`` included) and, with ``ref_dir``, its reference. With references the cases are
    scored as ``evaluate`` scores them (and ``metrics.csv`` and ``summary.json`` are written
    beside the page), sorted worst first; without, they are listed by name with their volumes.

    Args:
        pred_dir: predicted masks (sub-folders included).
        out_dir: the report's folder.
        images: the scans the masks were predicted from; None draws the contours on black.
        ref_dir: reference masks, to score and draw against.
        labels: class index -> name; by default ``pred_dir/labels.json``, else ``class_N``.
        tolerance: surface-Dice tolerance in mm, one value or a dict by class name.
        overwrite: replace an earlier report in ``out_dir``.
        on_case: called with (case, status) as each case is done, for progress.

    Returns:
        ``index`` (the page's path), ``problems`` (case -> why it has no picture) and, with
        references, ``evaluation`` (as ``evaluate`` returns it).

    Raises:
        InputError: a folder is missing, or ``out_dir`` holds a report and ``overwrite`` is off.
    """
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    preds = find_masks(pred_dir)
    pairs = (
        match_cases(preds, find_masks(ref_dir))
        if ref_dir
        else [(c, p, None) for c, p in sorted(preds.items())]
    )
    scans = _scans(Path(images)) if images else {}
    refuse_existing(*(out_dir / n for n in (INDEX, TABLE, SUMMARY)), overwrite=overwrite)
    labels, discover = class_names(pred_dir, labels)
    rows, entries, names = [], [], _Names()
    for case, pred, ref in pairs:
        entry = {"case": case, "pred": pred, "ref": ref, "picture": None, "problem": ""}
        entry["unreferenced"] = bool(ref_dir) and ref is None
        try:
            pred_image = read_volume(pred) if pred else None
            ref_image = read_volume(ref) if ref else None
            if ref_image is not None:
                scored = score_case(case, pred_image, ref_image, labels, tolerance, discover)
                rows += scored
                entry["rows"] = scored
                if scored[0]["status"] == ERROR:
                    raise _Unscored(scored[0]["reason"])
            entry["volumes"] = _volumes(pred_image, labels, discover)
            scan = _scan_for(case, scans, entry)
            picture = out_dir / PICTURES / f"{names.take(case)}.png"
            case_figure(pred_image, picture, scan, ref_image, labels, title=_title(entry))
            entry["picture"] = picture.relative_to(out_dir).as_posix()
        except _Unscored as err:
            entry["problem"] = str(err)
        except MedsegError as err:  # a file that cannot be read: named, and the rest carry on
            entry["problem"] = str(err)
            if ref:
                rows += failed_rows(case, ref, labels, discover, str(err))
        entries.append(entry)
        if on_case:
            on_case(case, ERROR if entry["problem"] else OK)
    result = {
        "index": out_dir / INDEX,
        "problems": {e["case"]: e["problem"] for e in entries if e["problem"]},
    }
    if ref_dir:
        evaluation = finish(rows, labels, tolerance, pairs)
        write_results(evaluation, out_dir)
        result["evaluation"] = evaluation
    write_text_atomic(out_dir / INDEX, _page(entries, labels, result.get("evaluation"), pred_dir, ref_dir))
    return result


class _Unscored(Exception):
    """A case whose masks could not be scored: it is listed with the reason, without a picture."""


class _Names:
    """File names for the pictures: the case name made safe, each used once."""

    def __init__(self):
        self.used: set[str] = set()

    def take(self, case: str) -> str:
        base = safe_name(case)
        name, n = base, 1
        while name.lower() in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name.lower())
        return name


def _scans(folder: Path) -> dict[str, Path]:
    """Case name -> scan file in ``folder`` (recursively); of nnU-Net's ``CASE_0000``,
    ``CASE_0001``, ... the first channel."""
    if not folder.is_dir():
        from medseg.errors import InputError

        raise InputError(folder, "no such folder")
    by_folder: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.name.startswith(".") and path.is_file() and is_volume_file(path):
            by_folder.setdefault(path.parent, []).append(path)
    found = {}
    for place, files in by_folder.items():
        for group in channel_groups(files):  # the rule predict names masks by
            found[(place.relative_to(folder) / group.id).as_posix()] = group.files[0]
    return found


def _scan_for(case: str, scans: dict[str, Path], entry: dict) -> sitk.Image | None:
    """The case's scan, or None (noted in ``entry``) when it is absent or cannot be read: the
    contours are still worth drawing."""
    path = scans.get(case)
    if path is None:  # masks in mirrored sub-folders against a flat folder of scans, or back
        leaf = case.rsplit("/", 1)[-1]
        hits = [p for c, p in scans.items() if c.rsplit("/", 1)[-1] == leaf]
        path = hits[0] if len(hits) == 1 else None
    if path is None:
        if scans:
            entry["note"] = "no scan of this name: contours on black"
        return None
    try:
        return read_volume(path)
    except MedsegError as err:
        entry["note"] = f"scan not drawn: {err}"
        return None


def _volumes(mask: sitk.Image | None, labels: dict[int, str], discover: bool) -> dict[int, float]:
    """Volume (mL; cm^2 for 2D) of each class of a mask."""
    if mask is None:
        return {}
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(
        sitk.Cast(mask, sitk.sitkUInt16)
        if mask.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16)
        else mask
    )
    unit = volume_unit(mask.GetDimension())[0]
    found = {int(c): stats.GetPhysicalSize(c) / unit for c in stats.GetLabels() if c != 0}
    if discover:
        for c in found:
            labels.setdefault(c, f"class_{c}")
    return found


def _title(entry: dict) -> str:
    mean = _mean_dice(entry)
    return entry["case"] if math.isnan(mean) else f"{entry['case']}   mean Dice {mean:.3f}"


def _mean_dice(entry: dict) -> float:
    scores = [r["dice"] for r in entry.get("rows", []) if r.get("label") is not None and r["status"] != ERROR]
    return sum(scores) / len(scores) if scores else math.nan


# -- the page ---------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
.meta { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.name, th.name { text-align: left; }
td.bad { color: #b00020; font-weight: 600; }
td.flag { color: #8a5a00; text-align: left; }
img { max-width: 100%; height: auto; display: block; }
.case { margin: 0 0 1.5em 0; }
"""


def _page(entries, labels, evaluation, pred_dir, ref_dir) -> str:
    from medseg._version import __version__

    classes = [(c, n) for c, n in sorted(labels.items()) if c != 0]
    if evaluation:
        entries = sorted(entries, key=lambda e: (not e["problem"], _sortable(_mean_dice(e)), e["case"]))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>medseg QC report: {_e(pred_dir.name)}</title><style>{_STYLE}</style></head><body>",
        "<h1>medseg QC report</h1>",
        f'<p class="meta">masks: {_e(pred_dir)}'
        + (f"<br>references: {_e(ref_dir)}" if ref_dir else "")
        + f"<br>{len(entries)} cases; written {time.strftime('%Y-%m-%d %H:%M')} by medseg {__version__}</p>",
    ]
    if evaluation:
        parts.append(_summary_table(evaluation, classes))
    parts.append(_case_table(entries, classes, bool(evaluation)))
    for entry in entries:
        if entry["picture"]:
            anchor = _e(entry["picture"])
            parts.append(
                f'<div class="case" id="{anchor}"><h2 style="font-size:1em">{_e(entry["case"])}</h2>'
                f'<a href="{anchor}"><img src="{anchor}" alt="{_e(entry["case"])}: slices with contours" '
                'loading="lazy"></a></div>'
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _summary_table(evaluation: dict, classes) -> str:
    summary = evaluation["summary"]
    head = "<tr><th class=name>class</th><th>Dice</th><th>IoU</th><th>HD95 (mm)</th><th>ASSD (mm)</th>"
    head += "<th>surface Dice</th><th>tolerance (mm)</th></tr>"
    rows = []
    for _, name in classes:
        stats = summary["classes"].get(name)
        if not stats:
            continue
        digits = {"hd95": 2, "assd": 2}  # mm to 0.01; scores to 0.001
        cells = [
            f"{_num(stats[m]['mean'], digits.get(m, 3))} ± {_num(stats[m]['std'], digits.get(m, 3))}"
            for m in ("dice", "iou", "hd95", "assd", "nsd")
        ]
        rows.append(
            f"<tr><td class=name>{_e(name)}</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + f"<td>{stats['tolerance_mm']:g}</td></tr>"
        )
    notes = []
    if summary["missing_predictions"]:
        notes.append(f"missing predictions (scored 0): {_e(', '.join(summary['missing_predictions']))}")
    if summary["errors"]:
        notes.append(f"not scored: {_e(', '.join(summary['errors']))}")
    return (
        f"<h2 style='font-size:1.1em'>Mean foreground Dice {_num(summary['mean_foreground_dice'])}"
        f" over {summary['cases_scored']} cases</h2>"
        f"<table>{head}{''.join(rows)}</table>"
        + "".join(f'<p class="meta">{n}</p>' for n in notes)
        + f'<p class="meta">Mean ± standard deviation over cases. {_e(summary["empty_mask_policy"])}. '
        f'Per case and class: <a href="{TABLE}">{TABLE}</a>; summary: <a href="{SUMMARY}">{SUMMARY}</a>.</p>'
    )


def _case_table(entries, classes, scored: bool) -> str:
    head = ["<th class=name>case</th>"]
    if scored:
        head += ["<th>mean Dice</th>"] + [f"<th>Dice {_e(n)}</th>" for _, n in classes]
        head += [f"<th>HD95 {_e(n)} (mm)</th>" for _, n in classes]
    unit = "mL (reference)" if scored else "mL"
    head += [f"<th>{_e(n)} {unit}</th>" for _, n in classes] + ["<th class=name>notes</th>"]
    body = []
    for entry in entries:
        by_label = {r["label"]: r for r in entry.get("rows", []) if "label" in r}
        name = _e(entry["case"])
        cells = [
            f'<td class=name><a href="#{_e(entry["picture"])}">{name}</a></td>'
            if entry["picture"]
            else f"<td class=name>{name}</td>"
        ]
        if scored:
            mean = _mean_dice(entry)
            cells.append(f"<td{' class=bad' if mean < 0.5 else ''}>{_num(mean)}</td>")
            cells += [f"<td>{_num(by_label[c]['dice']) if c in by_label else ''}</td>" for c, _ in classes]
            cells += [f"<td>{_num(by_label[c]['hd95'], 2) if c in by_label else ''}</td>" for c, _ in classes]
        cells += [f"<td>{_volume_cell(entry, by_label, c)}</td>" for c, _ in classes]
        cells.append(f"<td class=flag>{_e(_notes(entry))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{''.join(head)}</tr>{''.join(body)}</table>"


def _volume_cell(entry: dict, by_label: dict, label: int) -> str:
    """The predicted volume of a class, and the reference's in brackets when there is one."""
    text = _num(entry["volumes"].get(label, 0.0), 1) if "volumes" in entry else ""
    if label in by_label:
        text += f" ({_num(by_label[label]['ref_ml'], 1)})"
    return text


def _notes(entry: dict) -> str:
    if entry["problem"]:
        return entry["problem"]
    if entry["pred"] is None:
        return MISSING
    if entry["unreferenced"]:
        return "no reference"
    flags = [entry["note"]] if entry.get("note") else []
    flags += sorted(
        {f"{r['class']}: {r['status']}" for r in entry.get("rows", []) if r["status"] not in (OK, BOTH_EMPTY)}
    )
    return "; ".join(flags)


def _sortable(value: float) -> float:
    return -1.0 if math.isnan(value) else value


def _num(value, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _e(value) -> str:
    return html.escape(str(value), quote=True)
