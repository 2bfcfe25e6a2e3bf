"""Building blocks of the U-Nets, each in 2D or 3D by ``spatial_dims``."""

from __future__ import annotations

from torch import nn

__all__ = ["conv", "norm", "ConvNormAct", "DoubleConv"]


def conv(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return (nn.Conv2d, nn.Conv3d)[spatial_dims - 2](*args, **kwargs)


def norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """A normalisation layer: ``batch``, ``instance`` (affine) or ``group`` (8 groups or fewer)."""
    if kind == "batch":
        return (nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 2](channels)
    if kind == "instance":
        return (nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial_dims - 2](channels, affine=True)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be batch, instance or group, not {kind!r}")


class ConvNormAct(nn.Sequential):
    """3x3(x3) convolution, normalisation, ReLU (and dropout if asked)."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, norm_kind: str, dropout: float = 0.0):
        layers = [
            conv(spatial_dims, cin, cout, 3, padding=1, bias=False),
            norm(norm_kind, spatial_dims, cout),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append((nn.Dropout2d, nn.Dropout3d)[spatial_dims - 2](dropout))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """The classic U-Net level: two ConvNormAct in a row."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, norm_kind: str, dropout: float = 0.0):
        super().__init__(
            ConvNormAct(spatial_dims, cin, cout, norm_kind, dropout),
            ConvNormAct(spatial_dims, cout, cout, norm_kind, dropout),
        )
