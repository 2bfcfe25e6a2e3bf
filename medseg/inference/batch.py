"""Predict many files: one bad file is reported and skipped, never stops the run."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from medseg.data.datasets import list_volumes
from medseg.errors import InputError, find_medseg_error
from medseg.evaluation.metrics import LABELS_FILE
from medseg.inference.predictor import Predictor
from medseg.io import VOLUME_SUFFIXES, write_text_atomic

__all__ = ["BatchResult", "collect_inputs", "output_path", "predict_many"]


@dataclass
class BatchResult:
    """What a batch run did: files written, skipped (already there) and failed (with reasons)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def collect_inputs(source: str | Path) -> list[Path]:
    """The input files: one file, or every volume file in a folder."""
    source = Path(source)
    if source.is_dir():
        files = list_volumes(source)
        if not files:
            raise InputError(source, f"holds no image files ({', '.join(VOLUME_SUFFIXES)})")
        return files
    if not source.exists():
        raise InputError(source, "no such file or folder")
    return [source]


def output_path(input_path: Path, output_dir: Path) -> Path:
    """Where the mask of ``input_path`` goes: same name and format, inside ``output_dir`` only."""
    name = Path(input_path).name  # a bare file name: input paths cannot steer the output elsewhere
    return Path(output_dir) / name


def predict_many(
    predictor: Predictor, source: str | Path, output_dir: str | Path, overwrite: bool = False
) -> BatchResult:
    """Segment one file or a folder of files into ``output_dir``.

    Writes ``labels.json`` (class index -> name) beside the masks, for ``evaluate`` and people.
    Existing outputs are kept (and counted as skipped) unless ``overwrite``, so a stopped run
    resumes where it was. A file that fails is recorded with its reason and the run carries on.
    """
    output_dir = Path(output_dir)
    result = BatchResult()
    files = collect_inputs(source)
    labels = {str(k): v for k, v in sorted(predictor.labels.items())}
    write_text_atomic(output_dir / LABELS_FILE, json.dumps(labels, indent=2) + "\n")
    for path in tqdm(files, desc="predict", unit="case", disable=None if len(files) > 1 else True):
        target = output_path(path, output_dir)
        if target.exists() and not overwrite:
            result.skipped.append(str(target))
            continue
        try:
            predictor.predict_file(path, target, overwrite=overwrite)
        except Exception as exc:  # one case must never stop a batch of thousands
            known = find_medseg_error(exc)
            result.failed[str(path)] = known.message if known else f"unexpected {type(exc).__name__}: {exc}"
        if str(path) in result.failed:
            tqdm.write(f"error: {path}: {result.failed[str(path)]}", file=sys.stderr)
            continue
        result.written.append(str(target))
    return result
