"""Read and write scans with their geometry (size, spacing, origin, direction) intact.

Images are SimpleITK images: they carry the geometry, whatever the file format. Arrays handed to
the rest of medseg are in voxel order (i, j, k) -- the order of nibabel and MONAI -- and the world
frame of an affine is RAS, as in MONAI. SimpleITK's own frame is LPS; ``ras_affine`` converts.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.atomic import atomic_path, refuse_existing
from medseg.dicom import read_series
from medseg.errors import InputError
from medseg.files import VOLUME_SUFFIXES, is_volume_file, volume_suffix

__all__ = [
    "read_header",
    "channels_in_header",
    "read_volume",
    "read_channels",
    "write_volume",
    "to_array",
    "ras_affine",
    "image_from_ras",
    "grid_mismatch",
    "image_files",
    "check_voxel_values",
]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def read_volume(
    path: str | Path, spatial_dims: int | None = None, series_uid: str | None = None
) -> sitk.Image:
    """Read a NIfTI, NRRD or MHA/MHD file, or a folder holding a DICOM series, with its geometry.

    Args:
        path: the file (or DICOM folder) to read.
        spatial_dims: if given, the image must have this many dimensions and one channel.
        series_uid: which DICOM series, when the folder holds several.

    Returns:
        A SimpleITK image (geometry in ``GetSpacing``/``GetOrigin``/``GetDirection``).

    Raises:
        InputError: the file is missing, empty, of an unknown format, truncated or corrupt, or a
            DICOM series misses slices.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        image = read_series(path, series_uid)
    else:
        image = _read_file(path)
    if image.GetNumberOfPixels() == 0:
        raise InputError(path, "image has no voxels")
    if spatial_dims is not None and (
        image.GetDimension() != spatial_dims or image.GetNumberOfComponentsPerPixel() > 1
    ):
        raise InputError(path, f"is {_describe(image)}; this model needs {spatial_dims}D images")
    return image


def _describe(image: sitk.Image) -> str:
    size = "x".join(map(str, image.GetSize()))
    channels = image.GetNumberOfComponentsPerPixel()
    return f"{image.GetDimension()}D ({size})" + (f" with {channels} channels" if channels > 1 else "")


def read_channels(path: str | Path, spatial_dims: int | None = None, series_uid: str | None = None) -> list:
    """Read an image as a list of single-channel images on one grid.

    A 4D file holds its channels along the last axis (as the Medical Segmentation Decathlon
    ships multi-modal MRI), and a multi-component pixel (an RGB PNG) holds one per component;
    any other image is one channel.

    Args:
        path: the file (or DICOM folder) to read.
        spatial_dims: if given, every channel must have this many dimensions.
        series_uid: which DICOM series, when the folder holds several.
    """
    image = read_volume(path, series_uid=series_uid)
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        channels = [sitk.VectorIndexSelectionCast(image, c) for c in range(components)]
    elif image.GetDimension() == 4:
        size = list(image.GetSize())
        count, size[-1] = size[-1], 0  # a zero extent drops the channel axis
        corner = [0] * len(size)
        channels = [sitk.Extract(image, size, corner[:-1] + [c]) for c in range(count)]
    else:
        channels = [image]
    if spatial_dims is not None and channels[0].GetDimension() != spatial_dims:
        raise InputError(path, f"is {_describe(image)}; this model needs {spatial_dims}D images")
    return channels


def read_header(path: str | Path):
    """The header of an image (size, spacing, direction, metadata) without reading its voxels.

    A DICOM folder is read in full, as its geometry comes from all of its slices.
    """
    if Path(path).is_dir():
        return read_volume(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(path, "cannot read the image header") from None
    return reader


def channels_in_header(header) -> int:
    """Channels per voxel of a header from ``read_header`` (or of an image): 1 unless the pixels
    have several components (RGB). A 4D file's channel axis is not counted here."""
    if isinstance(header, sitk.Image):
        return header.GetNumberOfComponentsPerPixel()
    return header.GetNumberOfComponents()


def _read_file(path: Path) -> sitk.Image:
    if not is_volume_file(path):
        raise InputError(path, f"unknown format; medseg reads {', '.join(VOLUME_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    nifti = volume_suffix(path) in (".nii", ".nii.gz")
    proxy = _nifti_proxy(path) if nifti else None  # the header alone: nibabel reads data lazily
    image = _read_float_nifti(path, proxy) if proxy is not None else None
    if image is not None:
        return image
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"cannot read: {_first_reason(exc)}") from None
    if nifti:
        image = _check_nifti_data(path, image, proxy)
    return image


def _nifti_proxy(path: Path):
    """nibabel's lazy view of a NIfTI (its header parsed, no voxels read), or None if it
    refuses the file: ITK's read then names the fault, or a cut file is reported."""
    try:
        return nib.load(str(path), mmap=False).dataobj
    except Exception:  # noqa: BLE001 - whatever the header's fault, the full read names it
        return None


def _read_float_nifti(path: Path, proxy) -> sitk.Image | None:
    """A float NIfTI's voxels decoded once, by nibabel, which keeps NaN and notices a cut file
    (ITK does neither, so both used to read it: twice the decoding of a CT's 300 MB), on the
    grid ITK reads from the header alone. None where ITK must read it: not a 2D or 3D float32/64
    scalar image, scaled voxels, or a header either library refuses."""
    scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
    if proxy.dtype.newbyteorder("=") not in (np.float32, np.float64) or scaled:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # ITK's full read names the fault
    if reader.GetNumberOfComponents() != 1 or reader.GetDimension() not in (2, 3):
        return None  # vectors and 4D channels: ITK's reading, which read_channels splits
    try:
        data = np.asanyarray(proxy.get_unscaled())
    except (EOFError, OSError, ValueError, zlib.error):
        raise InputError(path, "cannot read: file is truncated (the image data ends early)") from None
    size = tuple(reader.GetSize())
    data = (
        data.reshape(data.shape[: len(size)])
        if data.shape[len(size) :] == (1,) * (data.ndim - len(size))
        else data
    )
    if data.shape != size:
        return None
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.T, dtype=data.dtype.newbyteorder("=")))
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    return image


