"""The U-Net models and ``build_model``, their one constructor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medseg.models.blocks import DoubleConv, conv

__all__ = ["UNet", "build_model", "MODELS"]


def _strides(spatial_dims: int, levels: int, strides) -> list[tuple[int, ...]]:
    if strides is None:
        return [(2,) * spatial_dims] * (levels - 1)
    strides = [tuple([s] * spatial_dims) if isinstance(s, int) else tuple(s) for s in strides]
    if len(strides) != levels - 1 or any(len(s) != spatial_dims for s in strides):
        raise ValueError(
            f"strides needs {levels - 1} entries of {spatial_dims} values "
            f"(one per down-sampling), got {strides}"
        )
    return strides


class UNet(nn.Module):
    """The classic U-Net (Ronneberger et al. 2015): double convs, max-pool down,
    transposed-conv up, concatenated skips; channels grow per level.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes (background included).
        channels: features per level, e.g. ``(32, 64, 128, 256)``; depth is its length.
        strides: down-sampling factor per level after the first, an int or one per axis,
            e.g. ``[(2, 2, 1), 2, 2]`` to keep thick slices at first. Default 2 everywhere.
        norm: ``batch``, ``instance`` or ``group``.
        dropout: dropout probability in each conv block.

    Example:
        >>> net = UNet(3, 1, 4, channels=(16, 32, 64))
        >>> net(torch.zeros(1, 1, 32, 32, 16)).shape
        torch.Size([1, 4, 32, 32, 16])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        strides=None,
        norm: str = "instance",
        dropout: float = 0.0,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.strides = _strides(spatial_dims, len(channels), strides)
        pool = (nn.MaxPool2d, nn.MaxPool3d)[spatial_dims - 2]
        up = (nn.ConvTranspose2d, nn.ConvTranspose3d)[spatial_dims - 2]

        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = in_channels
        for level, cout in enumerate(channels):
            if level > 0:
                self.pools.append(pool(self.strides[level - 1]))
            self.encoders.append(DoubleConv(spatial_dims, cin, cout, norm, dropout))
            cin = cout
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(len(channels) - 1)):
            stride = self.strides[level]
            self.ups.append(up(channels[level + 1], channels[level], stride, stride=stride))
            self.decoders.append(
                DoubleConv(spatial_dims, 2 * channels[level], channels[level], norm, dropout)
            )
        self.head = conv(spatial_dims, channels[0], out_channels, 1)

    @property
    def size_factor(self) -> tuple[int, ...]:
        """Each input axis must be a multiple of this."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(self.spatial_dims))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``x`` of shape (B, C, *spatial). ``t`` (a diffusion timestep) is ignored here."""
        self._check_size(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pools[level - 1](x)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for up, decoder in zip(self.ups, self.decoders):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)

    def _check_size(self, x: torch.Tensor) -> None:
        spatial = tuple(x.shape[2:])
        if len(spatial) != self.spatial_dims:
            raise ValueError(
                f"expected a {self.spatial_dims}D input (B, C, *spatial), got shape {tuple(x.shape)}"
            )
        factor = self.size_factor
        if any(s % f for s, f in zip(spatial, factor)):
            fit = tuple(math.ceil(s / f) * f for s, f in zip(spatial, factor))
            raise ValueError(
                f"input size {spatial} does not fit this network: each axis must be a multiple of {factor}; "
                f"pad to {fit}"
            )


MODELS = {"unet": UNet}


def build_model(name: str, spatial_dims: int, in_channels: int, out_channels: int, **options) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of ``MODELS`` (``unet``).
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes, background included.
        **options: the model's own options (``channels``, ``strides``, ``norm``, ``dropout``).

    Example:
        >>> net = build_model("unet", spatial_dims=3, in_channels=1, out_channels=4, channels=(16, 32))
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](spatial_dims, in_channels, out_channels, **options)
