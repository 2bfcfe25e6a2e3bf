"""Pictures of masks: axial, coronal and sagittal slices with the contours of a prediction and,
when there is one, of its reference. The QC report, training's validation pictures and
``predict --preview`` all draw with ``case_figure``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from medseg.atomic import atomic_path  # noqa: E402

__all__ = [
    "PREDICTION_COLOUR",
    "REFERENCE_COLOUR",
    "case_figure",
    "display_planes",
    "save_figure",
    "slice_centre",
]

# Amber against cyan (and solid against dashed): a pair that colour-blind readers tell apart.
PREDICTION_COLOUR, REFERENCE_COLOUR = "#ffb000", "#00d5ff"
_CLASS_COLOURS = plt.cm.tab10.colors


def case_figure(
    pred: sitk.Image | None,
    png: str | Path,
    image: sitk.Image | None = None,
    ref: sitk.Image | None = None,
    names: dict[int, str] | None = None,
    title: str = "",
) -> Path:
    """Draw slices through the masks' centre, in the patient's planes, as a PNG.

    A 3D case gets three panels (axial, coronal, sagittal, shown as radiologists read them:
    patient's right on the left, anterior and superior up), a 2D image one. The prediction's
    contours are amber and solid; the reference's, when given, cyan and dashed. Without a
    reference, each class has its own colour.

    Args:
        pred: the predicted label map (None when it is missing: the reference alone is drawn).
        png: where to write the picture (atomically).
        image: the scan the masks lie on (its first channel is drawn); None draws them on black.
        ref: the reference label map, on the same grid.
        names: class index -> name, for the legend.
        title: drawn above the panels.
    """
    masks = [m for m in (pred, ref) if m is not None]
    if not masks:
        raise ValueError("nothing to draw: no prediction and no reference")
    grid = masks[0]
    if image is not None and image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, 0)
    if image is not None and (image.GetSize() != grid.GetSize()):
        image = None  # not on the masks' grid: the contours alone still say something
    volumes = [_oriented(x) for x in (image, pred, ref)]
    spacing = _oriented(grid).GetSpacing()[::-1]  # array (k, j, i) order
    arrays = [None if v is None else sitk.GetArrayViewFromImage(v) for v in volumes]
    picture, predicted, reference = arrays
    shape = next(a for a in arrays if a is not None).shape
    if picture is None:
        picture = np.zeros(shape, np.float32)
        low, high = 0.0, 1.0
    else:
        low, high = np.percentile(picture[tuple(slice(None, None, max(1, n // 64)) for n in shape)], [1, 99])
    centre = slice_centre([a for a in (predicted, reference) if a is not None])
    panels = _panels(shape, centre, spacing)
    shown = [(a, cut) for a in (predicted, reference) if a is not None for _, cut, _ in panels]
    classes = sorted({int(v) for a, cut in shown for v in np.unique(a[cut]) if v != 0})  # the drawn ones
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), squeeze=False)
    for ax, (plane, cut, aspect) in zip(axes[0], panels):
        ax.imshow(picture[cut], cmap="gray", vmin=low, vmax=high, aspect=aspect)
        limits = ax.get_xlim(), ax.get_ylim()
        for array, colour, style in ((reference, REFERENCE_COLOUR, "--"), (predicted, None, "-")):
            if array is None:
                continue
            for index in classes:
                region = np.asarray(array[cut]) == index
                if region.any() and not region.all():
                    default = (
                        _CLASS_COLOURS[index % len(_CLASS_COLOURS)] if ref is None else PREDICTION_COLOUR
                    )
                    ax.contour(
                        region, levels=[0.5], colors=[colour or default], linewidths=1.2, linestyles=style
                    )
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
        ax.set_title(plane, fontsize=9)
        ax.axis("off")
    fig.legend(
        handles=_legend(pred, ref, classes, names or {}),
        loc="lower center",
        ncol=6,
        fontsize=8,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, png)


def _oriented(image: sitk.Image | None) -> sitk.Image | None:
    """A 3D image resampled-free onto LPS axes (i to the left, j posterior, k superior)."""
    if image is None or image.GetDimension() != 3:
        return image
    return sitk.DICOMOrient(image, "LPS")


def slice_centre(masks: list[np.ndarray]) -> tuple[int, ...]:
    """The centre of the masks' foreground (the middle of the volume if there is none), per
    array axis, from projections (no coordinate list of every voxel)."""
    shape = masks[0].shape
    centre = []
    for axis in range(len(shape)):
        others = tuple(a for a in range(len(shape)) if a != axis)
        counts = sum(np.count_nonzero(np.asarray(m), axis=others) for m in masks)
        total = counts.sum()
        centre.append(
            int(round(float(np.dot(np.arange(shape[axis]), counts) / total))) if total else shape[axis] // 2
        )
    return tuple(centre)


def display_planes(image: sitk.Image, centre: tuple[int, ...] | None = None) -> list[tuple[str, np.ndarray]]:
    """The slices ``case_figure`` draws of an image, each as shown on screen (row 0 at the top):
    (plane, 2D array). ``centre`` is in the LPS-oriented (k, j, i) array; default the middle."""
    oriented = _oriented(image)
    array = sitk.GetArrayViewFromImage(oriented)
    centre = centre or tuple(n // 2 for n in array.shape)
    spacing = oriented.GetSpacing()[::-1]
    return [(plane, np.asarray(array[cut])) for plane, cut, _ in _panels(array.shape, centre, spacing)]


def _panels(shape, centre, spacing) -> list[tuple[str, tuple, float]]:
    """(plane, index into the LPS-oriented (k, j, i) array, aspect) of each panel.

    In that array the axial slice's rows run anterior to posterior and its columns from the
    patient's right to left, which is how it is read; the coronal and sagittal slices run
    inferior to superior, so they are cut upside down.
    """
    if len(shape) == 2:
        return [("image", (slice(None), slice(None)), spacing[0] / spacing[1])]
    k, j, i = centre
    s_k, s_j, s_i = spacing
    return [
        (f"axial (slice {k})", (k, slice(None), slice(None)), s_j / s_i),
        (f"coronal (slice {j})", (slice(None, None, -1), j, slice(None)), s_k / s_i),
        (f"sagittal (slice {i})", (slice(None, None, -1), slice(None), i), s_k / s_j),
    ]


def _legend(pred, ref, classes, names) -> list[Line2D]:
    if ref is not None:
        handles = [Line2D([], [], color=REFERENCE_COLOUR, linestyle="--", label="reference")]
        if pred is not None:
            handles.insert(0, Line2D([], [], color=PREDICTION_COLOUR, label="prediction"))
        return handles
    return [
        Line2D([], [], color=_CLASS_COLOURS[c % len(_CLASS_COLOURS)], label=names.get(c, f"class {c}"))
        for c in classes
    ]


def save_figure(fig, png: str | Path, dpi: int = 80) -> Path:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(png)
