"""Sliding-window inference: the class probabilities of one image, windows blended by a
Gaussian. Training's validation and the Predictor both run it."""

from __future__ import annotations

import logging

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.device import channels_last_format

__all__ = ["sliding_window_probs", "stitch_with_fallback", "MAX_WINDOW_SLICES"]

log = logging.getLogger(__name__)

MAX_WINDOW_SLICES = 32  # a window's extent along an axis given as 0 (a 2D network's slices)


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

    An axis of ``roi_size`` given as 0 takes the image's extent along it, up to
    ``MAX_WINDOW_SLICES``: a 2D network on slices segments a slab of them per forward.
    On a GPU the image goes to it once, the windows are cut and stitched there, and only the
    probabilities come back to the CPU; when they do not fit, they are stitched on the CPU.
    """
    device = next(model.parameters()).device

    def run(window: torch.Tensor) -> torch.Tensor:
        if channels_last:
            window = window.contiguous(memory_format=channels_last_format(window.ndim - 2))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return model(window).float()

    size = image.shape[1:]
    roi_size = [r if r > 0 else min(s, MAX_WINDOW_SLICES) for r, s in zip(roi_size, size)]

    def stitch(where) -> torch.Tensor:
        logits = sliding_window_inference(
            torch.as_tensor(image)[None].float().to(where),
            roi_size=roi_size,
            sw_batch_size=sw_batch_size,
            predictor=run,
            overlap=overlap,
            mode="gaussian",
            sw_device=device,
            device=where,
        )
        return torch.softmax(torch.as_tensor(logits)[0], dim=0).cpu()

    return stitch_with_fallback(stitch, device)


def stitch_with_fallback(stitch, device: torch.device) -> torch.Tensor:
    """``stitch(device)`` on a GPU, and ``stitch("cpu")`` when the whole volume's logits do not
    fit there (a large CT beside another job): the windows still run on the GPU, only the
    stitching moves. On a CPU, ``stitch("cpu")``."""
    if device.type != "cuda":
        return stitch("cpu")
    try:
        return stitch(device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        log.warning("the volume's probabilities do not fit in GPU memory; stitching them on the CPU")
        return stitch("cpu")
