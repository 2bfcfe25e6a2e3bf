"""Predict many cases: nothing lost, nothing stale, one bad file never stops the run.

A run writes masks (mirroring the input's sub-folders), ``labels.json``, and its report
(``predictions.csv`` and ``run.json``, see ``batch_report``), updated as each case finishes.
Masks already in the output folder count as done only when a report there says this checkpoint
wrote them with the same options; any other mask in the way stops the run before it starts,
unless ``overwrite`` (``docs/batch.md``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg._version import __version__
from medseg.atomic import remove_stale_temp, write_text_atomic
from medseg.errors import InputError, find_medseg_error
from medseg.evaluation.metrics import volume_unit
from medseg.files import EXTRAS, LABELS_FILE
from medseg.inference.batch_report import BatchReport, PreviousMask, previous_masks
from medseg.inference.cases import (
    BatchCase,
    check_output_folder,
    discover,
    extra_name,
    refuse_collisions,
    take_shard,
)
from medseg.inference.predictor import LoadedCase, Predictor, Segmentation
from medseg.io import write_image, write_vectors

__all__ = ["BatchResult", "predict_many", "process_shard"]

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What a batch run did.

    Args:
        written, skipped: mask paths (inputs, for skipped non-images); failed: input -> reason.
        report: the run's ``predictions.csv``; records: one dict per case, as in ``run.json``.
    """

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: Path | None = None
    records: list[dict] = field(default_factory=list)


