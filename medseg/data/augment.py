"""Training augmentation after nnU-Net's: rotation and scaling, optional elastic deformation,
mirroring, and brightness, contrast, gamma, blur, noise and low-resolution simulation.

Built from MONAI's transforms. Spatial steps move image and label together (the label nearest-
neighbour, so its values stay class indices). On thick slices and for 2D networks on slices,
nothing moves voxels across slices: a slice 10 mm from its neighbour cannot be rotated into them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai import transforms as mt
from monai.transforms import MapTransform, RandomizableTransform

from medseg.config import AugmentConfig
from medseg.data.plan import Plan
from medseg.errors import ConfigError

__all__ = ["crop_size", "crop_margin", "spatial_steps", "intensity_steps", "RandLowResolutiond"]

# How much larger than the patch the region cut before rotating and scaling is, along moved
# axes: room for most rotations' corners without cutting a volume-sized region every time.
CROP_MARGIN = 1.5


def crop_size(aug: AugmentConfig, plan: Plan) -> list[int]:
    """The region to cut around a patch centre: the patch, larger along the axes that rotation
    and scaling move, so the rotated patch is filled with image rather than padding."""
    if aug.spatial_prob <= 0:
        return list(plan.patch_size)
    moved = plan.in_plane_axes
    return [int(math.ceil(p * CROP_MARGIN)) if a in moved else p for a, p in enumerate(plan.patch_size)]


def crop_margin(aug: AugmentConfig, plan: Plan) -> list[int]:
    """Padding on each side of a volume before the region is cut: half of what the region
    exceeds the patch by, as nnU-Net lets its enlarged patch hang over the border. Without it a
    volume barely larger than the region (the left atrium's) is cut the same way every time,
    and the patch never moves."""
    return [(c - p) // 2 for c, p in zip(crop_size(aug, plan), plan.patch_size)]


def _rotation_degrees(aug: AugmentConfig, plan: Plan) -> float:
    if aug.rotate_degrees is not None:
        return aug.rotate_degrees
    in_plane = plan.spatial_dims == 2 or len(plan.in_plane_axes) == 2
    return 180.0 if in_plane else 30.0


def spatial_steps(aug: AugmentConfig, plan: Plan, keys: list[str]) -> list:
    """Rotation and scaling (cutting the patch out of the larger region ``crop_size`` gave),
    then elastic deformation. Empty when both are off.

    A sample that is neither rotated nor scaled takes the region's centre as it is: MONAI's
    ``RandAffined`` would resample it through an identity grid whenever the sizes differ,
    which was most of a 2D step's data time."""
    steps = []
    dims, patch = plan.spatial_dims, list(plan.patch_size)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    if aug.spatial_prob > 0:
        moved = plan.in_plane_axes
        low, high = aug.scale_range
        if not 0 < low <= high:
            raise ConfigError(
                "augment.scale_range", f"must be [low, high] with 0 < low <= high, not {[low, high]}"
            )
        angle = math.radians(_rotation_degrees(aug, plan))
        if dims == 2:
            rotate = (angle,)
        elif len(moved) == 2:  # about the thick axis only: slices stay slices
            rotate = tuple(angle if a not in moved else 0.0 for a in range(3))
        else:
            rotate = (angle,) * 3
        scale = tuple((low - 1, high - 1) if a in moved else (0.0, 0.0) for a in range(dims))
        affine = mt.RandAffined(
            keys,
            prob=1.0,  # how often it runs is OneOf's choice below (or always, at spatial_prob 1)
            rotate_range=rotate,
            scale_range=scale,
            spatial_size=patch,
            mode=modes,
            padding_mode="zeros",
        )
        if aug.spatial_prob < 1:
            centre = mt.CenterSpatialCropd(keys, roi_size=patch)
            affine = mt.OneOf([affine, centre], weights=[aug.spatial_prob, 1 - aug.spatial_prob])
        steps.append(affine)
    if aug.elastic_prob > 0:
        if plan.slice_axis is not None or len(plan.in_plane_axes) < plan.spatial_dims:
            raise ConfigError(
                "augment.elastic_prob",
                "elastic deformation is for isotropic 3D data and 2D images: "
                "it would bend slices into each other",
            )
        elastic, shape = (
            (mt.Rand3DElasticd, {"sigma_range": (5, 8), "magnitude_range": (50, 150)})
            if dims == 3
            else (mt.Rand2DElasticd, {"spacing": (20, 20), "magnitude_range": (1, 2)})
        )
        steps.append(elastic(keys, prob=aug.elastic_prob, mode=modes, padding_mode="zeros", **shape))
    return steps


def intensity_steps(aug: AugmentConfig, plan: Plan) -> list:
    """Brightness, contrast, gamma, noise, blur and low resolution, on the image only; blur and
    down-sampling stay within the slice plane of thick slices."""
    moved = plan.in_plane_axes
    sigma = {
        name: ((0.5, 1.0) if a in moved else (0.0, 0.0))
        for a, name in enumerate(("sigma_x", "sigma_y", "sigma_z")[: plan.spatial_dims])
    }
    steps = [
        mt.RandScaleIntensityd("image", factors=0.15, prob=aug.intensity_prob),
        mt.RandShiftIntensityd("image", offsets=0.15, prob=aug.intensity_prob),
        mt.RandGaussianNoised("image", std=0.1, prob=aug.noise_prob),
    ]
    if aug.blur_prob > 0:
        steps.append(mt.RandGaussianSmoothd("image", prob=aug.blur_prob, **sigma))
    if aug.contrast_prob > 0:
        steps.append(
            mt.RandScaleIntensityFixedMeand(
                "image", prob=aug.contrast_prob, factors=0.25, preserve_range=True
            )
        )
    if aug.gamma_prob > 0:
        low, high = aug.gamma_range
        steps.append(mt.RandAdjustContrastd("image", prob=aug.gamma_prob, gamma=(low, high)))
    if aug.lowres_prob > 0:
        steps.append(RandLowResolutiond("image", axes=moved, prob=aug.lowres_prob))
    return steps


class RandLowResolutiond(RandomizableTransform, MapTransform):
    """Simulate a coarser scan along ``axes``: down-sample by a random factor (nearest), then
    back up to the original size (linear), as nnU-Net's low-resolution augmentation.

    MONAI's ``RandSimulateLowResolution`` zooms every axis alike, which would smear thick slices
    into each other; this one leaves the other axes alone.

    Args:
        keys: image keys (channel-first tensors).
        axes: spatial axes to coarsen.
        prob: probability per call.
        zoom_range: the smallest and largest size factor (0.5: half the voxels along each axis).
    """

    def __init__(self, keys, axes, prob: float = 0.25, zoom_range=(0.5, 1.0)):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.axes = list(axes)
        self.zoom_range = zoom_range
        self._zoom = 1.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._zoom = float(self.R.uniform(*self.zoom_range))

    def __call__(self, data: dict) -> dict:
        self.randomize()
        out = dict(data)
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            image = torch.as_tensor(out[key])
            size = list(image.shape[1:])
            small = [max(1, int(round(s * self._zoom))) if a in self.axes else s for a, s in enumerate(size)]
            mode = ("linear", "bilinear", "trilinear")[len(size) - 1]
            low = F.interpolate(image[None].float(), size=small, mode="nearest-exact")
            restored = F.interpolate(low, size=size, mode=mode, align_corners=False)[0]
            out[key] = restored.to(image.dtype)
        return out
