"""Prediction: sliding-window inference with Gaussian blending, results on the input's own grid."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.config import Config
from medseg.data.plan import Plan
from medseg.data.transforms import infer_transforms
from medseg.device import (
    autocast_dtype,
    channels_last_format,
    resolve_device,
    use_channels_last,
    windows_per_forward,
)
from medseg.dicom import DicomSeries, read_series, write_dicom_seg
from medseg.errors import CheckpointError, InputError
from medseg.inference.cases import ChannelFiles
from medseg.io import channel_files, check_voxel_values, image_from_ras, read_channels, write_volume
from medseg.training.checkpoint import (
    checkpoint_file,
    file_sha256,
    load_checkpoint,
    model_from_checkpoint,
    weights_sha256,
)

__all__ = ["sliding_window_probs", "Predictor", "LoadedCase", "to_input_grid"]


@torch.inference_mode()
def sliding_window_probs(
    model: nn.Module,
    image: torch.Tensor,
    roi_size,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Class probabilities (C, *spatial) of one channel-first image, windows blended by a Gaussian.

    On a GPU the image goes to it once, the windows are cut and stitched there, and only the
    probabilities come back to the CPU.
    """
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"

    def run(window: torch.Tensor) -> torch.Tensor:
        if channels_last:
            window = window.contiguous(memory_format=channels_last_format(window.ndim - 2))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return model(window).float()

    logits = sliding_window_inference(
        torch.as_tensor(image)[None].float().to(device if on_gpu else "cpu"),
        roi_size=list(roi_size),
        sw_batch_size=sw_batch_size,
        predictor=run,
        overlap=overlap,
        mode="gaussian",
        sw_device=device,
        device=device if on_gpu else "cpu",
    )
    return torch.softmax(torch.as_tensor(logits)[0], dim=0).cpu()


@dataclass
class LoadedCase:
    """A case read, checked and preprocessed, ready for the network.

    Args:
        channels: the input as read (one image per channel, on one grid), NaNs replaced.
        tensor: the network's input (channels first, on the network's grid).
        source: what was read (for messages): a path, a DICOM series, or None for images.
        warnings: odd things about the input that did not stop it (constant, partly NaN).
    """

    channels: list[sitk.Image]
    tensor: torch.Tensor
    source: object = None
    warnings: list[str] = field(default_factory=list)

    @property
    def reference(self) -> sitk.Image:
        """The grid the mask is written on: the (first) input's."""
        return self.channels[0]


