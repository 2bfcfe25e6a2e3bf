"""DICOM series: find them in folders, check their slices, read them with their geometry."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.io import atomic_path, read_header

__all__ = ["DicomSeries", "find_series", "read_series", "check_slices", "write_dicom_seg"]

_POSITION, _ORIENTATION, _DESCRIPTION = "0020|0032", "0020|0037", "0008|103e"


@dataclass(frozen=True)
class DicomSeries:
    """One series: its folder, SeriesInstanceUID and slice files (sorted by GDCM by position)."""

    folder: Path
    uid: str
    files: tuple[str, ...]

    @property
    def name(self) -> str:
        """A safe case name: the series description (if any) and the UID's tail, in [A-Za-z0-9._-]."""
        description = _header(self.files[0]).get(_DESCRIPTION, "").strip()
        raw = f"{description}_{self.uid[-12:]}" if description else self.uid
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "series"

    def __str__(self) -> str:
        return f"{self.folder} [series {self.uid}]"


def find_series(folder: str | Path, recursive: bool = True) -> list[DicomSeries]:
    """The DICOM series in a folder (and its subfolders), each one a case."""
    folder = Path(folder)
    places = [Path(d) for d, _, files in os.walk(folder) if files] if recursive else [folder]
    found = []
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns on every folder without DICOM
    try:
        for place in sorted(places):
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(place)):
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(place), uid)
                found.append(DicomSeries(place, uid, tuple(files)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    return found


def _header(path: str) -> dict[str, str]:
    reader = read_header(path)
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}


def check_slices(series: DicomSeries) -> None:
    """Refuse a series with missing, duplicate or unevenly spaced slices.

    Positions are projected on the slice normal; a gap of 1.5 times the usual spacing or more
    means missing slices, a spread of more than 10 % means uneven spacing. Reading such a series
    as one volume would put every voxel past the gap in the wrong place.
    """
    if len(series.files) < 2:
        return
    headers = [_header(f) for f in series.files]
    try:
        row_col = np.array([float(v) for v in headers[0][_ORIENTATION].split("\\")]).reshape(2, 3)
        positions = np.array([[float(v) for v in h[_POSITION].split("\\")] for h in headers])
    except (KeyError, ValueError):
        raise InputError(series.folder, f"series {series.uid} lacks slice positions or orientation") from None
    depth = np.sort(positions @ np.cross(row_col[0], row_col[1]))
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


def read_series(folder: str | Path, uid: str | None = None) -> sitk.Image:
    """Read one DICOM series from a folder as a volume, after checking its slices.

    Args:
        folder: the folder holding the series' files.
        uid: the SeriesInstanceUID; may be left out when the folder holds one series.
    """
    folder = Path(folder)
    series = find_series(folder, recursive=False)
    if uid is not None:
        series = [s for s in series if s.uid == uid]
    if not series:
        raise InputError(folder, "holds no DICOM series" + (f" with UID {uid}" if uid else ""))
    if len(series) > 1:
        uids = ", ".join(s.uid for s in series)
        raise InputError(folder, f"holds {len(series)} DICOM series ({uids}); name one")
    check_slices(series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series[0].files))
    try:
        return reader.Execute()
    except RuntimeError:
        raise InputError(folder, f"cannot read DICOM series {series[0].uid} (corrupt pixel data?)") from None


def write_dicom_seg(
    mask: np.ndarray,
    series: DicomSeries,
    labels: dict[int, str],
    path: str | Path,
    overwrite: bool = False,
    algorithm: str = "medseg",
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
    """
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError:
        raise InputError(path, "DICOM-SEG output needs highdicom: pip install 'medseg[dicom]'") from None
    from medseg import __version__

    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(path, "already exists (pass overwrite to replace it)")
    sources = [pydicom.dcmread(f) for f in series.files]
    if mask.shape[2] != len(sources):
        raise InputError(series.folder, f"mask has {mask.shape[2]} slices but the series {len(sources)}")
    # DICOM frames are (rows, columns) = (j, i): the transpose of each k-slice.
    frames = np.ascontiguousarray(np.transpose(mask, (2, 1, 0))).astype(np.uint8)
    identity = hd.AlgorithmIdentificationSequence(
        name=algorithm, version=__version__, family=codes.cid7162.ArtificialIntelligence
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
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return path
