"""Prediction: sliding-window inference with Gaussian blending, results on the input's own grid."""

from __future__ import annotations

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
from medseg.dicom import DicomSeries, write_dicom_seg
from medseg.errors import InputError
from medseg.io import channel_files, image_from_ras, read_channels, write_volume
from medseg.training.checkpoint import load_checkpoint, model_from_checkpoint

__all__ = ["sliding_window_probs", "Predictor"]


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


class Predictor:
    """Segment volumes with a trained checkpoint; masks come out on the input's exact grid.

    Args:
        checkpoint: a ``.pt`` file (or a run folder holding ``best.pt``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Example:
        >>> predictor = Predictor("runs/heart/best.pt")
        >>> predictor.predict_file("scan.nii.gz", "scan_mask.nii.gz")
        >>> mask = predictor.predict_image(medseg.read_volume("dicom_folder/"))
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        self.device = resolve_device(device)
        payload = load_checkpoint(checkpoint)
        self.labels: dict[int, str] = {int(k): v for k, v in payload["labels"].items()}
        self.config = Config.from_dict(payload["config"], source=str(checkpoint))
        self.plan = Plan.from_dict(payload["plan"], source=str(checkpoint))
        self.amp_dtype = autocast_dtype(self.device, self.config.train.precision)
        self.model = model_from_checkpoint(payload).to(self.device)
        self.channels_last = use_channels_last(
            self.config.train.channels_last, self.device, self.amp_dtype, self.model
        )
        if self.channels_last:
            self.model = self.model.to(memory_format=channels_last_format(self.plan.spatial_dims))
        self.transform = infer_transforms(self.plan)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every window has one size: tune its kernels once
        self.sw_batch_size = windows_per_forward(self.config.infer.sw_batch_size, self.device, self.amp_dtype)

    def predict_image(self, image: sitk.Image | list[sitk.Image]) -> np.ndarray:
        """Segment one image (or its channels, as a list on one grid); returns the label map in
        (i, j[, k]) order on the image's own grid."""
        channels = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(channels) != self.plan.channels:
            raise ValueError(f"has {len(channels)} channel(s); this model needs {self.plan.channels}")
        tensor = self.transform({"image": channels})["image"]
        probs = sliding_window_probs(
            self.model,
            tensor,
            self.config.data.patch_size,
            overlap=self.config.infer.overlap,
            sw_batch_size=self.sw_batch_size,
            amp_dtype=self.amp_dtype,
            channels_last=self.channels_last,
        )
        return self._to_input_grid(probs, tensor.affine.numpy(), channels[0])

    @staticmethod
    def _to_input_grid(probs: torch.Tensor, affine: np.ndarray, reference: sitk.Image) -> np.ndarray:
        """Resample probabilities from the network's grid onto the input grid, then argmax.

        Resampling happens in world coordinates, so any reorientation, respacing or obliquity
        between the two grids is undone exactly. All classes go through one resampling of a
        vector image, and the argmax reads the result in place.
        """
        dims = probs.ndim - 1
        # Channels last, as a vector image wants them: the one copy of the probabilities made here.
        channels_last = probs.float().permute(*range(1, dims + 1), 0).numpy()
        moving = image_from_ras(channels_last, affine)
        # Outside the network's grid every class reads 0, and the argmax of all zeros is 0:
        # background, as it should be.
        resampled = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
        labels = np.argmax(sitk.GetArrayViewFromImage(resampled), axis=-1).astype(np.uint8)
        return labels.transpose()

    def predict_file(
        self, source: str | Path | DicomSeries | list, output: str | Path, overwrite: bool = False
    ) -> Path:
        """Segment a file, a DICOM series, or a list of channel files, and write the mask to
        ``output`` on the (first) input's grid.

        The suffix of ``output`` picks the format; ``.dcm`` writes DICOM-SEG, which needs a
        DICOM series as the source.
        """
        dims = self.plan.spatial_dims
        if isinstance(source, DicomSeries):
            channels = read_channels(source.folder, spatial_dims=dims, series_uid=source.uid)
        else:
            channels = [c for f in channel_files(source) for c in read_channels(f, spatial_dims=dims)]
        image = channels[0]
        try:
            mask = self.predict_image(channels)
        except ValueError as exc:  # the wrong number of channels, said of the input it concerns
            where = source.folder if isinstance(source, DicomSeries) else channel_files(source)[0]
            raise InputError(where, str(exc)) from None
        if str(output).lower().endswith(".dcm"):
            if not isinstance(source, DicomSeries):
                raise InputError(source, "DICOM-SEG output needs a DICOM series as input")
            return write_dicom_seg(
                mask, source, self.labels, output, overwrite, algorithm=self.config.model.name
            )
        return write_volume(mask, output, image, overwrite=overwrite)
