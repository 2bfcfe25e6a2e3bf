"""DICOM series: find them in folders (surviving any odd file), check their slices, read them."""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.atomic import atomic_path, refuse_existing
from medseg.errors import InputError
from medseg.files import is_volume_file

__all__ = [
    "DicomSeries",
    "DicomScan",
    "scan_dicom",
    "find_series",
    "read_series",
    "check_slices",
    "write_dicom_seg",
]

# Objects that share series and studies with images but hold none to segment.
SHA256_PARAMETER = "model_sha256"  # in a SEG's algorithm parameters: which model made it
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"}
_TAGS = [
    "SOPClassUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "SeriesDescription",
]
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class DicomSeries:
    """One series: its folder, SeriesInstanceUID and slice files in slice order.

    ``positions`` (one per file, mm) and ``orientation`` (row and column direction cosines) come
    from the headers when present; ``check_slices`` uses them.
    """

    folder: Path
    uid: str
    files: tuple[str, ...]
    description: str = ""
    positions: tuple[tuple[float, ...], ...] | None = field(default=None, compare=False, repr=False)
    orientation: tuple[float, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """A safe case name: the series description (if any) and the UID's tail, in [A-Za-z0-9._-]."""
        description = self.description.strip()
        raw = f"{description}_{self.uid[-12:]}" if description else self.uid
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "series"

    def __str__(self) -> str:
        return f"{self.folder} [series {self.uid}]"


@dataclass
class DicomScan:
    """What a scan of folders found: the image series, files that are not readable DICOM images
    (path -> why), and readable DICOM objects that hold no image to segment (path -> what)."""

    series: list[DicomSeries] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    not_images: dict[str, str] = field(default_factory=dict)


def scan_dicom(folder: str | Path, recursive: bool = True) -> DicomScan:
    """Find the DICOM series in a folder (and its sub-folders), one header at a time.

    Every file is read on its own, so no file, however broken, can stop the scan: files named
    ``.dcm``/``.ima`` or starting with the DICOM preamble that cannot be read as images are
    listed in ``unreadable``; RT, SR, SEG and other non-image objects in ``not_images``. Files
    of other kinds (volume files, notes, DICOMDIR) are ignored. Hidden files and folders are
    skipped.
    """
    folder = Path(folder)
    scan = DicomScan()
    groups: dict[tuple[Path, str], list[tuple[str, object]]] = {}
    for path in _candidate_files(folder, recursive):
        header, problem = _read_header(path)
        if problem:
            if problem != "ignore":
                scan.unreadable[str(path)] = problem
            continue
        modality = str(header.get("Modality", "") or "").upper()
        if modality in NON_IMAGE_MODALITIES or "Rows" not in header:
            scan.not_images[str(path)] = f"DICOM {modality or 'object'} without an image to segment"
            continue
        groups.setdefault((path.parent, str(header.SeriesInstanceUID)), []).append((str(path), header))
    for (place, uid), members in sorted(groups.items(), key=lambda item: (str(item[0][0]), item[0][1])):
        scan.series.append(_series(place, uid, members))
    return scan


def find_series(folder: str | Path, recursive: bool = True) -> list[DicomSeries]:
    """The DICOM series in a folder (and its sub-folders), each one a case."""
    return scan_dicom(folder, recursive).series


def _candidate_files(folder: Path, recursive: bool):
    for place, dirs, files in os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]:
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(place) / name
            if not name.startswith(".") and not is_volume_file(path) and path.is_file():
                yield path


def _read_header(path: Path):
    """(header, "") for a DICOM file with a series; (None, reason) for a broken one; (None,
    "ignore") for a file that is not DICOM at all (or a DICOMDIR)."""
    import pydicom

    claims_dicom = path.suffix.lower() in (".dcm", ".ima") or _has_preamble(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd element it works around
        logger = logging.getLogger("pydicom")
        level, logger.level = logger.level, logging.CRITICAL
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS, force=claims_dicom)
        except Exception as exc:  # pydicom raises many types for broken files
            return None, f"not a readable DICOM file ({type(exc).__name__})" if claims_dicom else "ignore"
        finally:
            logger.level = level
    if str(header.get("SOPClassUID", "")) == _DICOMDIR_CLASS:
        return None, "ignore"
    if not header.get("SeriesInstanceUID"):
        return (
            None,
            "not a readable DICOM image (no series UID: corrupt or truncated)" if claims_dicom else "ignore",
        )
    return header, ""


