"""Prediction: sliding-window inference with Gaussian blending, flip TTA and ensembles,
post-processing, and results on the input's own grid."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from medseg.checkpoint import Checkpoint, checkpoint_files, file_sha256, weights_sha256
from medseg.config import Config
from medseg.data.plan import Plan
from medseg.device import (
    autocast_dtype,
    channels_last_format,
    precision_name,
    resolve_device,
    use_channels_last,
    windows_per_forward,
)
from medseg.dicom import DicomSeries, read_series, write_dicom_seg
from medseg.errors import CheckpointError, ConfigError, InputError
from medseg.inference.cases import ChannelFiles
from medseg.inference.grid import onto_network_grid, resample_onto, to_input_grid
from medseg.inference.model_folder import is_exported, load_exported
from medseg.inference.postprocess import keep_largest_component, keep_largest_labels
from medseg.inference.preprocess import network_input
from medseg.inference.runtime import is_runtime_network, runtime_of
from medseg.inference.tta import (
    TTA_MIN_GAIN,
    ProbabilityMean,
    flip_passes,
    mirrored_pass,
    resolve_mirrors,
    tta_axes,
    tta_by_default,
)
from medseg.io import check_voxel_values, image_files, read_channels, write_volume
from medseg.models.factory import model_from_checkpoint

log = logging.getLogger(__name__)

__all__ = ["Predictor", "LoadedCase", "Segmentation", "Member"]


@dataclass
class LoadedCase:
    """A case read, checked and preprocessed, ready for the networks.

    Args:
        channels: the input as read (one image per channel, on one grid), NaNs replaced.
        tensors: the networks' inputs (channels first, on each network's grid): one per member
            of the predictor, shared by members with the same plan.
        affines: each tensor's grid (RAS affine).
        source: what was read (for messages): a path, a DICOM series, or None for images.
        warnings: odd things about the input that did not stop it (constant, partly NaN).
    """

    channels: list[sitk.Image]
    tensors: list[torch.Tensor]
    affines: list[np.ndarray]
    source: object = None
    warnings: list[str] = field(default_factory=list)

    @property
    def reference(self) -> sitk.Image:
        """The grid the mask is written on: the (first) input's."""
        return self.channels[0]

    @property
    def tensor(self) -> torch.Tensor:
        """The first network's input."""
        return self.tensors[0]

    @property
    def affine(self) -> np.ndarray:
        """The first network's grid."""
        return self.affines[0]


