"""Sliding-window inference: the class probabilities of one image, windows blended by a
Gaussian. Training's validation and the Predictor both run it.

The windows, their order and their Gaussian weights are MONAI's ``sliding_window_inference``'s
(mode ``gaussian``, sigma an eighth of the window, weights floored at 1e-3; windows a fraction
``overlap`` apart, the last one moved back to end at the image's edge; an image smaller than
the window zero-padded around it), so the probabilities are the same to float rounding (the
tests compare the two). It is written here so that prediction does not import MONAI, which
imports every submodule it has (2.3 s of each process's start).
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
import torch.nn.functional as F
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
        logits = blend_windows(
            torch.as_tensor(image).float().to(where), roi_size, run, overlap, sw_batch_size, device
        )
        return torch.softmax(logits, dim=0).cpu()

    return stitch_with_fallback(stitch, device)


def blend_windows(image: torch.Tensor, roi_size, run, overlap: float, batch: int, device) -> torch.Tensor:
    """The Gaussian-weighted mean of ``run``'s outputs over windows of ``roi_size`` that cover
    ``image`` (C, *spatial): logits (classes, *spatial), on ``image``'s device. Windows go to
    ``device`` ``batch`` at a time."""
    size = image.shape[1:]
    short = [max(r - s, 0) for r, s in zip(roi_size, size)]
    if any(short):  # F.pad lists the last axis first
        image = F.pad(image, [p for n in reversed(short) for p in (n // 2, n - n // 2)])
    padded = image.shape[1:]
    weight = gaussian_weights(roi_size, image.device)
    total = count = None
    corners = list(itertools.product(*[window_starts(n, r, overlap) for n, r in zip(padded, roi_size)]))
    for first in range(0, len(corners), batch):
        chunk = corners[first : first + batch]
        where = [tuple(slice(c, c + r) for c, r in zip(corner, roi_size)) for corner in chunk]
        out = run(torch.stack([image[(slice(None), *w)] for w in where]).to(device)).to(image.device)
        if total is None:
            total = torch.zeros((out.shape[1], *padded), dtype=torch.float32, device=image.device)
            count = torch.zeros(padded, dtype=torch.float32, device=image.device)
        for logits, w in zip(out, where):
            total[(slice(None), *w)] += logits * weight
            count[w] += weight
    total /= count
    keep = [slice(n // 2, n // 2 + s) for n, s in zip(short, size)]
    return total[(slice(None), *keep)]


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Where windows of ``roi`` start along an axis of ``size`` (>= ``roi``): ``roi`` times
    1 - ``overlap`` apart, the last one moved back to end at the edge."""
    step = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = next((k for k in range(math.ceil(size / step)) if k * step + roi >= size), 0) + 1
    return [min(k * step, size - roi) for k in range(count)]


def gaussian_weights(roi_size, device) -> torch.Tensor:
    """A window's blending weights: a Gaussian of sigma roi / 8 about the window's centre,
    floored at 1e-3 so that every voxel counts a little."""
    weights = torch.ones((), device=device)
    for n in roi_size:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        weights = weights.unsqueeze(-1) * torch.exp(x**2 / (-2 * (n * 0.125) ** 2))
    return weights.clamp_(min=max(weights.min().item(), 1e-3))


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
