"""Onto the network's grid for prediction: reorient to RAS, resample to the plan's spacing,
normalise, in plain torch and nibabel.

It gives what training's MONAI pipeline (``medseg.data.transforms``: ``Orientationd``,
``Spacingd``, ``NormalizeIntensityd``) gives the same image, on the same grid, values within
float32 rounding (the tests hold the two equal), without importing MONAI: MONAI imports every
submodule it has (2.3 s of a process's start here), which was a fifth of predicting 32 volumes.

The grid is MONAI's: after reorientation each axis is resampled from the first voxel's centre,
which stays where it was, at the plan's spacing, over as many voxels as span the input's
extent (rounded); the direction is kept, so an oblique scan stays oblique. Resampling is linear
and separable (trilinear is linear along each axis in turn), and voxels past the last input
voxel take its value (MONAI's border padding).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from medseg.data.plan import Plan
from medseg.io import ras_affine

__all__ = ["network_input"]


def network_input(channels: list[sitk.Image], plan: Plan) -> tuple[torch.Tensor, np.ndarray]:
    """The network's input for ``channels`` (images on one grid): a float32 tensor (C, *spatial)
    on the network grid, and that grid's RAS affine."""
    affine = ras_affine(channels[0])
    array = np.empty((len(channels), *channels[0].GetSize()), np.float32)
    for channel, image in zip(array, channels):
        channel[...] = sitk.GetArrayViewFromImage(image).transpose()
    values = torch.from_numpy(array)
    if plan.spatial_dims == 3:  # 2D images have no patient frame to orient to
        values, affine = _to_ras(values, affine)
    values, affine = _resample(values, affine, plan.spacing)
    return _normalize(values.contiguous(), plan), affine


def _to_ras(values: torch.Tensor, affine: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Permute and mirror the voxel axes so that they point nearest to R, A and S: no
    interpolation, the affine changed to match."""
    ornt = nib.orientations.io_orientation(affine)
    to_ras = nib.orientations.inv_ornt_aff(ornt, values.shape[1:])
    flipped = [axis + 1 for axis, sign in enumerate(ornt[:, 1]) if sign < 0]
    if flipped:
        values = values.flip(flipped)
    order = np.argsort(ornt[:, 0])  # which input axis lands at each output position
    return values.permute(0, *(int(a) + 1 for a in order)), affine @ to_ras


def _resample(values: torch.Tensor, affine: np.ndarray, spacing) -> tuple[torch.Tensor, np.ndarray]:
    """Linear resampling to ``spacing`` (mm per voxel axis), the first voxel's centre fixed."""
    dims = len(affine) - 1
    shape = np.array(values.shape[1:])
    out_affine = _respaced(affine, np.asarray(spacing, dtype=float))
    for axis, out_size in enumerate(_out_shape(shape, affine, out_affine)):
        step = np.linalg.norm(out_affine[:dims, axis]) / np.linalg.norm(affine[:dims, axis])
        size = values.shape[axis + 1]
        if out_size == size and np.isclose(step, 1.0, rtol=1e-6, atol=0):
            continue
        where = (torch.arange(out_size, dtype=torch.float64) * step).clamp_(0, size - 1)
        low = where.floor().long()
        below = values.index_select(axis + 1, low)
        if torch.equal(where, low.double()):  # whole voxels (a spacing halved or doubled): no blend
            values = below
            continue
        high = (low + 1).clamp_(max=size - 1)
        weight = (where - low).float().reshape([-1 if d == axis + 1 else 1 for d in range(values.ndim)])
        values = below.add_(values.index_select(axis + 1, high).sub_(below).mul_(weight))
    return values, out_affine


def _respaced(affine: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``affine`` with its voxel axes scaled to ``spacing``: direction and origin kept. Computed
    as MONAI's ``zoom_affine`` does (rotation from a Cholesky factor), so that a voxel count
    that falls on a rounding tie rounds as training's pipeline rounded it."""
    dims = len(affine) - 1
    zoom = affine[:dims, :dims]
    factor = np.linalg.cholesky(zoom.T @ zoom).T
    out = affine.copy()
    out[:dims, :dims] = zoom @ np.linalg.inv(factor) @ np.diag(np.sign(np.diag(factor)) * spacing)
    return out


def _out_shape(shape: np.ndarray, affine: np.ndarray, out_affine: np.ndarray) -> list[int]:
    """Voxels per axis of the output grid: the span of the input's corner voxels' centres in
    output voxels, plus one, rounded."""
    corners = np.array(np.meshgrid(*[(0.0, n - 1.0) for n in shape], indexing="ij")).reshape(len(shape), -1)
    corners = np.concatenate([corners, np.ones_like(corners[:1])])
    unplaced = out_affine.copy()
    unplaced[:-1, -1] = 0  # MONAI spans the corners against the new axes before placing them
    spanned = np.linalg.solve(unplaced, affine) @ corners
    return [max(1, int(n)) for n in np.round(np.ptp(spanned[:-1], axis=1) + 1.0)]


def _normalize(values: torch.Tensor, plan: Plan) -> torch.Tensor:
    """CT: clip to the plan's range, z-score with its statistics. Otherwise each channel is
    z-scored over its non-zero voxels, which alone change (zero stays zero: the background
    outside a skull-stripped or masked scan)."""
    if plan.normalization == "ct":
        low, high = plan.clip
        return values.clamp_(low, high).sub_(plan.mean).div_(plan.std or 1.0)
    for channel in values:
        inside = channel != 0
        if not inside.any():
            continue
        voxels = channel[inside]
        std = torch.std(voxels, unbiased=False).item()
        channel[inside] = (voxels - voxels.mean()) / (std or 1.0)
    return values
