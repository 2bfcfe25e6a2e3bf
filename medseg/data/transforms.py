"""MONAI transform pipelines for training, validation and inference, built from the config.

Deterministic steps (load, reorient, resample, normalise, crop) come first so that a
``CacheDataset`` keeps their result; random steps (patch sampling, augmentation) follow.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from medseg.config import AugmentConfig, Config
from medseg.data.augment import crop_margin, crop_size, intensity_steps, spatial_steps
from medseg.data.plan import Plan
from medseg.errors import InputError
from medseg.io import check_voxel_values, grid_mismatch, ras_affine, read_channels, read_volume

__all__ = [
    "LoadVolumed",
    "body_mask",
    "train_transforms",
    "eval_transforms",
    "pretrain_transforms",
]

log = logging.getLogger(__name__)

# Affines here are RAS (medseg.io.ras_affine); saying so also silences MONAI's change of default.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class LoadVolumed(mt.MapTransform):
    """Read image/label files with medseg.io into channel-first MetaTensors (RAS affine).

    Args:
        keys: the dict keys holding a file path, a SimpleITK image already read, or a list of
            either (all on one grid). Images are split into channels by ``medseg.io.read_channels``
            (a 4D NIfTI or an RGB PNG gives several); labels must be single-channel.
        spatial_dims: the dimensionality the model needs; other inputs are an InputError.
    """

    def __init__(self, keys, spatial_dims: int = 3, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            if out[key] is None:
                continue
            sources = out[key] if isinstance(out[key], (list, tuple)) else [out[key]]
            images = []
            for source in sources:
                channels = self._read(source, key)
                mismatch = grid_mismatch(channels[0], images[0]) if images else ""
                if mismatch:
                    raise InputError(str(source), f"{mismatch} of the case's first channel")
                images += channels
            # One copy of the voxels, however many channels: a CT is 300 MB a channel.
            array = np.empty((len(images), *images[0].GetSize()), np.float32 if key == "image" else np.int64)
            for channel, image in zip(array, images):
                channel[...] = sitk.GetArrayViewFromImage(image).transpose()
            out[key] = MetaTensor(
                torch.from_numpy(array),
                affine=torch.as_tensor(ras_affine(images[0]), dtype=torch.float64),
                meta={"filename_or_obj": "" if isinstance(sources[0], sitk.Image) else str(sources[0])},
            )
        return out

    def _read(self, source, key: str) -> list[sitk.Image]:
        if isinstance(source, sitk.Image):
            return [source]
        if key != "image":
            return [read_volume(source, spatial_dims=self.spatial_dims)]
        channels = []
        for channel in read_channels(source, spatial_dims=self.spatial_dims):
            channel, warning = check_voxel_values(channel, source)  # NaNs would poison every loss
            if warning:
                log.warning("%s: %s", source, warning)
            channels.append(channel)
        return channels


def body_mask(image: torch.Tensor) -> torch.Tensor:
    """Voxels brighter than a tenth of the way from the darkest voxel to the 99th percentile.

    Separates the body from the air around it in MRI and CT alike; used for the foreground crop.
    """
    flat = image.reshape(-1).float()
    sample = flat[:: max(1, flat.numel() // 1_000_000)]
    low, high = sample.min(), torch.quantile(sample, 0.99)
    return image > low + 0.1 * (high - low)


def _normalize(plan: Plan) -> list:
    if plan.normalization == "ct":
        low, high = plan.clip
        return [
            mt.ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=low, b_max=high, clip=True),
            mt.NormalizeIntensityd("image", subtrahend=plan.mean, divisor=plan.std),
        ]
    return [mt.NormalizeIntensityd("image", nonzero=True, channel_wise=True)]


def _preprocess(plan: Plan, keys: list[str]) -> list:
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    # 2D images have no patient frame to orient to: their pixel axes are kept.
    orient = (
        [mt.Orientationd(keys, axcodes="RAS", labels=_RAS_LABELS, allow_missing_keys=True)]
        if plan.spatial_dims == 3
        else []
    )
    return [
        LoadVolumed(keys, spatial_dims=plan.spatial_dims),
        *orient,
        # Resampled in float32 (MONAI's default computes in float64, then stores float32 anyway):
        # 1.6x faster and half the scratch memory on a 512 x 512 x 300 CT, values within 1e-4.
        mt.Spacingd(keys, pixdim=plan.spacing, mode=modes, dtype=np.float32, allow_missing_keys=True),
        *_normalize(plan),
    ]


def _crop_to_body(keys: list[str]) -> mt.CropForegroundd:
    # allow_smaller: crop only; MONAI 1.6 would otherwise pad a body that fills the image.
    return mt.CropForegroundd(keys, source_key="image", select_fn=body_mask, margin=4, allow_smaller=True)


def eval_transforms(plan: Plan) -> mt.Compose:
    """Validation: preprocess image and label, crop to the body, drop the metadata (validation
    needs only the voxels, and plain tensors keep the cache small)."""
    keys = ["image", "label"]
    return mt.Compose(_preprocess(plan, keys) + [_crop_to_body(keys), mt.EnsureTyped(keys, track_meta=False)])


INDICES = "label_cls_indices"  # where ClassesToIndicesd keeps each class's voxel indices
MAX_INDICES = 1_000_000  # per class: enough centres to draw from, without 8 bytes per voxel of a CT


def train_transforms(config: Config, plan: Plan, num_classes: int) -> mt.Compose:
    """Training: the validation steps, padding to the patch and each class's voxel indices (all
    cached once per volume), then class-balanced patch sampling and augmentation
    (``medseg.data.augment``).

    The random steps never modify their input in place, so cached volumes are shared with them
    rather than copied for every sample.
    """
    keys = ["image", "label"]
    aug = config.augment
    ratios = config.data.class_ratios or [1.0] * num_classes
    margin = crop_margin(aug, plan)
    cached_steps = [
        # Padded so that the region cut around a patch can hang over the border by half its
        # margin, and is never smaller than itself: patches then move over the whole volume.
        *([mt.BorderPadd(keys, spatial_border=[m for m in margin for _ in "lr"])] if any(margin) else []),
        mt.SpatialPadd(keys, spatial_size=crop_size(aug, plan)),
        # Finding each class's voxels once here, not for every patch, saves a scan of the
        # whole label per sample.
        mt.ClassesToIndicesd("label", num_classes=num_classes, max_samples_per_class=MAX_INDICES),
    ]
    random_steps = [
        mt.RandCropByLabelClassesd(
            keys,
            label_key="label",
            # larger than the patch when rotation follows (the volume is padded to at least that)
            spatial_size=crop_size(aug, plan),
            num_classes=num_classes,
            ratios=ratios,
            num_samples=plan.samples_per_volume,
            indices_key=INDICES,
            warn=False,
            allow_smaller=True,
        ),
        *spatial_steps(aug, plan, keys),
        *[mt.RandFlipd(keys, prob=aug.flip_prob, spatial_axis=a) for a in flipped_axes(aug, plan)],
        *intensity_steps(aug, plan),
        mt.EnsureTyped(keys, track_meta=False),
        mt.DeleteItemsd(INDICES),
    ]
    return mt.Compose(list(eval_transforms(plan).transforms) + cached_steps + random_steps)


def flipped_axes(augment: AugmentConfig, plan: Plan) -> list[int]:
    """The axes training mirrors patches along: ``AugmentConfig.mirrored_axes``, less the slice axis of a
    2D plan (a one-slice patch mirrored along it is the same patch)."""
    axes = augment.mirrored_axes(plan.spatial_dims)
    return [a for a in axes if a != plan.slice_axis]


def pretrain_transforms(config: Config, plan: Plan) -> mt.Compose:
    """Pretraining: the image alone, preprocessed exactly as for segmentation (so the features
    transfer), cropped to the body, then random patches with flips and intensity changes. No
    noise augmentation: the network's target is the image without noise."""
    patch = plan.patch_size
    aug = config.augment
    return mt.Compose(
        [
            *_preprocess(plan, ["image"]),
            _crop_to_body(["image"]),
            mt.EnsureTyped("image", track_meta=False),
            mt.SpatialPadd("image", spatial_size=patch),
            mt.RandSpatialCropSamplesd(
                "image", roi_size=patch, num_samples=plan.samples_per_volume, random_size=False
            ),
            *[
                mt.RandFlipd("image", prob=aug.flip_prob, spatial_axis=a)
                for a in aug.mirrored_axes(plan.spatial_dims)
            ],
            mt.RandScaleIntensityd("image", factors=0.15, prob=aug.intensity_prob),
            mt.RandShiftIntensityd("image", offsets=0.15, prob=aug.intensity_prob),
        ]
    )