def process_shard(shard: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """This process's shard: ``shard`` as given, split further by rank under torchrun (which
    sets ``RANK`` and ``WORLD_SIZE``), so every process of every job takes its own cases."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return shard
    rank = int(os.environ.get("RANK", "0"))
    index, count = shard or (0, 1)
    return index * world + rank, count * world


def predict_many(
    predictor: Predictor,
    source: str | Path,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    fmt: str = "same",
    shard: tuple[int, int] | None = None,
    statistics: bool = False,
    preview: bool = False,
    probabilities: bool = False,
    uncertainty: bool = False,
    prefetch: bool | None = None,
    on_case: Callable[[dict, int, int], None] | None = None,
) -> BatchResult:
    """Segment a file, a folder (recursively), a ``.csv``/``.txt`` list, or DICOM series.

    Args:
        predictor: the model to use.
        source: what to segment (see ``medseg.inference.cases.discover``).
        output_dir: where masks go; sub-folders of the input are mirrored there.
        overwrite: redo masks that are already there, whoever made them.
        fmt: ``same`` (the input's format; NIfTI for DICOM), ``nifti``, ``nrrd``, ``mha`` or
            ``dicom-seg`` (DICOM series only; needs ``medseg[dicom]``).
        shard: ``(i, n)``: take only the i-th of n shares of the cases (torchrun splits further).
        statistics: also record the mean image intensity inside each label.
        preview: also draw a PNG overlay of each mask, in ``output_dir/previews``.
        probabilities: also write the class probabilities beside each mask
            (``<case>_probabilities``, one component per class; before post-processing).
        uncertainty: also write where the passes disagree (``<case>_uncertainty``, 0..1; needs
            flip TTA or an ensemble), and record its mean inside the labels.
        prefetch: read and preprocess the next case in a second thread while the network works
            on the current one. None: on GPUs only (on a CPU the network already uses every
            core; docs/performance.md).
        on_case: called with each finished case's record, its number and the total (progress).

    Raises:
        ConfigError: ``uncertainty`` with a single pass (no TTA, one model).
        InputError: before any inference, when the output folder is the input folder (or in
            it), is not writable, or holds masks not made by this checkpoint with these
            options (unless ``overwrite``).
    """
    if uncertainty:
        predictor.check_uncertainty()
    cases = discover(source, fmt, predictor.plan.channels)
    extras = tuple(kind for kind, wanted in zip(EXTRAS, (probabilities, uncertainty)) if wanted)
    refuse_collisions(cases, extras)
    output_dir = check_output_folder(source, output_dir, cases, extras)
    if fmt == "dicom-seg":
        _need_highdicom(output_dir)
    shard = process_shard(shard)
    if shard:
        cases = take_shard(cases, *shard)
    remove_stale_temp(output_dir)
    options = {"format": fmt, **predictor.options, "probabilities": probabilities, "uncertainty": uncertainty}
    identity = {"checkpoint_sha256": predictor.sha256, "options": options}
    done = _plan_reuse(cases, output_dir, identity, overwrite, extras)
    report = BatchReport(
        output_dir,
        identity=identity,
        info={
            "medseg_version": __version__,
            "checkpoint": predictor.checkpoint,
            "input": str(Path(source).resolve()),
            "output": str(output_dir.resolve()),
            "shard": f"{shard[0]}/{shard[1]}" if shard else None,
            "statistics": statistics,
            "device": str(predictor.device),
        },
        labels=[name for index, name in sorted(predictor.labels.items()) if index != 0],
        size_column=volume_unit(predictor.plan.spatial_dims)[1],
        statistics=statistics,
        uncertainty=uncertainty,
        shard=shard,
        total=len(cases),
    )
    labels = {str(k): v for k, v in sorted(predictor.labels.items())}
    write_text_atomic(output_dir / LABELS_FILE, json.dumps(labels, indent=2) + "\n")
    runner = _Runner(predictor, output_dir, report, statistics, preview, extras)
    todo = [c for c in cases if not c.status and c.mask not in done]
    if prefetch is None:
        prefetch = predictor.device.type != "cpu"
    loads = _prefetch(predictor, todo) if prefetch else (_now(predictor.load, c.source) for c in todo)
    for number, case in enumerate(cases, 1):
        if case.status or case.mask in done:
            record = _decided(case, done.get(case.mask))
            report.add(record)
        else:
            record = runner.run(case, next(loads))
        if on_case:
            on_case(record, number, len(cases))
    report.close()
    return _result(report, output_dir)


def _need_highdicom(where: Path) -> None:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise InputError(where, "DICOM-SEG output needs highdicom: pip install 'medseg[dicom]'") from None


def _plan_reuse(cases: list[BatchCase], output_dir: Path, identity: dict, overwrite: bool, extras) -> dict:
    """Which existing masks are done (mask -> earlier record). Masks (or their extra maps) in
    the way that a report does not vouch for stop the run, unless ``overwrite`` (then every
    case is redone)."""
    existing = [c for c in cases if c.mask and any((output_dir / n).exists() for n in _outputs(c, extras))]
    if overwrite or not existing:
        return {}
    previous = previous_masks(output_dir)
    done, strangers = {}, []
    for case in existing:
        known = previous.get(case.mask)
        if known and known.identity == identity and known.finished:
            done[case.mask] = known
        elif not (known and known.identity == identity):  # an unfinished write of ours is redone
            strangers.append((case.mask, _why_foreign(known, identity)))
    if strangers:
        mask, why = strangers[0]
        raise InputError(
            output_dir,
            f"{len(strangers)} mask(s) here were not made by this checkpoint with these options "
            f"(first: {mask}: {why}); pass --overwrite to redo them, or choose another --output",
        )
    return done


def _why_foreign(known: PreviousMask | None, identity: dict) -> str:
    if known is None:
        return "no run report here records it"
    theirs, ours = known.identity.get("checkpoint_sha256", ""), identity["checkpoint_sha256"]
    if theirs != ours:
        return f"made by checkpoint {theirs[:12]}, this one is {ours[:12]}"
    changed = [
        f"{key} {known.identity['options'].get(key)!r} -> {value!r}"
        for key, value in identity["options"].items()
        if known.identity.get("options", {}).get(key) != value
    ]
    return "made with other options: " + ", ".join(changed)


def _decided(case: BatchCase, previous: PreviousMask | None) -> dict:
    """The record of a case settled without inference: refused, not an image, or done before."""
    record = {
        "input": ";".join(case.inputs),
        "output": case.mask,
        "status": case.status,
        "reason": case.reason,
    }
    if previous is not None:
        earlier = previous.record
        record.update(
            status="skipped",
            reason="done by an earlier run with this checkpoint and options",
            **{k: earlier[k] for k in ("volumes_ml", "mean_intensity", "uncertainty") if k in earlier},
        )
    return record


def _prefetch(predictor: Predictor, cases: list[BatchCase]):
    """Yield each case's loaded input (or the error reading it), reading the next case in a
    second thread while the caller computes on the current one. Two cases at most are held."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-read") as pool:
        ahead: Future | None = pool.submit(predictor.load, cases[0].source) if cases else None
        for i in range(len(cases)):
            current = ahead
            ahead = pool.submit(predictor.load, cases[i + 1].source) if i + 1 < len(cases) else None
            yield current


def _now(load, source) -> Future:
    """A finished future holding ``load(source)`` or its error, read in this thread."""
    future: Future = Future()
    try:
        future.set_result(load(source))
    except Exception as exc:  # handed to the runner, which records it
        future.set_exception(exc)
    return future


class _Runner:
    """Runs one case at a time and records it; a failure is recorded, never raised."""

    def __init__(
        self, predictor, output_dir: Path, report: BatchReport, statistics: bool, preview: bool, extras
    ):
        self.predictor, self.output_dir, self.report = predictor, output_dir, report
        self.statistics, self.preview, self.extras = statistics, preview, extras

    def run(self, case: BatchCase, loading: Future) -> dict:
        start = time.monotonic()
        record = {"input": ";".join(case.inputs), "output": case.mask}
        try:
            loaded = loading.result()
            result = self.predictor.segment(
                loaded, probabilities="probabilities" in self.extras, uncertainty="uncertainty" in self.extras
            )
            self.report.start(case.mask)
            # The maps first, the mask last: a mask in place means its case is complete.
            if result.probabilities is not None:
                where = self.output_dir / extra_name(case.mask, "probabilities")
                write_vectors(result.probabilities, where, loaded.reference, overwrite=True)
            if result.uncertainty is not None:
                where = self.output_dir / extra_name(case.mask, "uncertainty")
                write_image(result.uncertainty, where, overwrite=True)
            self.predictor.write(result.labels, loaded, self.output_dir / case.mask, overwrite=True)
        except Exception as exc:  # one case must never stop a batch of thousands
            known = find_medseg_error(exc)
            reason = known.message if known else f"unexpected {type(exc).__name__}: {exc}"
            record.update(status="failed", reason=reason, seconds=round(time.monotonic() - start, 2))
            if not known:
                log.warning("%s: %s", case.inputs[0], reason, exc_info=exc)
            self.report.add(record)
            return record
        record.update(status="written", reason="; ".join(loaded.warnings))
        record.update(self._extras(result, loaded, case))
        record["seconds"] = round(time.monotonic() - start, 2)
        self.report.add(record)
        return record

    def _extras(self, result: Segmentation, loaded: LoadedCase, case: BatchCase) -> dict:
        """Volumes, statistics, mean uncertainty and the preview of a written mask. The mask
        stands without them: one that fails is named in the case's reason, and the run goes on."""
        out, missed = {}, []
        steps = [("volumes", lambda: out.update(self._measure(result.labels, loaded)))]
        if result.uncertainty is not None:
            steps.append(("uncertainty", lambda: out.update(uncertainty=_mean_inside(result, result.labels))))
        if self.preview:
            steps.append(("preview", lambda: self._draw(result.labels, loaded, case)))
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # the mask is written; what is drawn or counted from it can wait
                known = find_medseg_error(exc)
                missed.append(f"no {name}: {known.message if known else f'{type(exc).__name__}: {exc}'}")
                if not known:
                    log.warning("%s: %s", case.inputs[0], missed[-1], exc_info=exc)
        if missed:
            out["reason"] = "; ".join([*loaded.warnings, *missed])
        return out

    def _measure(self, mask: np.ndarray, loaded: LoadedCase) -> dict:
        """Each label's volume in mL (area in cm^2 for 2D images), and with ``statistics`` the
        mean intensity of the (first channel of the) image inside it."""
        reference = loaded.reference
        voxel = float(np.prod(reference.GetSpacing()))
        unit = volume_unit(reference.GetDimension())[0]
        counts = _per_label(mask, max(self.predictor.labels) + 1)
        names = {k: v for k, v in self.predictor.labels.items() if k != 0}
        out = {"volumes_ml": {names[k]: counts[k] * voxel / unit for k in sorted(names)}}
        if self.statistics:
            sums = _per_label(mask, len(counts), weights=sitk.GetArrayViewFromImage(reference))
            out["mean_intensity"] = {
                names[k]: (sums[k] / counts[k] if counts[k] else None) for k in sorted(names)
            }
        return out

    def _draw(self, mask: np.ndarray, loaded: LoadedCase, case: BatchCase) -> None:
        from medseg.evaluation.pictures import case_figure

        image = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose()))
        image.CopyInformation(loaded.reference)
        target = self.output_dir / "previews" / f"{case.mask}.png"
        case_figure(image, target, loaded.reference, names=self.predictor.labels, title=Path(case.mask).name)