def _check_nifti_data(path: Path, image: sitk.Image, proxy) -> sitk.Image:
    """ITK fills a truncated NIfTI with zeros without a word, and reads NaN voxels as 0; nibabel
    does neither, so ask it, reading the data a second time only where the header and the file's
    length cannot answer: float voxels (NaN) and a length that disagrees. NaNs are put back, for
    ``check_voxel_values`` to judge."""
    if proxy is None:  # ITK read a header nibabel refuses
        raise InputError(path, "cannot read: file is truncated (the image data ends early)")
    floating = np.issubdtype(proxy.dtype, np.floating)
    if not floating and _data_length_fits(path, proxy):
        return image  # whole, and integer voxels hold no NaN
    try:
        data = np.asanyarray(nib.load(str(path), mmap=False).dataobj.get_unscaled())
    except (EOFError, OSError, ValueError, zlib.error):
        raise InputError(path, "cannot read: file is truncated (the image data ends early)") from None
    if not floating or np.isfinite(data).all():
        return image
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    missing = ~np.isfinite(data).T
    if missing.shape != array.shape:
        return image  # a vector-valued NIfTI: leave it as ITK read it
    array[missing] = np.nan
    restored = sitk.GetImageFromArray(array, isVector=False)
    restored.CopyInformation(image)
    return restored


def _data_length_fits(path: Path, proxy) -> bool:
    """Whether the file is as long as its header promises: the size of a .nii, or the length a
    .nii.gz's gzip trailer records (mod 2**32; a file cut short ends in other bytes). False
    also for a valid file that gzip wrote in several members: the caller then reads it all."""
    expected = proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize
    if volume_suffix(path) == ".nii":
        return path.stat().st_size >= expected
    with open(path, "rb") as handle:
        handle.seek(-4, 2)
        return int.from_bytes(handle.read(4), "little") == expected % 2**32


def check_voxel_values(image: sitk.Image, where=None) -> tuple[sitk.Image, str]:
    """Refuse an image whose every voxel is NaN or infinite; replace some such voxels by the
    lowest finite value, and warn about them, or about an image of one value.

    Returns:
        The image (a cleaned copy if needed) and a warning ('' if none).

    Raises:
        InputError: every voxel is NaN or infinite.
    """
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.floating):
        low, high = array.min(), array.max()
        return image, f"every voxel is {low}: the mask will be empty or meaningless" if low == high else ""
    finite = np.isfinite(array)
    if not finite.any():
        raise InputError(where, "every voxel is NaN or infinite; nothing to segment")
    low, high = float(array[finite].min()), float(array[finite].max())
    if finite.all():
        return image, f"every voxel is {low:g}: the mask will be empty or meaningless" if low == high else ""
    share = 100.0 * (1 - finite.mean())
    cleaned = sitk.GetImageFromArray(
        np.where(finite, array, low).astype(array.dtype), isVector=image.GetNumberOfComponentsPerPixel() > 1
    )
    cleaned.CopyInformation(image)
    return cleaned, f"{share:.1f} % of voxels are NaN or infinite (read as the lowest value, {low:g})"


_TRUNCATION_HINTS = ("truncat", "not read completely", "but received", "fread got only", "ended before")


def _first_reason(exc: Exception) -> str:
    """Boil a multi-line ITK exception down to one readable line."""
    text = str(exc).lower()
    if any(hint in text for hint in _TRUNCATION_HINTS):
        return "file is truncated (the image data ends early)"
    if "unable to determine imageio reader" in text:
        return "not an image in a format its name promises (wrong format or corrupt)"
    return "corrupt or unsupported image file"


