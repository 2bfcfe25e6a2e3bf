"""Automatic planning, after nnU-Net's fingerprint: target spacing, patch size, pooling per axis
and intensity normalisation, derived from the training data itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from tqdm.auto import tqdm

from medseg.atomic import write_text_atomic
from medseg.config import Config
from medseg.data.datasets import Cases
from medseg.device import CPU_PATCH_VOXELS, autocast_dtype, patch_budget, resolve_device
from medseg.errors import ConfigError, InputError
from medseg.io import channels_in_header, image_files, read_channels, read_header, read_volume, to_array

__all__ = ["Fingerprint", "Plan", "fingerprint", "make_plan", "load_plan", "plan_for_config"]

ANISOTROPY = 3.0  # coarsest / finest spacing above which slices are "thick" (planned finer, 2D network)
MAX_UPSAMPLING = 2.0  # the coarse axis of the median case is never resampled finer than this
MIN_FEATURE_MAP = 4  # voxels per axis at the lowest resolution
MIN_COVERAGE = 1.0  # share of the median volume a 3D patch must cover before the spacing coarsens
MAX_COARSENING = 2.0  # ...by at most this factor
SLICE_COST = 0.6  # 2D cost per voxel over 3D: 0.12 s a step for 8 x 224 x 256, 0.18 s for 2 x 80 x 80 x 32
# ... and on a CPU training in fp32 (no native bf16): 1.56 s a step for 12 x 224 x 256 against
# 0.70 for 2 x 64 x 64 x 48 (AVX2, 2 cores). Half the slices ran 2.6x the steps in 10 minutes on
# ACDC and scored 0.703 against 0.408 (docs/performance.md).
SLICE_COST_FP32_CPU = 1.2
MAX_SLICES = 32  # 2D patches (slices) per volume drawn

log = logging.getLogger(__name__)


@dataclass
class Fingerprint:
    """What planning needs to know of a dataset.

    Args:
        spacings: (N, D) voxel spacing in mm per case, along R, A, S (3D) or the pixel axes (2D).
        shapes: (N, D) voxels per case along the same axes.
        modality: e.g. ``"MRI"`` or ``"CT"``.
        foreground: intensities sampled inside the labels (read for CT only).
        channels: image channels per case.
    """

    spacings: np.ndarray
    shapes: np.ndarray
    modality: str = "MRI"
    foreground: np.ndarray | None = None
    channels: int = 1


@dataclass
class Plan:
    """Preprocessing and network geometry for one dataset; saved as YAML and in checkpoints.

    Args:
        spacing: target mm per voxel along R, A, S (along the pixel axes for 2D tasks); its
            length is the task's dimensionality.
        patch_size: training patch and sliding window, voxels along the same axes.
        strides: down-sampling per level (one entry per level after the first).
        stem_stride: down-sampling of the network's strided stem, before its first level; None
            for a network whose first level runs at full resolution.
        normalization: ``zscore`` (per image, over non-zero voxels: MRI and others) or ``ct``
            (clip to the foreground's 0.5-99.5 percentiles, z-score with its mean and std).
        clip: CT clip range; mean, std: CT foreground statistics.
        modality: as read from the dataset.
        median_shape: median volume size after resampling (for information).
        channels: image channels the network takes.
        slice_axis: None for a 3D network; otherwise the axis a 2D network slices across (its
            patch is one slice thick, and its strides are 1 along it).
        samples_per_volume: patches cut from a volume each time it is drawn.
        batch_size: volumes drawn per training step. Planned as one patch from each of several
            cases (nnU-Net's way): a step of 12 slices from one ACDC patient repeats slices and
            gives batch norm one patient's statistics; from 12 patients it scored 0.794 mean
            Dice after 500 steps against 0.572 (docs/performance.md). Plans saved before it
            existed load as 1 volume of ``samples_per_volume`` patches, as they trained.
    """

    spacing: list[float]
    patch_size: list[int]
    strides: list[list[int]]
    stem_stride: list[int] | None = None
    normalization: str = "zscore"
    clip: list[float] | None = None
    mean: float | None = None
    std: float | None = None
    modality: str = "MRI"
    median_shape: list[int] = field(default_factory=list)
    channels: int = 1
    slice_axis: int | None = None
    samples_per_volume: int = 2
    batch_size: int = 1

    @property
    def patches_per_step(self) -> int:
        """Patches in a training step: ``batch_size`` volumes x ``samples_per_volume``."""
        return self.batch_size * self.samples_per_volume

    @property
    def spatial_dims(self) -> int:
        """2 for a task of 2D images, 3 for volumes."""
        return len(self.spacing)

    @property
    def network_dims(self) -> int:
        """2 for a 2D network (on 2D images, or on the slices of volumes), 3 for a 3D one."""
        return 2 if self.slice_axis is not None else self.spatial_dims

    @property
    def window_size(self) -> list[int]:
        """The sliding window: the patch, except that a 2D network on slices takes a whole slab
        of slices per forward (0 there: as many as the image has, up to ``MAX_WINDOW_SLICES``)."""
        window = list(self.patch_size)
        if self.slice_axis is not None:
            window[self.slice_axis] = 0
        return window

    @property
    def in_plane_axes(self) -> list[int]:
        """The axes spatial augmentation may move voxels along: not across thick slices."""
        thick = self.slice_axis if self.slice_axis is not None else thick_axis(self.spacing)
        return [a for a in range(self.spatial_dims) if a != thick]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> Plan:
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(source, f"not a medseg plan ({exc})") from None

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def size_factor(self) -> list[int]:
        """Each patch axis must be a multiple of this: all the down-sampling, stem included."""
        strides = [*self.strides, *([self.stem_stride] if self.stem_stride else [])]
        return [int(np.prod([s[a] for s in strides])) for a in range(self.spatial_dims)]

    def describe(self) -> str:
        """A readable summary, one setting per line."""
        norm = "z-score per image over non-zero voxels"
        if self.normalization == "ct":
            low, high = self.clip
            norm = (
                f"CT: clip to [{low:.0f}, {high:.0f}], z-score with mean {self.mean:.1f}, std {self.std:.1f}"
            )
        axes = "R, A, S" if self.spatial_dims == 3 else "x, y: 2D images"
        return "\n".join(
            [
                f"modality          {self.modality}, {self.channels} channel(s)",
                f"target spacing    {' x '.join(f'{s:g}' for s in self.spacing)} mm ({axes})",
                f"median shape      {' x '.join(map(str, self.median_shape))} voxels after resampling",
                f"patch size        {' x '.join(map(str, self.patch_size))} voxels",
                f"pooling per level {', '.join('x'.join(map(str, s)) for s in self.strides)}"
                + (f" (after a stem of {'x'.join(map(str, self.stem_stride))})" if self.stem_stride else ""),
                "network           "
                + (
                    f"2D, on slices across axis {self.slice_axis}"
                    if self.slice_axis is not None
                    else f"{self.spatial_dims}D"
                )
                + f", {self.patches_per_step} patches a step"
                + (f" ({self.samples_per_volume} per volume)" if self.samples_per_volume > 1 else ""),
                f"normalisation     {norm}",
            ]
        )


def load_plan(path: str | Path) -> Plan:
    """Read a plan YAML written by ``Plan.save`` (or ``medseg plan``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "no such plan file")
    return Plan.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path))