def _per_label(mask: np.ndarray, length: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Voxels (or the sum of ``weights``, (k, j[, i]) like the image array) per label of a mask
    in (i, j[, k]) order, a slab at a time: ``bincount`` works in 64 bits, 8 bytes a voxel."""
    labels = mask.transpose()  # the array's own (k, j, i) order: slabs without copies
    step = max(1, (1 << 22) // max(1, labels[0].size))
    total = np.zeros(length)
    for start in range(0, len(labels), step):
        chunk = None if weights is None else weights[start : start + step].ravel()
        total += np.bincount(labels[start : start + step].ravel(), weights=chunk, minlength=length)
    return total


def _outputs(case: BatchCase, extras) -> list[str]:
    return [case.mask] + [extra_name(case.mask, kind) for kind in extras]


def _mean_inside(result: Segmentation, mask: np.ndarray) -> float | None:
    """The mean uncertainty over the voxels given a foreground label (None if there are none):
    one number to sort a batch's cases by how sure the models were of them."""
    spread = sitk.GetArrayViewFromImage(result.uncertainty)  # (k, j, i)
    inside = mask.transpose() != 0
    return float(spread[inside].mean()) if inside.any() else None


def _result(report: BatchReport, output_dir: Path) -> BatchResult:
    result = BatchResult(report=report.csv_path, records=report.records)
    for record in report.records:
        if record["status"] == "written":
            result.written.append(str(output_dir / record["output"]))
        elif record["status"] == "skipped":
            result.skipped.append(str(output_dir / record["output"]) if record["output"] else record["input"])
        else:
            result.failed[record["input"]] = record["reason"]
    return result