@dataclass
class Segmentation:
    """A case's results on its input grid.

    Args:
        labels: the label map (uint8, (i, j[, k])), post-processed.
        probabilities: the mean class probabilities (before post-processing), float32
            (i, j[, k], classes), background first; only when asked for.
        uncertainty: where the passes (TTA mirrors, ensemble members) disagree, as a SimpleITK
            image: the mutual information over log(classes), 0 (all agree) to 1; only when
            asked for.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    uncertainty: sitk.Image | None = None

    def probability_array(self) -> np.ndarray:
        """A float32 copy of the probabilities, shaped (classes, i, j[, k])."""
        if self.probabilities is None:
            raise ValueError("segmented without probabilities=True")
        return np.ascontiguousarray(np.moveaxis(self.probabilities, -1, 0))


@dataclass
class Member:
    """One network of a predictor; several make an ensemble, whose probabilities are averaged."""

    model: nn.Module
    plan: Plan
    sha256: str
    channels_last: bool = False
    precision: str | None = None  # an exported network's, set by its runtime; else the predictor's


class Predictor:
    """Segment volumes with one trained checkpoint or an ensemble; results come out on the
    input's exact grid.

    Args:
        checkpoint: a ``.pt`` file, a run folder (its ``best.pt``), a cross-validation folder
            (every ``fold_K/best.pt``), or a list of these: an ensemble averages its members'
            probabilities. Members must share labels and channels; the first one's
            ``infer`` settings apply.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        tta: flip test-time augmentation; None: the checkpoint's ``infer.tta`` (whose null
            means on for models trained with mirroring).
        keep_largest: ``all``, ``none`` or label indices to keep only the largest piece of,
            or ``auto`` (what training's validation chose); None: the checkpoint's
            ``infer.keep_largest``.
        which: ``best`` or ``last``: the checkpoint a run folder gives.
        folds: of a cross-validation folder, these folds only (None: every fold).
        overlap: of neighbouring sliding windows, 0 to below 1; None: the checkpoint's
            ``infer.overlap``.
        precision: ``auto``, ``fp32`` or ``bf16``; None: the checkpoint's ``train.precision``.
        tta_mirrors: ``all``, ``single`` or ``auto``: which mirrors TTA passes (see
            ``InferConfig``); None: the checkpoint's ``infer.tta_mirrors``.
        runtime: for exported models (``medseg export``): ``auto`` (OpenVINO where it is
            installed, else ONNX Runtime), ``openvino`` or ``onnxruntime``.

    Example:
        >>> predictor = Predictor("runs/heart/best.pt")
        >>> predictor.predict_file("scan.nii.gz", "scan_mask.nii.gz")
        >>> mask, probs = predictor.predict("dicom_folder/", probabilities=True)
        >>> ensemble = Predictor("runs/cv", tta=True)  # every fold_K/best.pt, mirrored passes
        >>> deployed = Predictor("model/")  # a folder medseg export wrote; runs on the CPU
        >>> result = ensemble.segment(ensemble.load("scan.nii.gz"), uncertainty=True)
    """

    def __init__(
        self,
        checkpoint,
        device: str = "auto",
        *,
        tta: bool | None = None,
        keep_largest=None,
        which: str = "best",
        folds: list[int] | None = None,
        overlap: float | None = None,
        precision: str | None = None,
        runtime: str = "auto",
        tta_mirrors: str | None = None,
    ):
        paths = checkpoint_files(checkpoint, which, folds)
        members, labels, config, decided, tta_gain = [], None, None, None, None
        for path in paths:
            if is_exported(path):
                found, model, sha256 = load_exported(path, runtime)
            else:
                found = Checkpoint.load(path)
                model, sha256 = model_from_checkpoint(found), file_sha256(path)
            members.append(Member(model, found.preprocessing(), sha256))
            labels = _same_labels(labels, found.labels, path)
            if config is None:
                config = found.settings()
                decided = found.keep_largest  # what training chose for "auto"
                tta_gain = found.tta_gain  # what TTA added to its validation Dice
        if overlap is not None:
            config = config.override([f"infer.overlap={overlap}"])  # checked as --set would be
        if precision is not None:
            config = config.override([f"train.precision={precision}"])
        if tta_mirrors is not None:
            config = config.override([f"infer.tta_mirrors={tta_mirrors}"])
        if device == "auto" and all(is_runtime_network(m.model) for m in members):
            device = "cpu"  # where exported networks run, though a GPU be present
        self._setup(members, labels, config, device, tta, keep_largest, decided, tta_gain)
        self.checkpoints = [str(p) for p in paths]
        self.checkpoint = self.checkpoints[0] if len(paths) == 1 else ";".join(self.checkpoints)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        plan: Plan,
        labels: dict,
        *,
        config: Config | None = None,
        device: str = "auto",
        tta: bool | None = None,
        keep_largest=None,
    ) -> Predictor:
        """A predictor for a network built or trained in Python, without a checkpoint file.

        The predictor uses ``model`` itself (not a copy): it is put in eval mode on ``device``.

        Args:
            model: the network (its output channels are the classes, background first).
            plan: the preprocessing it was trained with (``trainer.plan``).
            labels: class index -> name, background included.
            config: prediction settings (``infer.*``, precision, flip axes); default: medseg's.
            device, tta, keep_largest: as for ``Predictor``.
        """
        config = copy.deepcopy(config) if config else Config()
        predictor = cls.__new__(cls)
        member = Member(model.eval(), plan, weights_sha256(model))
        predictor._setup([member], {int(k): v for k, v in labels.items()}, config, device, tta, keep_largest)
        predictor.checkpoints, predictor.checkpoint = [], None
        return predictor

    def _setup(
        self,
        members: list[Member],
        labels: dict,
        config: Config,
        device: str,
        tta,
        keep_largest,
        decided=None,
        tta_gain=None,
    ):
        self.device = resolve_device(device)
        self.labels: dict[int, str] = labels
        self.config, self.members = config, members
        self.plan = members[0].plan
        for member in members[1:]:
            _check_compatible(self.plan, member.plan)
        self.amp_dtype = autocast_dtype(self.device, config.train.precision)
        for member in members:
            member.model = member.model.to(self.device)
            if is_runtime_network(member.model):
                member.precision = self._prepare_exported(member.model)
                continue
            if hasattr(member.model, "fold_time"):  # at its one timestep: no time embedding
                member.model.fold_time()
            member.channels_last = use_channels_last(
                config.train.channels_last, self.device, self.amp_dtype, member.model
            )
            if member.channels_last:
                member.model = member.model.to(memory_format=channels_last_format(member.plan.network_dims))
        self.model = members[0].model
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every window has one size: tune its kernels once
        self.sw_batch_size = windows_per_forward(config.infer.sw_batch_size, self.device, self.amp_dtype)
        if tta is None:
            tta = tta_by_default(config, tta_gain)
            if not tta and config.infer.tta is None and config.augment.flip_prob > 0:
                log.info(
                    "flip TTA is off: it changed this model's validation Dice by %+.4f in training "
                    "(under %.3f); --tta turns it on",
                    tta_gain,
                    TTA_MIN_GAIN,
                )
        self.tta = bool(tta)
        self.tta_axes = tta_axes(config, self.plan) if self.tta else []
        self.tta_mirrors = resolve_mirrors(config.infer.tta_mirrors, self.tta_axes)
        self.flips = flip_passes(self.tta_axes, self.tta_mirrors)
        setting = config.infer.keep_largest if keep_largest is None else keep_largest
        self.keep_largest = keep_largest_labels(setting, self.labels, decided)

    def _prepare_exported(self, model: nn.Module) -> str:
        """Compile an exported network for the CPU in the precision resolved for it."""
        if self.device.type != "cpu":
            raise ConfigError("--device", f"an exported model runs on the CPU, not on {self.device.type}")
        return runtime_of(model).prepare(self.amp_dtype)

    @property
    def sha256(self) -> str:
        """The SHA-256 of the checkpoint; of an ensemble, of its members' SHA-256s in order."""
        if len(self.members) == 1:
            return self.members[0].sha256
        return hashlib.sha256("\n".join(m.sha256 for m in self.members).encode()).hexdigest()

    @property
    def passes(self) -> int:
        """Network passes per case: mirrors x members."""
        return len(self.flips) * len(self.members)

    @property
    def options(self) -> dict:
        """The settings that shape a mask besides the weights (batch runs record them)."""
        return {
            "overlap": self.config.infer.overlap,
            "patch_size": list(self.plan.patch_size),
            "tta_axes": list(self.tta_axes) if self.tta else None,
            # Recorded when one axis at a time: absent for every combination, as before there
            # was a choice, so the masks of earlier batch runs still count as this setting's.
            **({"tta_mirrors": "single"} if self.tta and self.tta_mirrors == "single" else {}),
            "keep_largest": self.keep_largest,
            # bf16 and fp32, or a GPU's kernels and a CPU's, can differ in a few voxels
            "precision": "+".join(
                sorted({m.precision or precision_name(self.amp_dtype) for m in self.members})
            ),
            "device": self.device.type,
        }

    def check_uncertainty(self) -> None:
        """Raise ``ConfigError`` unless there are passes to disagree: TTA or an ensemble."""
        if self.passes < 2:
            raise ConfigError(
                "uncertainty", "needs flip TTA or several models: a single pass has nothing to disagree with"
            )

    def load(self, source) -> LoadedCase:
        """Read, check and preprocess a case (safe to run in a second thread while the network
        works on the previous one).

        Args:
            source: an image file, a DICOM folder or ``DicomSeries``, a list of channel files, or
                SimpleITK image(s).

        Raises:
            InputError: unreadable, the wrong dimensions or number of channels, or all NaN.
        """
        dims = self.plan.spatial_dims
        if isinstance(source, sitk.Image):
            source = [source]
        if isinstance(source, DicomSeries):
            image = read_series(source)
            if image.GetDimension() != dims:
                raise InputError(
                    source.folder, f"is {image.GetDimension()}D; this model needs {dims}D images"
                )
            channels = [image]
        elif isinstance(source, (list, tuple)) and all(isinstance(c, sitk.Image) for c in source):
            channels = list(source)
        else:
            channels = [c for f in image_files(source) for c in read_channels(f, spatial_dims=dims)]
        where = _where(source)
        if len(channels) != self.plan.channels:
            raise InputError(where, f"has {len(channels)} channel(s); this model needs {self.plan.channels}")
        warnings = []
        checked = []
        for channel in channels:
            image, warning = check_voxel_values(channel, where)
            checked.append(image)
            warnings += [warning] if warning else []
        # One preprocessing per distinct plan: the members of a cross-validation share one.
        prepared = {}
        for member in self.members:
            key = _plan_key(member.plan)
            if key not in prepared:
                prepared[key] = network_input(checked, member.plan)
        tensors, affines = zip(*(prepared[_plan_key(m.plan)] for m in self.members))
        return LoadedCase(checked, list(tensors), list(affines), source, warnings)

    @torch.inference_mode()
    def network_probabilities(self, case: LoadedCase, uncertainty: bool = False):
        """The mean class probabilities over every pass (mirrors x members), on the first
        member's network grid, (C, *spatial); with ``uncertainty``, also the passes'
        disagreement there (*spatial), 0..1."""
        if uncertainty:
            self.check_uncertainty()
        mean = ProbabilityMean(disagreement=uncertainty)
        first = case.tensors[0]
        for member, tensor, affine in zip(self.members, case.tensors, case.affines):
            for axes in self.flips:
                probs = mirrored_pass(
                    member.model,
                    tensor,
                    axes,
                    member.plan.window_size,
                    overlap=self.config.infer.overlap,
                    sw_batch_size=self.sw_batch_size,
                    amp_dtype=self.amp_dtype,
                    channels_last=member.channels_last,
                )
                if tensor is not first:
                    probs = onto_network_grid(probs, affine, case.affine, first.shape[1:])
                mean.add(probs)
        probs = mean.mean()
        return (probs, mean.disagreement(probs)) if uncertainty else probs

    def segment(
        self, case: LoadedCase, *, probabilities: bool = False, uncertainty: bool = False
    ) -> Segmentation:
        """Segment a loaded case: the label map on its input grid, post-processed; with
        ``probabilities`` and ``uncertainty``, also those maps there (see ``Segmentation``)."""
        found = self.network_probabilities(case, uncertainty)
        probs, disagreement = found if uncertainty else (found, None)
        affine = case.affine
        if probabilities:
            labels, kept = to_input_grid(probs, affine, case.reference, probabilities=True)
        else:
            labels, kept = to_input_grid(probs, affine, case.reference), None
        del probs
        keep_largest_component(labels, self.keep_largest)
        spread = resample_onto(disagreement, affine, case.reference) if uncertainty else None
        return Segmentation(labels, kept, spread)

    def predict(self, source, *, probabilities: bool = False):
        """Segment one case (see ``load`` for what ``source`` may be).

        Returns:
            The label map (uint8, (i, j[, k]) order, on the input's grid); with
            ``probabilities``, ``(labels, probs)`` where probs is float32 (classes, i, j[, k]).
            For uncertainty maps, use ``segment(load(source), uncertainty=True)``.
        """
        result = self.segment(self.load(source), probabilities=probabilities)
        return (result.labels, result.probability_array()) if probabilities else result.labels

    def predict_image(self, image: sitk.Image | list[sitk.Image]) -> np.ndarray:
        """Segment one image (or its channels, as a list on one grid); returns the label map."""
        return self.predict(image)

    def write(self, mask: np.ndarray, case: LoadedCase, output: str | Path, overwrite: bool = False) -> Path:
        """Write a mask on its case's grid. The suffix of ``output`` picks the format; ``.dcm``
        writes DICOM-SEG, which needs a DICOM series as the source."""
        if str(output).lower().endswith(".dcm"):
            if not isinstance(case.source, DicomSeries):
                raise InputError(_where(case.source), "DICOM-SEG output needs a DICOM series as input")
            return write_dicom_seg(
                mask,
                case.source,
                self.labels,
                output,
                overwrite,
                algorithm=self.config.model.name,
                model_sha256=self.sha256,
            )
        return write_volume(mask, output, case.reference, overwrite=overwrite)

    def predict_file(self, source, output: str | Path, overwrite: bool = False) -> Path:
        """Segment a file, a DICOM series, or a list of channel files, and write the mask to
        ``output`` on the (first) input's grid."""
        case = self.load(source)
        return self.write(self.segment(case).labels, case, output, overwrite)


def _plan_key(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), sort_keys=True)


def _same_labels(known: dict | None, labels: dict, path) -> dict:
    labels = {int(k): v for k, v in labels.items()}
    if known is not None and labels != known:
        raise CheckpointError(path, f"has labels {labels}; the first model of the ensemble has {known}")
    return labels


def _check_compatible(first: Plan, other: Plan) -> None:
    for what in ("channels", "spatial_dims"):
        if getattr(first, what) != getattr(other, what):
            raise CheckpointError(
                "ensemble", f"its models differ in {what} ({getattr(first, what)} and {getattr(other, what)})"
            )


def _where(source) -> str | None:
    """The path to name in an error about ``source``."""
    if isinstance(source, DicomSeries):
        return str(source.folder)
    if isinstance(source, (str, Path, ChannelFiles)):
        return image_files(source)[0]
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], (str, Path)):
        return str(source[0])
    return None