def _has_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _floats(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _series(place: Path, uid: str, members: list) -> DicomSeries:
    """A series with its files in slice order: along the slice normal when every file has a
    position and one orientation, else by instance number."""
    files = [path for path, _ in members]
    positions = [_floats(h.get("ImagePositionPatient"), 3) for _, h in members]
    orientation = _floats(members[0][1].get("ImageOrientationPatient"), 6)
    if orientation and all(positions):
        normal = np.cross(orientation[:3], orientation[3:])
        order = np.argsort([np.dot(p, normal) for p in positions], kind="stable")
    else:
        positions = None
        order = np.argsort([_instance(h) for _, h in members], kind="stable")
    return DicomSeries(
        folder=place,
        uid=uid,
        files=tuple(files[i] for i in order),
        description=str(members[0][1].get("SeriesDescription", "") or ""),
        positions=tuple(positions[i] for i in order) if positions else None,
        orientation=orientation,
    )


def _instance(header) -> int:
    try:
        return int(header.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 0


def check_slices(series: DicomSeries) -> None:
    """Refuse a series with missing, duplicate or unevenly spaced slices.

    Positions are projected on the slice normal; a gap of 1.5 times the usual spacing or more
    means missing slices, a spread of more than 10 % means uneven spacing. Reading such a series
    as one volume would put every voxel past the gap in the wrong place.
    """
    if len(series.files) < 2:
        return
    if series.positions is None or series.orientation is None:
        raise InputError(series.folder, f"series {series.uid} lacks slice positions or orientation")
    row_col = np.array(series.orientation).reshape(2, 3)
    depth = np.sort(np.array(series.positions) @ np.cross(row_col[0], row_col[1]))
    steps = np.diff(depth)
    usual = float(np.median(steps))
    if np.any(steps < 1e-3) or usual <= 0:
        raise InputError(series.folder, f"series {series.uid} has two slices at the same position")
    if steps.max() >= 1.5 * usual:
        k = int(steps.argmax())
        missing = round(steps[k] / usual) - 1
        raise InputError(
            series.folder,
            f"series {series.uid} misses {missing} slice(s): a {steps[k]:.2f} mm gap after slice {k + 1} "
            f"of {len(depth)} where the spacing is {usual:.2f} mm",
        )
    if steps.max() - steps.min() > 0.1 * usual:
        raise InputError(
            series.folder,
            f"series {series.uid} has uneven slice spacing ({steps.min():.2f} to {steps.max():.2f} mm)",
        )


def read_series(folder: str | Path | DicomSeries, uid: str | None = None) -> sitk.Image:
    """Read one DICOM series as a volume, after checking its slices.

    Args:
        folder: the folder holding the series' files, or a series ``scan_dicom`` found.
        uid: the SeriesInstanceUID; may be left out when the folder holds one series.
    """
    if isinstance(folder, DicomSeries):
        series = folder
    else:
        folder = Path(folder)
        found = find_series(folder, recursive=False)
        if uid is not None:
            found = [s for s in found if s.uid == uid]
        if not found:
            raise InputError(folder, "holds no DICOM series" + (f" with UID {uid}" if uid else ""))
        if len(found) > 1:
            uids = ", ".join(s.uid for s in found)
            raise InputError(folder, f"holds {len(found)} DICOM series ({uids}); name one")
        series = found[0]
    check_slices(series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    try:
        return reader.Execute()
    except RuntimeError:
        raise InputError(
            series.folder, f"cannot read DICOM series {series.uid} (corrupt pixel data?)"
        ) from None


def write_dicom_seg(
    mask: np.ndarray,
    series: DicomSeries,
    labels: dict[int, str],
    path: str | Path,
    overwrite: bool = False,
    algorithm: str = "medseg",
    model_sha256: str | None = None,
) -> Path:
    """Write a label map as a DICOM-SEG object that references the source series slice by slice.

    Needs the optional ``highdicom`` package (``pip install medseg[dicom]``).

    Args:
        mask: labels in (i, j, k) order on the series' grid (as read by ``read_series``).
        series: the source series; frame k of the SEG refers to its k-th slice.
        labels: class index -> name; every non-zero class becomes a segment.
        path: the ``.dcm`` file to write.
        overwrite: replace an existing file.
        algorithm: the algorithm name recorded in the segments.
        model_sha256: the model's SHA-256, recorded as the algorithm's parameter
            ``model_sha256`` (a PACS can then tell which model made a SEG).
    """
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError:
        raise InputError(path, "DICOM-SEG output needs highdicom: pip install 'medseg[dicom]'") from None
    from medseg._version import __version__

    path = Path(path)
    refuse_existing(path, overwrite=overwrite)
    sources = [pydicom.dcmread(f) for f in series.files]
    if mask.shape[2] != len(sources):
        raise InputError(series.folder, f"mask has {mask.shape[2]} slices but the series {len(sources)}")
    # DICOM frames are (rows, columns) = (j, i): the transpose of each k-slice.
    frames = np.ascontiguousarray(np.transpose(mask, (2, 1, 0))).astype(np.uint8)
    identity = hd.AlgorithmIdentificationSequence(
        name=algorithm,
        version=__version__,
        family=codes.cid7162.ArtificialIntelligence,
        parameters={SHA256_PARAMETER: model_sha256} if model_sha256 else None,
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=int(index),
            segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identity,
        )
        for index, name in sorted(labels.items())
        if int(index) != 0
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name=algorithm,
        software_versions=__version__,
        device_serial_number="none",
        series_description=f"medseg {algorithm}"[:64],
    )
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path
