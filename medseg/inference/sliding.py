"""Sliding-window inference: the class probabilities of one image, windows blended by a
Gaussian. Training's validation and the Predictor both run it."""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.device import channels_last_format

__all__ = ["sliding_window_probs"]


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
