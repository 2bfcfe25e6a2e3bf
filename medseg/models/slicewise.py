"""A 2D network that segments a volume slice by slice (nnU-Net's ``2d`` configuration).

Thick-slice scans (cine MRI: 6-18 slices 5-10 mm apart) carry little information across slices;
a 2D network sees each slice on its own and costs a third of a 3D one per voxel. Wrapping it to
take and return volumes keeps the rest of medseg 3D: the same preprocessing, patch sampling,
sliding window and return to the input grid.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SliceWise"]


class SliceWise(nn.Module):
    """Apply a 2D network to every slice of (B, C, X, Y, Z) volumes across one axis.

    The slices are folded into the batch, so a patch of k slices is k samples for the 2D network
    (and for its batch norm).

    Args:
        net: a 2D network taking ``(N, C, H, W)`` and optionally ``t``.
        axis: the spatial axis (0, 1 or 2) that the slices are taken across.

    Example:
        >>> from medseg.models.unet import UNet
        >>> net = SliceWise(UNet(2, 1, 4, channels=(8, 16)), axis=2)
        >>> net(torch.zeros(1, 1, 32, 32, 5)).shape
        torch.Size([1, 4, 32, 32, 5])
    """

    spatial_dims = 3

    def __init__(self, net: nn.Module, axis: int):
        super().__init__()
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, not {axis}")
        self.net = net
        self.axis = axis

    @property
    def timestep(self) -> int:
        return self.net.timestep

    @timestep.setter
    def timestep(self, value: int) -> None:
        self.net.timestep = value

    def fold_time(self, t: float | None = None) -> None:
        """See ``UNet.fold_time``."""
        self.net.fold_time(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None):
        """Logits (B, classes, X, Y, Z) for ``x`` of shape (B, C, X, Y, Z)."""
        if x.ndim != 5:
            raise ValueError(f"expected a volume (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        dim = self.axis + 2
        batch, slices = x.shape[0], x.shape[dim]
        if slices == 1:  # a training patch: one slice, no folding (a quarter of a step's time)
            out = self.net(x.squeeze(dim).contiguous(memory_format=self._format()), t)
            return [o.unsqueeze(dim) for o in out] if isinstance(out, list) else out.unsqueeze(dim)
        flat = x.movedim(dim, 1).reshape(batch * slices, *x.shape[1:dim], *x.shape[dim + 1 :])
        flat = flat.contiguous(memory_format=self._format())
        if t is not None:
            t = torch.as_tensor(t, device=x.device).reshape(-1).expand(batch).repeat_interleave(slices)
        out = self.net(flat, t)

        def unfold(logits: torch.Tensor) -> torch.Tensor:
            return logits.reshape(batch, slices, *logits.shape[1:]).movedim(1, dim)

        return [unfold(o) for o in out] if isinstance(out, list) else unfold(out)

    def _format(self) -> torch.memory_format:
        """Channels-last where the 2D layers were converted to it: they want their input so."""
        weight = next((p for p in self.net.parameters() if p.ndim == 4), None)
        if weight is not None and weight.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        return torch.contiguous_format
