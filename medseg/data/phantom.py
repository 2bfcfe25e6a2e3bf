"""Synthetic cardiac MRI phantoms: sample data for the demo, the tests and the benchmarks.

The anatomy is defined analytically in world coordinates (mm, LPS as in SimpleITK), then sampled
on a grid of any spacing and orientation. Labels are therefore consistent across RAS, LPS and
oblique grids: 0 background, 1 LV blood pool, 2 LV myocardium, 3 RV blood pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

__all__ = ["LABELS", "ORIENTATIONS", "GRIDS", "make_phantom", "make_dataset"]

LABELS = {0: "background", 1: "LV", 2: "myocardium", 3: "RV"}
ORIENTATIONS = ("ras", "lps", "oblique")  # what make_dataset cycles through
GRIDS = (*ORIENTATIONS, "flipped")  # "flipped": RAS with the slice axis running inferior


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' rotation matrix about a unit axis."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _grid_direction(orientation: str, rng: np.random.Generator) -> np.ndarray:
    if orientation == "lps":
        return np.eye(3)
    if orientation == "ras":
        return np.diag([-1.0, -1.0, 1.0])
    if orientation == "flipped":
        return np.diag([-1.0, -1.0, -1.0])
    if orientation == "oblique":
        tilt = _rotation(rng.normal(size=3), np.deg2rad(rng.uniform(15, 35)))
        return tilt @ np.diag([-1.0, -1.0, 1.0])
    raise ValueError(f"orientation must be one of {GRIDS}, not {orientation!r}")


def _inside_ellipsoid(local: np.ndarray, semi_axes) -> np.ndarray:
    return ((local / np.asarray(semi_axes)) ** 2).sum(axis=-1) <= 1.0


def _anatomy(points: np.ndarray, rng: np.random.Generator, variety: float) -> tuple[np.ndarray, np.ndarray]:
    """Intensity (0..1, before bias/noise) and label at world points (N, 3), LPS mm."""
    x, y, z = points.T
    jitter = lambda s: rng.uniform(1 - s * variety, 1 + s * variety)  # noqa: E731 - tiny local helper
    intensity = np.zeros(len(points))
    label = np.zeros(len(points), dtype=np.uint8)

    torso = (x / 150) ** 2 + (y / 105) ** 2 <= 1
    fat = torso & ((x / 138) ** 2 + (y / 94) ** 2 > 1)
    intensity[torso] = 0.42 * jitter(0.1)
    intensity[fat] = 0.8 * jitter(0.1)
    for side in (-1, 1):
        lung = _inside_ellipsoid(points - [side * 78, 12, 0], (48, 62, 95)) & torso
        intensity[lung] = 0.07
    aorta = ((x - 18) ** 2 + (y - 58) ** 2 <= 11**2) & torso
    intensity[aorta] = 0.9 * jitter(0.05)

    # Heart frame: u runs from base to apex (anterior, inferior, to the patient's left).
    centre = np.array([28, -18, 0]) + rng.normal(0, 6, size=3)
    u = np.array([0.55, -0.55, -0.6]) + rng.normal(0, 0.12 * variety, size=3)
    u /= np.linalg.norm(u)
    v = np.cross(u, [0, 0, 1.0])
    v /= np.linalg.norm(v)
    w = np.cross(u, v)
    spin = rng.uniform(-0.3, 0.3)
    v, w = np.cos(spin) * v + np.sin(spin) * w, -np.sin(spin) * v + np.cos(spin) * w
    local = (points - centre) @ np.stack([u, v, w], axis=1)

    long_axis, radius, wall = 36 * jitter(0.12), 20 * jitter(0.12), 9 * jitter(0.1)
    below_base = local[:, 0] > -0.6 * long_axis
    lv = _inside_ellipsoid(local, (long_axis, radius, radius)) & below_base
    lv_outer = _inside_ellipsoid(local, (long_axis + wall, radius + wall, radius + wall))
    myo = lv_outer & below_base & ~lv
    # The RV sits beside the LV on the patient's right and front and wraps the septum.
    toward_rv = np.array([-1.0, -0.6, 0.2]) - u * np.dot(u, [-1.0, -0.6, 0.2])
    toward_rv /= np.linalg.norm(toward_rv)
    rv_centre = centre + toward_rv * (radius + wall) * 0.9 + u * 4
    rv_frame = np.stack([u, toward_rv, np.cross(u, toward_rv)], axis=1)
    rv_local = (points - rv_centre) @ rv_frame
    rv_axes = np.array([0.85 * long_axis, 0.75 * radius + 4, 1.35 * radius + 6]) * jitter(0.1)
    rv_shell = _inside_ellipsoid(rv_local, rv_axes + 3) & below_base & ~lv_outer
    rv = _inside_ellipsoid(rv_local, rv_axes) & below_base & ~lv_outer
    rv &= ~_inside_ellipsoid(local, (long_axis + wall + 2, radius + wall + 2, radius + wall + 2))

    heart = (lv_outer & below_base) | rv_shell
    intensity[heart] = 0.3 * jitter(0.1)  # myocardium and RV free wall
    intensity[lv] = 1.0 * jitter(0.05)
    intensity[rv] = 0.95 * jitter(0.05)
    label[lv], label[myo], label[rv] = 1, 2, 3
    return intensity, label


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = (96, 96, 28),
    spacing: tuple[float, float, float] | None = None,
    orientation: str = "ras",
    variety: float = 1.0,
) -> tuple[sitk.Image, sitk.Image]:
    """Make one synthetic cardiac MRI volume and its label map.

    Args:
        seed: makes the case: pose, shape, contrast, bias field and noise all follow from it.
        shape: voxels per axis (i, j, k).
        spacing: mm per voxel; by default about 1.8 mm in-plane and 4.5 mm between slices
            (varying with the seed), anisotropic like a cardiac MRI stack.
        orientation: ``"ras"``, ``"lps"``, ``"flipped"`` (RAS with the slice axis reversed) or
            ``"oblique"`` (a random tilt of 15-35 degrees).
        variety: scales how much cases differ: tissue contrasts, heart size and axis, bias field
            and noise. 1 gives the demo's phantoms; 3 gives cases that two labelled ones no
            longer cover (the pretraining study's hard set). The random draws are the same.

    Returns:
        ``(image, label)`` as SimpleITK images on the same grid; the image is int16.

    Example:
        >>> image, label = make_phantom(0, shape=(48, 48, 14), spacing=(3.6, 3.6, 9.0))
    """
    rng = np.random.default_rng(seed)
    if spacing is None:
        spacing = (rng.uniform(1.7, 1.95),) * 2 + (rng.uniform(4.0, 5.0),)
    spacing_arr = np.asarray(spacing, dtype=float)
    shape_arr = np.asarray(shape)
    direction = _grid_direction(orientation, rng)
    centre = np.array([20.0, -15.0, 0.0]) + rng.normal(0, 5, size=3)
    origin = centre - direction @ (spacing_arr * (shape_arr - 1) / 2)

    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    points = origin + (index.reshape(-1, 3) * spacing_arr) @ direction.T
    intensity, label = _anatomy(points, rng, variety)
    intensity = intensity.reshape(shape)
    label = label.reshape(shape)

    # Partial volume: a blur of about half a voxel in-plane, less across slices.
    intensity = gaussian_filter(intensity, sigma=(0.6, 0.6, 0.3))
    # Smooth multiplicative bias field of up to about +-30 % (at variety 1).
    gradient = rng.normal(0, 0.0025 * variety, size=3)
    bias = np.exp((points - centre) @ gradient).reshape(shape)
    intensity = intensity * bias
    # Rician noise, as in magnitude MRI.
    sigma = rng.uniform(0.03, 0.06) * variety
    intensity = np.hypot(intensity + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
    intensity = np.clip(intensity * rng.uniform(400, 2500), 0, 32000).astype(np.int16)

    image = _to_image(intensity, spacing_arr, origin, direction)
    return image, _to_image(label, spacing_arr, origin, direction)


def _to_image(array, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose()))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.flatten().tolist())
    return image


def make_dataset(
    folder: str | Path, n_train: int = 8, n_test: int = 2, shape=(96, 96, 28), spacing=None, seed: int = 0
) -> Path:
    """Write an MSD-style dataset of phantoms: ``imagesTr``, ``labelsTr``, ``imagesTs``, ``labelsTs``
    and ``dataset.json``. Orientations cycle through RAS, LPS and oblique. Deterministic in ``seed``.

    Args:
        folder: where to write (created if missing).
        n_train: labelled training cases.
        n_test: test cases (their labels go to ``labelsTs`` for evaluation).
        shape: voxels per axis of every case.
        spacing: mm per voxel, or None for the phantom's varied anisotropic default.
        seed: the first case's seed; case k uses ``seed + k``.

    Returns:
        The dataset folder.
    """
    folder = Path(folder)
    entries = {"training": [], "test": []}
    for k in range(n_train + n_test):
        split, tag = ("training", "Tr") if k < n_train else ("test", "Ts")
        name = f"heart_{k:03d}.nii.gz"
        image, label = make_phantom(seed + k, shape, spacing, ORIENTATIONS[k % len(ORIENTATIONS)])
        for kind, volume in (("images", image), ("labels", label)):
            (folder / f"{kind}{tag}").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(volume, str(folder / f"{kind}{tag}" / name), useCompression=True)
        entries[split].append({"image": f"./images{tag}/{name}", "label": f"./labels{tag}/{name}"})
    meta = {
        "name": "medseg synthetic heart",
        "description": "Synthetic cardiac MRI phantoms made by medseg.data.phantom",
        "modality": {"0": "MRI"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": n_train,
        "numTest": n_test,
        **entries,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder
