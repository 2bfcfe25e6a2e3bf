"""The cases of a batch: what to read, where each mask goes, and which shard takes which case.

Inputs are a file, a folder (searched recursively; sub-folders are mirrored in the output, so
names cannot collide), a ``.csv``/``.txt`` list of files, or DICOM series. Mask names come only
from the file system (file and folder names under the input) or from sanitised DICOM
descriptions, so neither paths in a list nor DICOM metadata can send a mask elsewhere.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medseg.dicom import DicomSeries, scan_dicom
from medseg.errors import ConfigError, InputError
from medseg.files import (
    VOLUME_SUFFIXES,
    case_id,
    channel_groups,
    is_volume_file,
    safe_name,
    split_channel_suffix,
)

__all__ = [
    "FORMATS",
    "ChannelFiles",
    "BatchCase",
    "discover",
    "mask_name",
    "extra_name",
    "refuse_collisions",
    "parse_shard",
    "take_shard",
    "check_output_folder",
]

FORMATS = {"same": "", "nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".dcm"}
LIST_SUFFIXES = (".csv", ".txt")
_FLOAT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")  # formats that hold floats


@dataclass(frozen=True)
class ChannelFiles:
    """The files of one multi-channel case (nnU-Net's ``CASE_0000``, ``CASE_0001``, ...)."""

    id: str
    files: tuple[Path, ...]

    def __iter__(self):
        return iter(self.files)

    def __str__(self) -> str:
        return str(self.files[0].parent / f"{self.id}_*")


Source = Path | ChannelFiles | DicomSeries


@dataclass(frozen=True)
class BatchCase:
    """One case of a batch.

    Args:
        source: what the predictor reads.
        mask: where the mask goes, relative to the output folder (POSIX form); empty for an
            input that cannot make one.
        status: ``failed`` or ``skipped`` when the outcome is known before any inference, with
            ``reason``; empty otherwise.
    """

    source: Source | str
    mask: str = ""
    status: str = ""
    reason: str = ""

    @property
    def inputs(self) -> list[str]:
        """The input files (or ``folder [series UID]``) the report names."""
        if isinstance(self.source, ChannelFiles):
            return [str(p) for p in self.source.files]
        return [str(self.source)]

    @property
    def sort_key(self) -> str:
        return self.mask or self.inputs[0]


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError("format", f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")


def mask_name(source: Source, fmt: str = "same") -> str:
    """The mask's file name: the input's name, less nnU-Net's ``_0000`` channel suffix for a
    single-channel file, with the format's suffix (``same``: the input's; NIfTI for DICOM)."""
    _check_format(fmt)
    if isinstance(source, DicomSeries):
        return f"{source.name}{FORMATS[fmt] or '.nii.gz'}"
    if isinstance(source, ChannelFiles):
        first = source.files[0].name
        return f"{source.id}{FORMATS[fmt] or first[len(case_id(first)) :]}"
    name = Path(source).name
    stem = case_id(name)
    suffix = FORMATS[fmt] or name[len(stem) :]
    case, channel = split_channel_suffix(name)
    return f"{case if channel == 0 else stem}{suffix}"


def extra_name(mask: str, kind: str) -> str:
    """Where a case's ``kind`` map (``EXTRAS``) goes: beside its mask, as ``<case>_<kind>`` in
    the mask's format, or NIfTI where that format holds no floats (DICOM-SEG, PNG, TIFF)."""
    path = PurePosixPath(mask)
    name = path.name
    suffix = next((s for s in (*VOLUME_SUFFIXES, ".dcm") if name.lower().endswith(s)), path.suffix)
    stem = name[: len(name) - len(suffix)]
    return str(path.with_name(f"{stem}_{kind}{suffix if suffix in _FLOAT_SUFFIXES else '.nii.gz'}"))


def _folder_cases(files: list[Path], folder: str, fmt: str, channels: int | None) -> list[BatchCase]:
    """The cases among one folder's files, by ``medseg.files.channel_groups``: nnU-Net's
    ``CASE_0000``, ``CASE_0001``, ... are one case; a set that does not fit the model fails."""
    cases = []
    for group in channel_groups(files, channels):
        source = ChannelFiles(group.id, group.files) if len(group.files) > 1 else group.files[0]
        if group.problem:
            cases.append(BatchCase(source, "", "failed", f"{group.id}: {group.problem}"))
        else:
            cases.append(_case(source, folder, fmt, stem=group.id))
    return cases


def discover(source: str | Path, fmt: str = "same", channels: int | None = None) -> list[BatchCase]:
    """Every case under ``source``, sorted by mask path.

    Args:
        source: an image file, a folder (searched recursively for image files and DICOM series),
            or a ``.csv`` (an ``image`` column, optionally ``id``) or ``.txt`` (one path per line)
            list of files and DICOM folders, relative to the list.
        fmt: the mask format (see ``FORMATS``).
        channels: the model's image channels: which ``_NNNN`` files form one case
            (``medseg.files.channel_groups``); None: any contiguous set from ``_0000``.

    Returns:
        Cases to predict, plus cases already decided: unreadable DICOM files (``failed``),
        DICOM objects without an image (``skipped``) and, for ``dicom-seg``, non-DICOM inputs.

    Raises:
        InputError: the source is missing or holds nothing to segment, or two inputs would
            write the same mask.
    """
    _check_format(fmt)
    source = Path(source)
    if not source.exists():
        raise InputError(source, "no such file or folder")
    if source.is_dir():
        cases = _from_folder(source, fmt, channels)
    elif source.name.lower().endswith(LIST_SUFFIXES):
        cases = _from_list(source, fmt)
    else:
        cases = [_case(source, "", fmt)]
    if not any(c.mask for c in cases) and not any(c.status == "failed" for c in cases):
        raise InputError(source, f"holds no image files ({', '.join(VOLUME_SUFFIXES)}) and no DICOM series")
    refuse_collisions(cases)
    return sorted(cases, key=lambda c: c.sort_key)


def _case(source: Source, folder: str, fmt: str, stem: str | None = None) -> BatchCase:
    """A case whose mask goes to ``folder/<mask name>``, or ``folder/<stem><suffix>``."""
    name = mask_name(source, fmt)
    if stem:
        name = stem + name[len(case_id(name)) :]
    mask = str(PurePosixPath(folder, name))
    if fmt == "dicom-seg" and not isinstance(source, DicomSeries):
        return BatchCase(source, mask, "failed", "DICOM-SEG output needs a DICOM series as input")
    return BatchCase(source, mask)


def _from_folder(root: Path, fmt: str, channels: int | None) -> list[BatchCase]:
    cases = []
    for place, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        volumes = sorted(Path(place) / f for f in files if is_volume_file(f) and not f.startswith("."))
        rel = Path(place).relative_to(root).as_posix()
        cases += _folder_cases(volumes, rel, fmt, channels)
    cases += _dicom_cases(root, root, fmt, recursive=True)
    return cases


def _dicom_cases(folder: Path, root: Path, fmt: str, recursive: bool) -> list[BatchCase]:
    scan = scan_dicom(folder, recursive=recursive)
    cases = [_case(s, s.folder.relative_to(root).as_posix() if recursive else "", fmt) for s in scan.series]
    cases += [BatchCase(path, "", "failed", why) for path, why in scan.unreadable.items()]
    cases += [BatchCase(path, "", "skipped", why) for path, why in scan.not_images.items()]
    return cases


def _from_list(path: Path, fmt: str) -> list[BatchCase]:
    """A CSV with an ``image`` column (and optionally ``id``, the mask's name) or a text file
    with one path per line (blank lines and ``#`` comments skipped). A missing file is a
    failed case, not the end of the run."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
        if rows and "image" not in rows[0]:
            raise InputError(path, "needs a header with an 'image' column (and 'id', optionally)")
        entries = [(row["image"], row.get("id") or None) for row in rows if row.get("image")]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        entries = [(line.strip(), None) for line in lines if line.strip() and not line.startswith("#")]
    if not entries:
        raise InputError(path, "lists no files")
    cases = []
    for entry, case in entries:
        item = (path.parent / entry).resolve()
        stem = safe_name(case) if case else None
        if not item.exists():
            cases.append(BatchCase(item, "", "failed", f"listed in {path.name} but missing"))
        elif item.is_dir():
            series = _dicom_cases(item, item, fmt, recursive=False)
            if stem and len([c for c in series if c.mask]) == 1:
                series = [_case(c.source, "", fmt, stem) if c.mask else c for c in series]
            cases += series or [BatchCase(item, "", "failed", "holds no DICOM series")]
        else:
            cases.append(_case(item, "", fmt, stem))
    return cases


def refuse_collisions(cases: list[BatchCase], extras: tuple[str, ...] = ()) -> None:
    """Refuse two cases that would write one file: the same mask, or a mask that is another
    case's ``extras`` map (a case named ``a_uncertainty`` beside a case ``a``).

    Raises:
        InputError: naming both inputs and the file.
    """
    seen: dict[str, BatchCase] = {}
    for case in cases:
        if not case.mask:
            continue
        for name in [case.mask] + [extra_name(case.mask, kind) for kind in extras]:
            if name in seen:
                first = seen[name]
                raise InputError(
                    case.inputs[0],
                    f"would write the same file {name} as {first.inputs[0]}; rename one of them",
                )
            seen[name] = case


def _input_files(case: BatchCase) -> list[str]:
    if isinstance(case.source, DicomSeries):
        return list(case.source.files)
    return case.inputs


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``, with 0 <= i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise ConfigError("--shard", f"{text!r} is not i/n with 0 <= i < n (e.g. 0/4)")
    return int(match.group(1)), int(match.group(2))


def take_shard(cases: list[BatchCase], index: int, count: int) -> list[BatchCase]:
    """Every ``count``-th case from ``index`` on, of the cases sorted by mask path: the shards of
    one list are disjoint, cover it, and do not depend on the machine or the order of listing."""
    return sorted(cases, key=lambda c: c.sort_key)[index::count]


def check_output_folder(source: str | Path, output: str | Path, cases: list[BatchCase], extras=()) -> Path:
    """Refuse an output folder that would mix masks with their inputs, or that cannot be written.

    Raises:
        InputError: the output is the input folder or inside it, a mask would replace an input
            file, the output is a file, or the folder cannot be created or written.
    """
    source, output = Path(source).resolve(), Path(output)
    where = output.resolve()
    folders = {source} if source.is_dir() else set()
    folders |= {c.source.folder.resolve() for c in cases if isinstance(c.source, DicomSeries)}
    for folder in sorted(folders):
        if where == folder or folder in where.parents:
            raise InputError(output, f"is the input folder {folder} or inside it; choose a folder outside it")
    inputs = {Path(f).resolve() for case in cases for f in _input_files(case)}
    for case in cases:
        names = [case.mask, *(extra_name(case.mask, kind) for kind in extras)] if case.mask else []
        for name in names:
            if (where / name) in inputs:
                raise InputError(where / name, "is an input file; the output would replace it")
    if output.exists() and not output.is_dir():
        raise InputError(output, "is a file, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".medseg-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(output, f"cannot write here ({exc.strerror or exc})") from None
    return output