def write_volume(array: np.ndarray, path: str | Path, reference: sitk.Image, overwrite: bool = False) -> Path:
    """Write an array on exactly the grid of ``reference``, atomically.

    Args:
        array: voxels in (i, j, k) order, shaped like ``reference``.
        path: target file; its suffix picks the format.
        reference: the image whose size, spacing, origin and direction the output takes.
        overwrite: replace an existing file. Without it an existing file is an error.

    Returns:
        The path written.
    """
    path = Path(path)
    refuse_existing(path, overwrite=overwrite)
    if tuple(array.shape) != tuple(reference.GetSize()):
        raise InputError(path, f"array shape {array.shape} does not match the grid {reference.GetSize()}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose()))
    image.CopyInformation(reference)
    return write_image(image, path, overwrite=True)


def write_image(image: sitk.Image, path: str | Path, overwrite: bool = False) -> Path:
    """Write a SimpleITK image atomically, compressed; its suffix picks the format.

    Raises:
        InputError: the file exists and ``overwrite`` is not set.
    """
    path = Path(path)
    refuse_existing(path, overwrite=overwrite)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


def write_vectors(
    values: np.ndarray, path: str | Path, reference: sitk.Image, overwrite: bool = False
) -> Path:
    """Write a vector per voxel, ``values`` (i, j[, k], components), on exactly the grid of
    ``reference``, atomically; the suffix of ``path`` picks the format.

    A 3D NIfTI is written by nibabel, as (x, y, z, 1, components) with the vector intent,
    straight from ``values`` (ITK would first copy all of it to reorder the components). Other
    formats go through SimpleITK, which copies the array once.
    """
    path = Path(path)
    refuse_existing(path, overwrite=overwrite)
    dims = reference.GetDimension()
    if tuple(values.shape[:-1]) != tuple(reference.GetSize()):
        raise InputError(
            path, f"array shape {values.shape[:-1]} does not match the grid {reference.GetSize()}"
        )
    with atomic_path(path) as tmp:
        if dims == 3 and volume_suffix(path) in (".nii", ".nii.gz"):
            nifti = nib.Nifti1Image(values[:, :, :, None, :], ras_affine(reference))
            nifti.header.set_intent("vector")
            nifti.header.set_xyzt_units("mm")
            nib.save(nifti, str(tmp))
        else:
            order = (*range(dims - 1, -1, -1), dims)
            image = sitk.GetImageFromArray(np.ascontiguousarray(values.transpose(order)), isVector=True)
            image.CopyInformation(reference)
            sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


def to_array(image: sitk.Image) -> np.ndarray:
    """Voxels of a SimpleITK image in (i, j, k) order (components, if any, last)."""
    array = sitk.GetArrayFromImage(image)
    spatial = image.GetDimension()
    order = tuple(reversed(range(spatial))) + tuple(range(spatial, array.ndim))
    return array.transpose(order)


def _world_flip(dims: int) -> np.ndarray:
    # A 3D scan lives in the patient's LPS frame (ITK), which MONAI wants as RAS. A 2D image has no
    # patient frame: its axes stay as they are.
    return _LPS_TO_RAS if dims == 3 else np.eye(dims)


def ras_affine(image: sitk.Image) -> np.ndarray:
    """The voxel-to-world (RAS, mm) affine of an image, as nibabel and MONAI use it: 4x4 for 3D
    images, 3x3 for 2D ones (whose world is their own pixel frame scaled by the spacing)."""
    dims = image.GetDimension()
    flip = _world_flip(dims)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dims, dims)
    affine = np.eye(dims + 1)
    affine[:dims, :dims] = flip @ direction @ np.diag(image.GetSpacing())
    affine[:dims, dims] = flip @ np.asarray(image.GetOrigin(), dtype=float)
    return affine


def image_from_ras(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of an (i, j[, k][, c]) array placed by a RAS affine (inverse of ras_affine)."""
    affine = np.asarray(affine, dtype=float)
    dims = affine.shape[0] - 1
    flip = _world_flip(dims)
    linear = flip @ affine[:dims, :dims]
    spacing = np.linalg.norm(linear, axis=0)
    is_vector = array.ndim == dims + 1
    order = tuple(reversed(range(dims))) + ((dims,) if is_vector else ())
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(order)), isVector=is_vector)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).flatten().tolist())
    image.SetOrigin((flip @ affine[:dims, dims]).tolist())
    return image


def grid_mismatch(image: sitk.Image, other: sitk.Image) -> str:
    """How ``image``'s grid differs from ``other``'s (size, spacing, origin, direction), or ''."""
    if tuple(image.GetSize()) != tuple(other.GetSize()):
        return f"size {image.GetSize()} differs from the size {other.GetSize()}"
    for what, a, b, tol in (
        ("spacing", image.GetSpacing(), other.GetSpacing(), 1e-3),
        ("origin", image.GetOrigin(), other.GetOrigin(), 1e-2),
        ("direction", image.GetDirection(), other.GetDirection(), 1e-3),
    ):
        if not np.allclose(a, b, atol=tol):
            ours, theirs = (tuple(round(v, 3) for v in x) for x in (a, b))
            return f"{what} {ours} differs from the {what} {theirs}"
    return ""


def image_files(image) -> list[str]:
    """The files of a case's image: one path, or an iterable of paths (one per channel)."""
    return [str(image)] if isinstance(image, (str, Path)) else [str(p) for p in image]
