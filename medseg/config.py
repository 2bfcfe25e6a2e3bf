"""One typed configuration: dataclasses, YAML in and out, ``--set a.b=c`` overrides.

The defaults are the heart demo's settings, so ``Config()`` trains a sensible model.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medseg.atomic import write_text_atomic
from medseg.errors import ConfigError

DEFAULT_EPOCHS = 40  # of 25 steps: a run with neither train.epochs nor train.max_time

__all__ = [
    "Config",
    "DataConfig",
    "AugmentConfig",
    "ModelConfig",
    "TrainConfig",
    "InferConfig",
    "PretrainConfig",
    "load_config",
    "save_config",
]


@dataclass
class DataConfig:
    """Where the cases are and how they are preprocessed.

    Args:
        root: dataset folder or CSV manifest (see ``medseg.data.datasets.find_cases``).
        plan: a plan YAML from ``medseg plan``; null plans from the training cases.
        modality: ``MRI``, ``CT``, ...; null reads it from dataset.json, else from the images
            (Hounsfield units, a DICOM Modality) with a warning saying what was assumed. CT gets
            CT normalisation (``medseg.data.plan.resolve_modality``).
        spacing: target voxel spacing in mm along R, A, S; null: planned.
        patch_size: training patch, voxels per axis (also the sliding-window size); null: planned.
        max_patch_voxels: the 3D patch budget planning works to; null: from the device
            (``medseg.device.patch_budget``: 204800 voxels on CPUs, from the memory on GPUs).
        samples_per_volume: patches cut from a volume each time it is drawn; null: planned (1:
            a step's patches come from ``train.batch_size`` different cases).
        class_ratios: how often a patch is centred on each class (background first); null: equally.
        val_fraction: share of the training cases held out for validation (without ``folds``).
        folds: k-fold cross-validation: the cases are split into this many seeded folds
            (saved as ``splits.json`` in the run folder); null: one ``val_fraction`` split.
        fold: which fold validates (0 .. folds-1); the others train.
        splits: a ``splits.json`` to take the split from instead of drawing one: a run's own
            (its ``train`` and ``val``; cases not in it are left out, with a warning), or the
            folds file that every fold of a cross-validation shares (``medseg train --fold``
            keeps it as ``OUTPUT/splits.json``; written when it does not exist yet; a case
            new to the folder joins the smallest fold, the others stay where they are).
        num_workers: data-loader worker processes.
        cache: keep preprocessed volumes in ``memory`` (this run), on ``disk`` (across runs,
            keyed by file content and plan) or ``none``.
        cache_dir: where the disk cache lives; null: ``~/.cache/medseg``.
    """

    root: str | None = None
    plan: str | None = None
    modality: str | None = None
    spacing: list[float] | None = None
    patch_size: list[int] | None = None
    max_patch_voxels: int | None = None
    samples_per_volume: int | None = None
    class_ratios: list[float] | None = None
    val_fraction: float = 0.2
    folds: int | None = None
    fold: int = 0
    splits: str | None = None
    num_workers: int = 0
    cache: str = "memory"
    cache_dir: str | None = None


@dataclass
class AugmentConfig:
    """Random augmentation during training (probabilities per patch), after nnU-Net's.

    Spatial steps keep image and label aligned (the label is resampled nearest-neighbour, so it
    stays integer). On thick-slice data (the coarsest axis over 3x the finest) and for 2D networks
    on slices, every spatial step stays within the slice plane: rotation about the slice axis
    only, no scaling, blurring or down-sampling across slices.

    Args:
        flip_prob: mirror along each of ``flip_axes``.
        flip_axes: the axes to mirror, of the network's RAS grid (0: left-right, 1:
            posterior-anterior, 2: inferior-superior); null: all. Mirroring is right where it
            leaves each label on its own structure: a mirrored heart is an unusual heart whose
            RV is still labelled RV, but a mirrored ``left kidney`` would be labelled left while
            lying on the right. Leave out any axis whose mirror changes what a label means.
            Flip test-time augmentation follows these axes (``infer.tta_axes``).
        intensity_prob: random scale and shift of intensities (brightness).
        noise_prob: add Gaussian noise.
        spatial_prob: rotate and scale the patch (one resampling for both).
        rotate_degrees: the largest rotation, in degrees; null: 180 within the slice plane for
            thick slices and 2D networks, 30 about each axis for 3D (nnU-Net's ranges).
        scale_range: the smallest and largest zoom factor.
        elastic_prob: elastic deformation (3D networks on isotropic data only; slow).
        gamma_prob: gamma correction of the intensities, with ``gamma_range``.
        gamma_range: the smallest and largest gamma.
        blur_prob: Gaussian blur, sigma 0.5 to 1 voxel (within the slice plane for thick slices).
        contrast_prob: scale the intensities about their mean by 0.75 to 1.25.
        lowres_prob: simulate a coarser scan: down-sample by up to 2 (nearest), then up again.
    """

    flip_prob: float = 0.5
    flip_axes: list[int] | None = None
    intensity_prob: float = 0.5
    noise_prob: float = 0.15
    spatial_prob: float = 0.35
    rotate_degrees: float | None = None
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.4])
    elastic_prob: float = 0.0
    gamma_prob: float = 0.0
    gamma_range: list[float] = field(default_factory=lambda: [0.7, 1.5])
    blur_prob: float = 0.0
    contrast_prob: float = 0.0
    lowres_prob: float = 0.0

    def mirrored_axes(self, spatial_dims: int) -> list[int]:
        """The axes training mirrors: ``flip_axes`` (null: all), none when ``flip_prob`` is 0.

        Raises:
            ConfigError: ``flip_axes`` names an axis the image lacks.
        """
        if self.flip_prob <= 0:
            return []
        axes = list(range(spatial_dims)) if self.flip_axes is None else sorted(set(self.flip_axes))
        if any(not 0 <= a < spatial_dims for a in axes):
            raise ConfigError(
                "augment.flip_axes", f"{self.flip_axes} is not a list of axes 0..{spatial_dims - 1}"
            )
        return axes


@dataclass
class ModelConfig:
    """The network. See ``medseg.build_model``; options a model does not take are ignored.

    Args:
        name: ``unet``, ``residual_unet`` or ``attention_unet``.
        dims: 2: a 2D network segments each slice of a volume, across its thickest axis (nnU-Net's
            ``2d``); 3: a 3D network (``3d_fullres``); null: planned (2 for thick-slice volumes,
            3 otherwise; ``medseg.data.plan.make_plan``). 2D images always take a 2D network.
        channels: features per level; the depth follows from its length.
        strides: down-sampling per level after the first, each an int (all axes) or one per
            axis, e.g. ``[[2, 2, 1], 2, 2]``; null: planned from the spacing.
        stem: ``strided`` (the network starts with one strided conv and ends with a light
            full-resolution refinement: more than twice as fast on CPUs) or ``full`` (its first
            level runs at full resolution, as in the classic U-Net). Its stride is planned with
            the pooling.
        norm: ``batch``, ``instance`` or ``group``; null: the model's own (batch for ``unet``,
            instance for ``unet`` on 2D tasks, group for the others).
        dropout: dropout probability in the conv blocks.
        deep_supervision: train coarse decoder outputs too (weights halve per level).
        time_conditioning: give every block a diffusion-timestep embedding (for pretraining).
        timestep: the diffusion timestep a time-conditioned network segments at. ``medseg
            pretrain`` records it and ``train.init`` takes it from there: 0 (a clean image), or
            the fixed noise level a ``pretrain.timesteps: fixed`` run trained at.
        blocks_per_level: residual blocks per level (residual and attention U-Nets). One fits
            the CPU demo budget; ``build_model`` itself defaults to two.
        attention_levels: levels with self-attention (attention U-Net; null: the deepest).
        heads: self-attention heads (attention U-Net).
    """

    name: str = "unet"
    dims: int | None = None
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[list[int] | int] | None = None
    stem: str = "strided"
    norm: str | None = None
    dropout: float = 0.0
    deep_supervision: bool = False
    time_conditioning: bool = False
    timestep: int = 0
    blocks_per_level: int = 1
    attention_levels: list[int] | None = None
    heads: int = 4


@dataclass
class TrainConfig:
    """Optimisation and run control.

    Args:
        output_dir: run folder for checkpoints and logs.
        epochs: number of epochs; an epoch is ``iters_per_epoch`` steps. null: 40, or no limit
            when ``max_time`` is set, so that a budgeted run uses its whole budget.
        iters_per_epoch: optimiser steps per epoch.
        max_time: stop after this many seconds of training (null: no limit); with ``epochs``
            set too, whichever comes first.
        batch_size: volumes per step, each a different case giving ``data.samples_per_volume``
            patches; null: planned (2, or for a 2D network's slices as many as cost two 3D
            patches, each from its own case).
        lr: peak learning rate, reached after the warm-up; null: the model's own
            (``medseg.training.optim.DEFAULT_LR``: 3e-3 for ``unet``, 2e-3 for the others).
        weight_decay: weight decay (decoupled for AdamW).
        optimizer: ``adamw``, or ``sgd`` (Nesterov, momentum ``momentum``, as nnU-Net).
        momentum: SGD momentum.
        schedule: learning-rate decay after warm-up: ``cosine``, or ``poly`` (nnU-Net's
            ``(1 - progress) ** 0.9``). Progress is the larger of steps and time used.
        warmup: share of the run spent warming up linearly.
        grad_clip: clip the gradient norm to this (null: no clipping).
        dice_background: count the background in the Dice part of the loss (MONAI's default);
            false: foreground classes only, as nnU-Net.
        batch_dice: compute Dice over the whole batch rather than per patch and average (nnU-Net's
            choice): a patch without some class then does not score that class's Dice as 0 or 1.
        ema_decay: keep an exponential moving average of the weights with this decay (e.g.
            0.999) and validate and save it; null: off.
        val_every: validate every this many epochs (and always at the end); null: every 2, or
            less often where validating would take more than a tenth of the run (many or large
            validation cases on a slow machine).
        val_pictures: at each validation, draw this many validation cases (prediction and
            reference contours) to ``<output_dir>/validation/CASE.png``, to watch the model
            learn; 0: none.
        seed: random seed for splits, sampling and initialisation.
        deterministic: use deterministic algorithms only, so a resumed run ends with the same
            weights as an uninterrupted one (needs ``max_time: null``: time is never repeatable).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. Under torchrun each process
            takes the GPU of its ``LOCAL_RANK``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (fp16 with gradient scaling; meant
            for GPUs, slow on CPUs).
        channels_last: channels-last memory layout; null: where measured faster (see
            ``medseg.device.use_channels_last``).
        compile: run the network through ``torch.compile`` (slow to start, faster after).
        tensorboard: write TensorBoard scalars to ``<output_dir>/tensorboard``; null: when the
            ``tensorboard`` package is installed.
        init: a checkpoint to start from (``medseg pretrain``'s, or another run's): every weight
            whose name and shape match is loaded, except the output head; the network and the
            plan are taken from it.
        init_parts: which weights ``init`` loads: ``encoder`` (the default: with ``all``, one
            run in three of our study stalled; docs/pretraining.md), ``all`` or ``decoder``.
        unlabeled: images without labels to learn from as well, by mean-teacher consistency
            (``medseg.training.semi``): a folder of images, a CSV with an ``image`` column, or
            ``dataset`` (the dataset's ``imagesUn/`` or dataset.json's ``unlabeled``); null: off.
        pseudo_labels: a trained model (checkpoint or run folder) that labels the ``unlabeled``
            images before training (self-training, ``medseg.training.pseudo``); the run then
            learns from them as from labelled cases, instead of by consistency; null: off.
        unlabeled_weight: the consistency loss's full weight (it ramps up over the first 40 %).
        teacher_decay: the teacher's moving-average decay.
        unlabeled_loss: how the student learns from the teacher on unlabelled patches: ``mse``,
            the mean squared difference of their softmaxes (mean teacher, UA-MT), or
            ``confident``, cross-entropy towards the teacher's class wherever the teacher gives
            it at least ``confidence`` (pseudo-labels, as FixMatch and UniMatch threshold them).
        confidence: ``confident``'s threshold on the teacher's probability.
        unlabeled_mix: ``none``, or ``cutmix``: each unlabelled patch the student sees has a box
            of another pasted in, and so have the teacher's answers it learns from (French et
            al. 2020), a stronger perturbation than the teacher's noise alone.
    """

    output_dir: str = "runs/heart"
    epochs: int | None = None
    iters_per_epoch: int = 25
    max_time: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.99
    schedule: str = "cosine"
    warmup: float = 0.03
    grad_clip: float | None = 12.0
    dice_background: bool = False
    batch_dice: bool = True
    ema_decay: float | None = None
    val_every: int | None = None
    val_pictures: int = 2
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    tensorboard: bool | None = None
    init: str | None = None
    init_parts: str = "encoder"
    unlabeled: str | None = None
    pseudo_labels: str | None = None
    unlabeled_weight: float = 1.0
    teacher_decay: float = 0.99
    unlabeled_loss: str = "mse"
    confidence: float = 0.95
    unlabeled_mix: str = "none"

    @property
    def epoch_limit(self) -> float:
        """The epochs a run may take: ``epochs``, else 40, else (with ``max_time``) no limit."""
        if self.epochs is not None:
            return self.epochs
        return float("inf") if self.max_time else DEFAULT_EPOCHS


@dataclass
class InferConfig:
    """Sliding-window prediction.

    Args:
        overlap: overlap of neighbouring windows (0..1); windows are blended with a Gaussian. 0.25
            gave the same Dice as 0.5 in half the time (docs/performance.md).
        sw_batch_size: windows per forward pass; null: as measured fastest for the device and
            precision (``medseg.device.windows_per_forward``: 1 on CPUs in bf16, 2 in fp32, 4 on
            GPUs).
        tta: flip test-time augmentation: average the probabilities of passes mirrored along
            ``tta_axes`` (which: ``tta_mirrors``); null: on when training mirrored, unless
            training's last look at ``best.pt`` found it raised validation Dice by less than
            0.002 (``medseg.inference.tta.TTA_MIN_GAIN``; the checkpoint's ``tta_gain``): it
            costs 3 to 4 passes, and on the left atrium it was level (docs/prediction.md).
        tta_axes: the axes TTA mirrors (as ``augment.flip_axes``); null: the axes training
            mirrored (none when ``augment.flip_prob`` is 0, and then ``tta`` is refused: the
            network never saw mirrored images).
        tta_mirrors: which mirrors TTA passes: ``all`` their combinations (2 ** axes passes),
            ``single`` (the unmirrored pass and one per axis: 1 + axes), or ``auto``: single
            for three axes (4 passes instead of 8, the same Dice on the left atrium), all for
            fewer (``medseg.inference.tta.resolve_mirrors``).
        keep_largest: post-processing: keep only the largest connected piece of ``all``
            foreground labels, of the label indices listed, or of ``none``; the rest becomes
            background. ``auto``: of each label whose validation Dice it did not lower
            (training decides at every validation, and each checkpoint keeps the decision; a
            run without validation decides nothing, so none).
    """

    overlap: float = 0.25
    sw_batch_size: int | None = None
    tta: bool | None = None
    tta_axes: list[int] | None = None
    tta_mirrors: str = "auto"
    keep_largest: list[int] | str = "auto"


@dataclass
class PretrainConfig:
    """Diffusion-denoising pretraining (``medseg pretrain``); the run itself uses ``train.*``.

    Args:
        schedule: ``linear`` (beta 1e-4 to 0.02, DDPM) or ``cosine`` noise schedule.
        steps: diffusion steps T.
        timesteps: how training draws t: ``uniform`` over [0, T); ``low``: t = T u^2, biased
            toward low and middle noise (median T/4); or ``fixed``: always ``model.timestep``,
            one noise level as in DDeP (Brempong et al. 2022), at which segmentation then runs.
    """

    schedule: str = "linear"
    steps: int = 1000
    timesteps: str = "low"


@dataclass
class Config:
    """The whole configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """Build a config from nested dicts, naming the first unknown key or invalid value."""
        return _build(cls, data or {}, prefix="", source=source)

    def override(self, assignments: list[str]) -> Config:
        """Apply ``key=value`` strings (values are YAML: ``5``, ``[1, 2]``, ``null``)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(item, "expected key=value, e.g. train.epochs=5")
            parts = key.strip().split(".")
            node = data
            for depth, part in enumerate(parts[:-1]):
                if not isinstance(node.get(part), dict):
                    raise ConfigError(key, _unknown(".".join(parts[: depth + 1]), node))
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(key, _unknown(key.strip(), node))
            node[parts[-1]] = yaml.safe_load(raw)
        return Config.from_dict(data, source="--set")


def _unknown(key: str, known: dict) -> str:
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known)}"
    return f"unknown key '{key}'{hint}"


def _build(cls, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(source, f"'{prefix.rstrip('.') or 'config'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(source, _unknown(prefix + str(key), dict.fromkeys(names)))
    values = {}
    for name in names:
        if name not in data:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, data[name], f"{prefix}{name}.", source)
        else:
            values[name] = _coerce(data[name], kind, prefix + name, source)
            if prefix + name in _POSITIVE and values[name] is not None and values[name] <= 0:
                raise ConfigError(source, f"'{prefix}{name}' must be more than 0, got {values[name]!r}")
            _check_value(prefix + name, values[name], source)
    return cls(**values)


def _check_value(key: str, value: Any, source: str) -> None:
    """Refuse values a run would accept and then fail on, or misuse, later (when set, not
    after an hour of training: an overlap of 1.5 trains and then can never predict)."""
    if value is None:
        return
    if key.endswith("_prob") or key == "infer.overlap" or key == "data.val_fraction":
        top, closed = (1.0, True) if key.endswith("_prob") else (1.0, False)
        if not (0 <= value <= top if closed else 0 <= value < top):
            bound = "at most 1" if closed else "below 1"
            raise ConfigError(source, f"'{key}' must be at least 0 and {bound}, got {value!r}")
    if key in _POSITIVE_LISTS:
        if not value or any(v <= 0 for v in value):
            raise ConfigError(source, f"'{key}' must be a list of positive numbers, got {value!r}")
    if key == "model.channels" and len(value) < 2:
        raise ConfigError(source, f"'{key}' needs 2 or more levels, e.g. [16, 32, 64, 128]; got {value!r}")


_POSITIVE_LISTS = {"data.spacing", "data.patch_size", "model.channels"}


# Counts and budgets where 0 or less is a mistake (``train.epochs=-3`` would "train" no step).
_POSITIVE = {
    "train.epochs",
    "train.iters_per_epoch",
    "train.max_time",
    "train.batch_size",
    "train.val_every",
    "train.lr",
    "data.samples_per_volume",
}


def _coerce(value: Any, kind: Any, key: str, source: str) -> Any:
    """Check ``value`` against a type hint, converting ints to floats where floats are asked."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first alternative that fits; the last one explains
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, f"'{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key, source) for v in value]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and isinstance(value, kind):
        return value
    raise ConfigError(source, f"'{key}' must be {kind.__name__}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply ``key=value`` overrides.

    Args:
        path: YAML file; None for the built-in defaults.
        overrides: strings like ``"train.epochs=5"``.

    Example:
        >>> config = load_config(None, ["train.epochs=5"])
    """
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(path, "no such config file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(path, f"not valid YAML ({exc.__class__.__name__})") from None
        config = Config.from_dict(data or {}, source=str(path))
    return config.override(overrides or [])


def save_config(config: Config, path: str | Path) -> None:
    """Write the config as YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))
