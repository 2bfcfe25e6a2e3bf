"""The names of files medseg reads and writes: volume formats by suffix, case names, nnU-Net's
channel suffix, names made safe from input, and the files predict writes beside its masks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "VOLUME_SUFFIXES",
    "EXTRAS",
    "LABELS_FILE",
    "EXPORTED_MODEL_FILE",
    "is_exported",
    "is_volume_file",
    "case_id",
    "safe_name",
    "split_channel_suffix",
    "ChannelGroup",
    "channel_groups",
    "volume_suffix",
]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")
EXTRAS = ("probabilities", "uncertainty")  # maps predict writes beside a mask on request
LABELS_FILE = "labels.json"  # predict writes it beside the masks: class index -> name
EXPORTED_MODEL_FILE = "medseg-model.json"  # what a folder from medseg export holds
_CHANNEL = re.compile(r"_(\d{4})$")


def volume_suffix(path: str | Path) -> str:
    """The format suffix of a volume file name (``.nii.gz``, ``.nrrd``, ...), or ''."""
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` is an exported model's ``medseg-model.json`` or its folder. Here, not
    beside the rest of the model folder's code, so the command line can ask before torch loads."""
    path = Path(path)
    return path.name == EXPORTED_MODEL_FILE or (path / EXPORTED_MODEL_FILE).is_file()


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


@dataclass(frozen=True)
class ChannelGroup:
    """One case of ``channel_groups``: its name, its files in channel order, and what is wrong
    with it (empty when nothing is)."""

    id: str
    files: tuple[Path, ...]
    problem: str = ""


def channel_groups(
    paths: list[Path], channels: int | None = None, labelled: set[str] | None = None
) -> list[ChannelGroup]:
    """The cases among one folder's image files, by the one rule training and prediction share.

    Files ``CASE_0000``, ``CASE_0001``, ... ``CASE_{k-1}`` are the k channels of case ``CASE``
    when they are numbered without a gap from ``_0000`` and k >= 2. Every other file is a case of
    its own, so a series ``amos_0001``, ``amos_0002``, ... is so many scans. A lone ``CASE_0000``
    is case ``CASE`` (nnU-Net's single-channel naming).

    Args:
        paths: the image files of one folder.
        channels: the model's channel count. 1 groups nothing; k >= 2 groups only sets of k
            (a ``_0000`` set of another size is returned with its ``problem``); None: any k.
        labelled: the case names that have labels (training). A set whose files are each
            labelled, and the set's name not, is so many scans, not channels.
    """
    by_prefix: dict[str, dict[int, Path]] = {}
    alone: list[Path] = []
    for path in paths:
        case, channel = split_channel_suffix(path)
        if channel is None:
            alone.append(path)
        else:
            by_prefix.setdefault(case, {})[channel] = path
    groups = [ChannelGroup(case_id(p), (p,)) for p in alone]
    for case, numbered in by_prefix.items():
        order = sorted(numbered)
        files = tuple(numbered[k] for k in order)
        singles = [ChannelGroup(case_id(f), (f,)) for f in files]
        names = ", ".join(case_id(f) for f in files)
        separate = labelled is not None and case not in labelled and all(g.id in labelled for g in singles)
        if separate or channels == 1 and len(files) > 1:
            groups += singles
        elif len(files) == 1:
            groups.append(ChannelGroup(case, files) if order == [0] else singles[0])
        elif order != list(range(len(files))):
            if labelled is not None and case in labelled:  # its label says these are channels
                problem = f"channels are not numbered _0000, _0001, ...: {names}"
                groups.append(ChannelGroup(case, files, problem))
            else:
                groups += singles
        elif channels is not None and len(files) != channels:
            problem = f"has {len(files)} channel files ({names}); the model needs {channels}"
            groups.append(ChannelGroup(case, files, problem))
        else:
            groups.append(ChannelGroup(case, files))
    return groups
