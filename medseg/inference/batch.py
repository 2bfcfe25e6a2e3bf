"""Predict many files: one bad file is reported and skipped, never stops the run."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from medseg.data.datasets import list_volumes
from medseg.dicom import DicomSeries, find_series
from medseg.errors import ConfigError, InputError, find_medseg_error
from medseg.evaluation.metrics import LABELS_FILE
from medseg.inference.predictor import Predictor
from medseg.io import VOLUME_SUFFIXES, case_id, split_channel, write_text_atomic

__all__ = ["BatchResult", "ChannelFiles", "collect_inputs", "output_path", "predict_many"]


@dataclass
class BatchResult:
    """What a batch run did: files written, skipped (already there) and failed (with reasons)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ChannelFiles:
    """The files of one multi-channel case (nnU-Net's ``CASE_0000``, ``CASE_0001``, ...)."""

    id: str
    files: tuple[Path, ...]

    def __iter__(self):
        return iter(self.files)

    def __str__(self) -> str:
        return str(self.files[0].parent / f"{self.id}_*")


def _group_channels(files: list[Path]) -> list[Path | ChannelFiles]:
    """Files named ``CASE_0000``, ``CASE_0001``, ... become one case; others stay single."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        case, channel = split_channel(path)
        groups.setdefault(case if channel is not None else str(path), []).append(path)
    return [ChannelFiles(key, tuple(paths)) if len(paths) > 1 else paths[0] for key, paths in groups.items()]


def collect_inputs(source: str | Path) -> list[Path | ChannelFiles | DicomSeries]:
    """The cases to segment: one file, one DICOM folder, or a folder's volume files (channel
    files grouped) plus every DICOM series in it and its subfolders."""
    source = Path(source)
    if not source.exists():
        raise InputError(source, "no such file or folder")
    if not source.is_dir():
        return [source]
    cases: list[Path | ChannelFiles | DicomSeries] = [
        *_group_channels(list_volumes(source)),
        *find_series(source),
    ]
    if not cases:
        raise InputError(source, f"holds no image files ({', '.join(VOLUME_SUFFIXES)}) and no DICOM series")
    return cases


FORMATS = {"same": "", "nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".dcm"}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError("format", f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")


def output_path(case: Path | ChannelFiles | DicomSeries, output_dir: Path, fmt: str = "same") -> Path:
    """Where a case's mask goes, always directly inside ``output_dir``.

    With ``same``, a file keeps its name and format and a DICOM series becomes
    ``<description>_<uid tail>.nii.gz``; other formats change the suffix. Names are bare file
    names, so neither input paths nor DICOM metadata can steer the output elsewhere.
    """
    _check_format(fmt)
    if isinstance(case, DicomSeries):
        return Path(output_dir) / f"{case.name}{FORMATS[fmt] or '.nii.gz'}"
    if isinstance(case, ChannelFiles):
        first = case.files[0].name
        return Path(output_dir) / f"{case.id}{FORMATS[fmt] or first[len(case_id(first)) :]}"
    name = Path(case).name
    return Path(output_dir) / (f"{case_id(name)}{FORMATS[fmt]}" if FORMATS[fmt] else name)


def predict_many(
    predictor: Predictor,
    source: str | Path,
    output_dir: str | Path,
    overwrite: bool = False,
    fmt: str = "same",
) -> BatchResult:
    """Segment one file, one DICOM series, or a folder of files and series into ``output_dir``.

    ``fmt`` is ``same`` (the input's format; NIfTI for DICOM series), ``nifti``, ``nrrd``,
    ``mha`` or ``dicom-seg`` (DICOM series only; needs ``medseg[dicom]``).
    Writes ``labels.json`` (class index -> name) beside the masks, for ``evaluate`` and people.
    Existing outputs are kept (and counted as skipped) unless ``overwrite``, so a stopped run
    resumes where it was. A file that fails is recorded with its reason and the run carries on.
    """
    output_dir = Path(output_dir)
    _check_format(fmt)  # before any work
    result = BatchResult()
    files = collect_inputs(source)
    labels = {str(k): v for k, v in sorted(predictor.labels.items())}
    write_text_atomic(output_dir / LABELS_FILE, json.dumps(labels, indent=2) + "\n")
    for case in tqdm(files, desc="predict", unit="case", disable=None if len(files) > 1 else True):
        target = output_path(case, output_dir, fmt)
        if target.exists() and not overwrite:
            result.skipped.append(str(target))
            continue
        try:
            predictor.predict_file(case, target, overwrite=overwrite)
        except Exception as exc:  # one case must never stop a batch of thousands
            known = find_medseg_error(exc)
            reason = known.message if known else f"unexpected {type(exc).__name__}: {exc}"
            result.failed[str(case)] = reason
            tqdm.write(f"error: {case}: {reason}", file=sys.stderr)
        else:
            result.written.append(str(target))
    return result