class Predictor:
    """Segment volumes with a trained checkpoint; masks come out on the input's exact grid.

    Args:
        checkpoint: a ``.pt`` file (or a run folder holding ``best.pt``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Example:
        >>> predictor = Predictor("runs/heart/best.pt")
        >>> predictor.predict_file("scan.nii.gz", "scan_mask.nii.gz")
        >>> mask, probs = predictor.predict("dicom_folder/", probabilities=True)
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        path = checkpoint_file(checkpoint)
        payload = load_checkpoint(path)
        if payload.get("kind") == "pretrain":
            raise CheckpointError(
                path,
                "is a pretraining checkpoint (it predicts noise, not labels): fine-tune it first "
                "with medseg train --init",
            )
        self._setup(
            model=model_from_checkpoint(payload),
            plan=Plan.from_dict(payload["plan"], source=str(checkpoint)),
            labels=payload["labels"],
            config=Config.from_dict(payload["config"], source=str(checkpoint)),
            device=device,
        )
        self.checkpoint, self.sha256 = str(path), file_sha256(path)

    @classmethod
    def from_model(
        cls, model: nn.Module, plan: Plan, labels: dict, *, config: Config | None = None, device: str = "auto"
    ) -> Predictor:
        """A predictor for a network built or trained in Python, without a checkpoint file.

        The predictor uses ``model`` itself (not a copy): it is put in eval mode on ``device``.

        Args:
            model: the network (its output channels are the classes, background first).
            plan: the preprocessing it was trained with (``trainer.plan``).
            labels: class index -> name, background included.
            config: prediction settings (window overlap, precision); default: medseg's.
            device: as for ``Predictor``.
        """
        config = copy.deepcopy(config) if config else Config()
        config.data.patch_size = list(plan.patch_size)
        predictor = cls.__new__(cls)
        predictor._setup(model=model.eval(), plan=plan, labels=labels, config=config, device=device)
        predictor.checkpoint, predictor.sha256 = None, weights_sha256(model)
        return predictor

    def _setup(self, *, model: nn.Module, plan: Plan, labels: dict, config: Config, device: str) -> None:
        self.device = resolve_device(device)
        self.labels: dict[int, str] = {int(k): v for k, v in labels.items()}
        self.config, self.plan = config, plan
        self.amp_dtype = autocast_dtype(self.device, config.train.precision)
        self.model = model.to(self.device)
        if hasattr(model, "fold_time"):  # segmentation runs at t = 0: no time embedding needed
            model.fold_time()
        self.channels_last = use_channels_last(config.train.channels_last, self.device, self.amp_dtype, model)
        if self.channels_last:
            self.model = self.model.to(memory_format=channels_last_format(plan.spatial_dims))
        self.transform = infer_transforms(plan)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every window has one size: tune its kernels once
        self.sw_batch_size = windows_per_forward(config.infer.sw_batch_size, self.device, self.amp_dtype)

    @property
    def options(self) -> dict:
        """The settings that shape a mask besides the weights (batch runs record them)."""
        return {"overlap": self.config.infer.overlap, "patch_size": list(self.config.data.patch_size)}

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
            channels = [c for f in channel_files(source) for c in read_channels(f, spatial_dims=dims)]
        where = _where(source)
        if len(channels) != self.plan.channels:
            raise InputError(where, f"has {len(channels)} channel(s); this model needs {self.plan.channels}")
        warnings = []
        checked = []
        for channel in channels:
            image, warning = check_voxel_values(channel, where)
            checked.append(image)
            warnings += [warning] if warning else []
        tensor = self.transform({"image": checked})["image"]
        return LoadedCase(checked, tensor, source, warnings)

    def segment(self, case: LoadedCase, probabilities: bool = False):
        """The label map of a loaded case on its input grid, in (i, j[, k]) order; with
        ``probabilities``, also the class probabilities there, shaped (classes, i, j[, k])."""
        probs = sliding_window_probs(
            self.model,
            case.tensor,
            self.config.data.patch_size,
            overlap=self.config.infer.overlap,
            sw_batch_size=self.sw_batch_size,
            amp_dtype=self.amp_dtype,
            channels_last=self.channels_last,
        )
        return to_input_grid(probs, case.tensor.affine.numpy(), case.reference, probabilities)

    def predict(self, source, *, probabilities: bool = False):
        """Segment one case (see ``load`` for what ``source`` may be).

        Returns:
            The label map (uint8, (i, j[, k]) order, on the input's grid); with
            ``probabilities``, ``(labels, probs)`` where probs is float32 (classes, i, j[, k]).
        """
        return self.segment(self.load(source), probabilities)

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
                mask, case.source, self.labels, output, overwrite, algorithm=self.config.model.name
            )
        return write_volume(mask, output, case.reference, overwrite=overwrite)

    def predict_file(self, source, output: str | Path, overwrite: bool = False) -> Path:
        """Segment a file, a DICOM series, or a list of channel files, and write the mask to
        ``output`` on the (first) input's grid."""
        case = self.load(source)
        return self.write(self.segment(case), case, output, overwrite)


def _where(source) -> str | None:
    """The path to name in an error about ``source``."""
    if isinstance(source, DicomSeries):
        return str(source.folder)
    if isinstance(source, (str, Path, ChannelFiles)):
        return channel_files(source)[0]
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], (str, Path)):
        return str(source[0])
    return None


def to_input_grid(
    probs: torch.Tensor, affine: np.ndarray, reference: sitk.Image, probabilities: bool = False
):
    """Resample probabilities from the network's grid onto the input grid, then argmax.

    Resampling happens in world coordinates, so any reorientation, respacing or obliquity
    between the two grids is undone exactly. All classes go through one resampling of a
    vector image, and the argmax reads the result in place.

    Returns:
        The label map in (i, j[, k]) order; with ``probabilities``, also the resampled
        probabilities as (classes, i, j[, k]).
    """
    dims = probs.ndim - 1
    # Channels last, as a vector image wants them: the one copy of the probabilities made here.
    channels_last = probs.float().permute(*range(1, dims + 1), 0).numpy()
    moving = image_from_ras(channels_last, affine)
    # Outside the network's grid every class reads 0, and the argmax of all zeros is 0:
    # background, as it should be.
    resampled = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    view = sitk.GetArrayViewFromImage(resampled)  # (k, j, i, classes)
    labels = np.argmax(view, axis=-1).astype(np.uint8).transpose()
    if not probabilities:
        return labels
    return labels, np.ascontiguousarray(np.moveaxis(view, -1, 0).transpose(0, *range(dims, 0, -1)))