def _case_geometry(case: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """Spacing and size of a case along R, A, S (3D) or its pixel axes (2D), and its channels."""
    spacing = size = None
    channels = 0
    for path in image_files(case["image"]):
        header = read_header(path)
        dims = header.GetDimension()
        spatial = 2 if dims == 2 else 3  # a 4D file holds 3D channels
        channels += header.GetSize()[3] if dims == 4 else channels_in_header(header)
        if spacing is None:
            spacing = np.asarray(header.GetSpacing()[:spatial], dtype=float)
            size = np.asarray(header.GetSize()[:spatial], dtype=float)
            if spatial == 3:
                direction = np.asarray(header.GetDirection()).reshape(dims, dims)[:3, :3]
                affine = np.eye(4)
                affine[:3, :3] = direction
                axes = nib.orientations.io_orientation(affine)[:, 0].astype(int)
                spacing[axes], size[axes] = spacing.copy(), size.copy()
    return spacing, size, channels


AIR_HU = -500  # below any tissue's Hounsfield units: air (-1000) and the scanner's padding


# Names datasets give the two modalities medseg normalises differently (CT: clipped HU; MRI:
# z-scored per image). Anything else is z-scored as MRI, with a warning.
MODALITY_NAMES = {
    "CT": "CT",
    "MR": "MRI",
    "MRI": "MRI",
    "CINEMRI": "MRI",
    "LGEMRI": "MRI",
    "T1": "MRI",
    "T2": "MRI",
    "FLAIR": "MRI",
    "ADC": "MRI",
    "T1W": "MRI",
    "T2W": "MRI",
    "DWI": "MRI",
}


def resolve_modality(asked: str | None, dataset: Cases, looked_at: int = 3) -> str:
    """The modality a plan normalises for: the one asked for (``data.modality``, ``--modality``),
    the dataset's own (dataset.json), or, when nothing says, what the first training images
    look like, with a warning that says what was assumed and why.

    CT is taken when a DICOM series says so or the images hold air: values below -500, the
    Hounsfield units no MRI holds. A CT normalised as MRI loses its HU scale (and a z-score over
    non-zero voxels drops every voxel at exactly 0 HU, water)."""
    if asked or dataset.modality:
        said = str(asked or dataset.modality)
        modality = MODALITY_NAMES.get(said.upper().replace(" ", ""))
        if modality is None:
            log.warning(
                "modality %r is neither CT nor MRI: the images are normalised as MRI (z-scored per "
                "image); pass --modality CT for Hounsfield units",
                said,
            )
            return said.upper()
        return modality
    guess, why = "MRI", f"none of the first {looked_at} images holds values below {AIR_HU} (CT's air)"
    for case in dataset.training[:looked_at]:
        path = image_files(case["image"])[0]
        said = _dicom_modality(path)
        if said:
            guess, why = ("CT" if said == "CT" else "MRI"), f"{path} is a DICOM {said} series"
            break
        values = to_array(read_channels(path)[0])
        if (values < AIR_HU).mean() > 0.01:
            guess, why = "CT", f"{path} holds values down to {values.min():.0f}, as CT's Hounsfield units do"
            break
    log.warning(
        "no modality given (dataset.json, data.modality or --modality): %s, so the images are "
        "normalised as %s; pass --modality if that is wrong",
        why,
        guess,
    )
    return guess


def _dicom_modality(path: str | Path) -> str:
    """The Modality of a DICOM series folder's first file ('' for other inputs)."""
    folder = Path(path)
    if not folder.is_dir():
        return ""
    import pydicom

    for file in sorted(folder.iterdir()):
        try:
            return str(pydicom.dcmread(file, stop_before_pixels=True).get("Modality", "")).upper()
        except (pydicom.errors.InvalidDicomError, OSError):  # not DICOM (a stray file): the next
            continue
    return ""


def fingerprint(dataset: Cases, modality: str = "MRI", samples_per_case: int = 20000) -> Fingerprint:
    """Spacings and shapes (from headers) and, for CT, foreground intensities (sampled)."""
    spacings, shapes, channels, foreground = [], [], [], []
    rng = np.random.default_rng(0)
    is_ct = modality.upper() == "CT"
    for case in tqdm(dataset.training, desc="fingerprint", unit="case", disable=None, leave=False):
        spacing, shape, count = _case_geometry(case)
        spacings.append(spacing)
        shapes.append(shape)
        channels.append(count)
        if count != channels[0] or len(spacing) != len(spacings[0]):
            raise InputError(
                image_files(case["image"])[0],
                f"has {count} channel(s) in {len(spacing)}D; the first case "
                f"{image_files(dataset.training[0]['image'])[0]} has {channels[0]} in {len(spacings[0])}D",
            )
        if is_ct and case.get("label"):
            image = read_channels(image_files(case["image"])[0])[0]
            values = to_array(image)[to_array(read_volume(case["label"])) > 0]
            if values.size:
                foreground.append(rng.choice(values, min(samples_per_case, values.size), replace=False))
    return Fingerprint(
        np.asarray(spacings),
        np.asarray(shapes),
        modality.upper(),
        np.concatenate(foreground).astype(np.float64) if foreground else None,
        channels=channels[0],
    )


def make_plan(
    fp: Fingerprint,
    levels: int = 4,
    max_patch_voxels: int = CPU_PATCH_VOXELS,
    spacing: list[float] | None = None,
    patch_size: list[int] | None = None,
    stem: bool = False,
    dims: int | None = None,
    slice_cost: float = SLICE_COST,
) -> Plan:
    """Plan spacing, patch, pooling, network and normalisation from a fingerprint.

    Args:
        fp: the dataset's fingerprint.
        levels: network depth (``len(model.channels)``); ``levels - 1`` down-samplings.
        stem: plan one more down-sampling, first, for the network's strided stem.
        max_patch_voxels: memory budget of one 3D patch, in voxels.
        spacing, patch_size: fixed values to plan around instead of planning them.
        dims: 2 or 3 for a 2D or 3D network on volumes; None: planned.
        slice_cost: a 2D network's cost per pixel over a 3D network's per voxel (``SLICE_COST``;
            ``plan_for_config`` gives ``SLICE_COST_FP32_CPU`` on a CPU training in fp32).

    Rules:
        - network: on volumes with thick slices (the coarsest median spacing over 3x the
          finest) a 2D network segments each slice across the thick axis; otherwise a 3D one.
        - spacing: the median per axis; when the coarsest median is over 3x the finest, the
          coarse axis takes the 10th percentile instead (its median for a 2D network, which
          gains nothing from interpolated slices), so thick-slice outliers do not blur all.
          That axis never goes finer than the other axes' spacing, nor finer than half its
          median: a minority of thin-slice cases must not make every thick-slice case be
          upsampled many times over (a warning says when this limit applies).
        - context (3D networks, not thick slices): when the patch budget covers less than the
          median volume, every axis is coarsened by one factor (at most 2x) until it covers
          it, so the patch sees the structure and its surroundings rather than a part of it
          (as nnU-Net's low-resolution stage does).
        - pooling: at each level, an axis is halved only while its spacing is at most twice
          the finest and it keeps at least 4 voxels; so thick slices are pooled later.
        - patch (3D): the median resampled shape in whole pooling units, shrunk one unit at a
          time along its longest axis (in mm) until it fits the budget.
        - patch (2D): one slice of the median in-plane shape; a step trains as many slices,
          each from its own case, as cost what two 3D patches of the budget do (2 to 32).
    """
    fixed_spacing, fixed_patch = spacing, patch_size
    axes = fp.spacings.shape[1]
    for key, given in (("data.spacing", spacing), ("data.patch_size", patch_size)):
        if given is not None and len(given) != axes:
            raise ConfigError(key, f"has {len(given)} values; the images have {axes} axes: give one per axis")
    volumes = axes == 3
    spacing = _target_spacing(fp.spacings) if fixed_spacing is None else np.asarray(fixed_spacing, float)
    if dims not in (None, 2, 3) or (dims == 3 and not volumes):
        raise ConfigError("model.dims", f"must be 2 or 3 (3 only for volumes), not {dims!r}")
    slice_axis = None
    median_thick = thick_axis(np.median(fp.spacings, axis=0)) if volumes else None
    if volumes and (dims == 2 or (dims is None and median_thick is not None)):
        slice_axis = median_thick
        if slice_axis is None:  # a 2D network asked for on isotropic volumes: across the shortest axis
            slice_axis = int(np.argmin(np.median(fp.shapes * fp.spacings, axis=0)))
        if fixed_spacing is None:
            spacing[slice_axis] = float(np.median(fp.spacings[:, slice_axis]))
    if slice_axis is None and thick_axis(spacing) is None and fixed_spacing is None and fixed_patch is None:
        spacing = _with_context(spacing, fp, max_patch_voxels)
    median_shape = np.median(fp.shapes * fp.spacings / spacing, axis=0)
    count = levels - 1 + int(stem)  # down-samplings
    samples = 2
    if slice_axis is not None:
        plane = [a for a in range(3) if a != slice_axis]
        if fixed_patch is not None:
            patch = np.asarray(fixed_patch, dtype=int)
        else:
            patch = np.ones(3, dtype=int)
            patch[plane] = _fit_patch(median_shape[plane], spacing[plane], max_patch_voxels, count)
        strides = _pooling(spacing[plane], patch[plane], count)
        strides = [[int(s) for s in np.insert(np.asarray(st), slice_axis, 1)] for st in strides]
    else:
        patch = (
            np.asarray(fixed_patch, dtype=int)
            if fixed_patch is not None
            else _fit_patch(median_shape, spacing, max_patch_voxels, count)
        )
        strides = _pooling(spacing, patch, count)
    factor = np.prod(np.asarray(strides), axis=0) if strides else np.ones(len(spacing), int)
    if fixed_patch is None:
        patch = np.maximum(patch // factor * factor, factor)
    if slice_axis is not None:
        cost = slice_cost * float(np.prod(patch))
        samples = int(np.clip(round(2 * max_patch_voxels / cost), 2, MAX_SLICES))
    plan = Plan(
        spacing=[round(float(s), 4) for s in spacing],
        patch_size=[int(p) for p in patch],
        strides=strides[int(stem) :],
        stem_stride=strides[0] if stem else None,
        modality=fp.modality,
        median_shape=[int(math.ceil(s)) for s in median_shape],
        channels=fp.channels,
        slice_axis=slice_axis,
        samples_per_volume=1,
        batch_size=samples,
    )
    # CT statistics describe the first channel; several channels are z-scored one by one.
    if fp.modality == "CT" and fp.channels == 1 and fp.foreground is not None and fp.foreground.size:
        low, high = np.percentile(fp.foreground, [0.5, 99.5])
        clipped = np.clip(fp.foreground, low, high)
        plan.normalization = "ct"
        plan.clip = [float(low), float(high)]
        plan.mean, plan.std = float(clipped.mean()), float(max(clipped.std(), 1e-6))
    return plan


def thick_axis(spacing) -> int | None:
    """The axis of thick slices (coarsest spacing over 3x the finest), or None."""
    spacing = np.asarray(spacing, dtype=float)
    if len(spacing) < 3 or spacing.max() <= ANISOTROPY * spacing.min():
        return None
    return int(spacing.argmax())


def _fit_patch(median_shape: np.ndarray, spacing: np.ndarray, max_voxels: int, count: int) -> np.ndarray:
    """The median shape in whole pooling units, shrunk one unit at a time along its longest axis
    (in mm) until it fits ``max_voxels``.

    A unit is what the ``count`` down-samplings divide on that axis. Rounding to units first,
    rather than shrinking by 10 % and flooring to the pooling afterwards, keeps long axes
    pooled at every level: with a strided stem and three more levels, a 56-voxel axis stops at
    7 voxels and loses the last pooling; a 64-voxel one ends at 4.
    """
    if max_voxels < MIN_FEATURE_MAP ** len(median_shape):
        raise ConfigError(
            "data.max_patch_voxels",
            f"{max_voxels} is too small: a patch needs at least {MIN_FEATURE_MAP} voxels "
            f"per axis ({MIN_FEATURE_MAP ** len(median_shape)} in {len(median_shape)}D)",
        )
    median_shape = np.asarray(median_shape, float)

    def unit_of(shape):
        return np.prod(np.asarray(_pooling(spacing, shape, count) or [[1] * len(spacing)]), axis=0)

    # an axis pools every time where its median, rounded to that unit, leaves 4 voxels at the
    # bottom; a shorter one (a tiny volume) takes the unit its own pooling gives
    full = unit_of(np.full(len(spacing), float(MIN_FEATURE_MAP * 2**count)))
    pools_fully = np.floor(median_shape / full + 0.5) >= MIN_FEATURE_MAP
    unit = np.where(pools_fully, full, unit_of(median_shape))
    patch = np.maximum(np.floor(median_shape / unit + 0.5), 1).astype(int) * unit
    patch = np.maximum(patch, MIN_FEATURE_MAP)
    while patch.prod() > max_voxels:
        order = np.argsort(-(patch * spacing), kind="stable")  # longest in mm first
        shrinkable = [a for a in order if patch[a] - unit[a] >= MIN_FEATURE_MAP]
        if not shrinkable:
            break
        patch[shrinkable[0]] -= unit[shrinkable[0]]
    return patch


def _with_context(spacing: np.ndarray, fp: Fingerprint, max_voxels: int) -> np.ndarray:
    """The spacing coarsened (one factor for every axis, at most 2x) until the patch budget
    covers the median volume (see make_plan)."""
    volume = float(np.prod(np.median(fp.shapes * fp.spacings / spacing, axis=0)))
    factor = (volume * MIN_COVERAGE / max_voxels) ** (1 / len(spacing))
    factor = float(np.clip(factor, 1.0, MAX_COARSENING))
    if factor > 1.0:
        log.info("planning: spacing coarsened %.2fx so that a patch covers the median volume", factor)
    return spacing * factor


def _target_spacing(spacings: np.ndarray) -> np.ndarray:
    """The median spacing, with the coarse axis of anisotropic data planned finer (see make_plan)."""
    spacing = np.median(spacings, axis=0)
    if len(spacing) < 2 or spacing.max() <= ANISOTROPY * spacing.min():
        return spacing
    coarse = int(spacing.argmax())
    others = np.delete(spacing, coarse)
    median = spacing[coarse]
    wanted = float(np.percentile(spacings[:, coarse], 10))
    spacing[coarse] = max(wanted, others.max(), median / MAX_UPSAMPLING)
    if spacing[coarse] > wanted:
        log.warning(
            "planning: the 10th percentile of axis %d's spacing (%.2f mm) would resample the "
            "median case %.1fx finer along it; using %.2f mm instead",
            coarse,
            wanted,
            median / wanted,
            spacing[coarse],
        )
    return spacing


def _pooling(spacing: np.ndarray, patch: np.ndarray, count: int) -> list[list[int]]:
    """``count`` down-samplings: an axis is halved only while its spacing is at most twice the
    finest and it keeps at least ``MIN_FEATURE_MAP`` voxels."""
    strides, current, size = [], np.asarray(spacing, float), np.asarray(patch, float)
    for _ in range(count):
        pool = [
            2 if current[a] <= 2 * current.min() and size[a] / 2 >= MIN_FEATURE_MAP else 1
            for a in range(len(current))
        ]
        strides.append(pool)
        current, size = current * pool, size / pool
    return strides


def plan_for_config(config: Config, dataset: Cases) -> Plan:
    """The plan a run uses: a saved one (``data.plan``) or a new one from the training cases.

    Values set in the config (``data.spacing``, ``data.patch_size``, ``model.strides``) win
    over planned ones. The patch must be divisible by the pooling.
    """
    data, model = config.data, config.model
    if data.plan:
        plan = load_plan(data.plan)
    else:
        modality = resolve_modality(data.modality, dataset)
        budget, slice_cost = _device_costs(config)
        plan = make_plan(
            fingerprint(dataset, modality),
            levels=len(model.channels),
            max_patch_voxels=data.max_patch_voxels or budget,
            slice_cost=slice_cost,
            spacing=data.spacing,
            patch_size=data.patch_size,
            stem=_wants_stem(config),
            dims=model.dims,
        )
    if data.spacing:
        plan.spacing = list(data.spacing)
    if data.patch_size:
        plan.patch_size = list(data.patch_size)
    if data.samples_per_volume:
        plan.samples_per_volume = data.samples_per_volume
    if config.train.batch_size:
        plan.batch_size = config.train.batch_size
    if model.strides:
        plan.strides = [[s] * plan.spatial_dims if isinstance(s, int) else list(s) for s in model.strides]
    if not _wants_stem(config):
        plan.stem_stride = None
    elif plan.stem_stride is None:  # a plan made for another network
        plan.stem_stride = _pooling(plan.spacing, plan.patch_size, 1)[0]
    if len(plan.strides) != len(model.channels) - 1:
        raise ConfigError(
            "model.strides", f"needs {len(model.channels) - 1} entries for {len(model.channels)} levels"
        )
    if {len(plan.patch_size), *map(len, plan.strides)} != {plan.spatial_dims}:
        raise ConfigError(
            "data.patch_size",
            f"patch {plan.patch_size} and strides {plan.strides} must have one entry per axis "
            f"of the {plan.spatial_dims}D spacing {plan.spacing}",
        )
    factor = plan.size_factor
    if any(p % f for p, f in zip(plan.patch_size, factor)):
        fit = [int(max(f, p // f * f)) for p, f in zip(plan.patch_size, factor)]
        raise ConfigError(
            "data.patch_size",
            f"{plan.patch_size} is not divisible by the pooling {tuple(int(f) for f in factor)}; try {fit}",
        )
    return plan


def _device_costs(config: Config) -> tuple[int, float]:
    """What the device the run trains on affords: its 3D patch budget
    (``medseg.device.patch_budget``) and what a 2D network's pixel costs against a 3D voxel,
    more on a CPU in fp32, where wide 2D batches fall out of cache."""
    device = resolve_device(config.train.device)
    amp_dtype = autocast_dtype(device, config.train.precision)
    budget = patch_budget(device, config.model.channels[0], amp_dtype)
    return budget, SLICE_COST_FP32_CPU if device.type == "cpu" and amp_dtype is None else SLICE_COST


def _wants_stem(config: Config) -> bool:
    if config.model.stem not in ("strided", "full"):
        raise ConfigError("model.stem", f"must be strided or full, not {config.model.stem!r}")
    return config.model.stem == "strided"
