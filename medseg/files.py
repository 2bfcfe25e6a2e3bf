"""The names of files medseg reads and writes: volume formats by suffix, case names, nnU-Net's
channel suffix, names made safe from input, and the files predict writes beside its masks."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "VOLUME_SUFFIXES",
    "EXTRAS",
    "LABELS_FILE",
    "is_volume_file",
    "case_id",
    "safe_name",
    "split_channel_suffix",
    "volume_suffix",
]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")
EXTRAS = ("probabilities", "uncertainty")  # maps predict writes beside a mask on request
LABELS_FILE = "labels.json"  # predict writes it beside the masks: class index -> name
_CHANNEL = re.compile(r"_(\d{4})$")


def volume_suffix(path: str | Path) -> str:
    """The format suffix of a volume file name (``.nii.gz``, ``.nrrd``, ...), or ''."""
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def is_volume_file(path: str | Path) -> bool:
    """True if the file name ends in an image format medseg reads (3D volumes or 2D images)."""
    return bool(volume_suffix(path))


def case_id(path: str | Path) -> str:
    """The case name of a file: its name without the format suffix (``ab.nii.gz`` -> ``ab``); the
    name of a folder (a DICOM series) as it is."""
    if Path(path).is_dir():
        return Path(path).name
    name = Path(path).name
    suffix = volume_suffix(path)
    return name[: -len(suffix)] if suffix else Path(path).stem


def safe_name(raw: str) -> str:
    """A name from input (a list's ``id``, a case name) as a bare file name: no folders, no dots
    at the start, nothing but letters, digits, ``.``, ``_`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "case"


def split_channel_suffix(path: str | Path) -> tuple[str, int | None]:
    """nnU-Net's channel naming: ``CASE_0001.nii.gz`` -> ``("CASE", 1)``; other names -> ``(id, None)``."""
    match = _CHANNEL.search(case_id(path))
    return (case_id(path)[: match.start()], int(match.group(1))) if match else (case_id(path), None)
