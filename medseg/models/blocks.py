"""Building blocks of the U-Nets, each in 2D or 3D by ``spatial_dims``.

Every block that can be time-conditioned takes an optional embedding ``emb`` (B, time_dim) and
applies it as FiLM: the normalised features are scaled and shifted per channel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "conv",
    "norm",
    "timestep_embedding",
    "TimeEmbedding",
    "FiLM",
    "ConvNormAct",
    "DoubleConv",
    "ResBlock",
    "AttentionGate",
    "SelfAttention",
]


def conv(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return (nn.Conv2d, nn.Conv3d)[spatial_dims - 2](*args, **kwargs)


def norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """A normalisation layer: ``batch``, ``instance`` (affine) or ``group`` (up to 8 groups)."""
    if kind == "batch":
        return (nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 2](channels)
    if kind == "instance":
        return (nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial_dims - 2](channels, affine=True)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be batch, instance or group, not {kind!r}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and DDPM.

    Args:
        t: shape (B,).
        dim: embedding size (even).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP."""

    def __init__(self, base_dim: int, time_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.base_dim))


class FiLM(nn.Module):
    """Per-channel scale and shift from an embedding; starts as the identity."""

    def __init__(self, time_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * channels))
        nn.init.zeros_(self.proj[1].weight)
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(emb).view(emb.shape[0], -1, *([1] * (x.ndim - 2))).chunk(2, dim=1)
        return x * (1 + scale) + shift

    @torch.no_grad()
    def fold_into(self, norm_layer: nn.Module, emb: torch.Tensor) -> None:
        """Make ``norm_layer`` (the affine norm right before this FiLM) also apply this FiLM's
        scale and shift for the one embedding ``emb``: norm(x) * (1 + s) + h equals a norm with
        weight w (1 + s) and bias b (1 + s) + h."""
        scale, shift = self.proj(emb[:1]).reshape(2, -1)
        norm_layer.weight.mul_(1 + scale)
        norm_layer.bias.mul_(1 + scale).add_(shift)


class ConvNormAct(nn.Module):
    """3x3(x3) convolution (strided if asked), normalisation, optional FiLM, ReLU, optional dropout."""

    def __init__(
        self,
        spatial_dims: int,
        cin: int,
        cout: int,
        norm_kind: str,
        dropout: float = 0.0,
        time_dim: int | None = None,
        stride=1,
    ):
        super().__init__()
        self.conv = conv(spatial_dims, cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm = norm(norm_kind, spatial_dims, cout)
        self.film = FiLM(time_dim, cout) if time_dim else None
        self.act = nn.ReLU(inplace=True)
        self.drop = (nn.Dropout2d, nn.Dropout3d)[spatial_dims - 2](dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(self.conv(x))
        if self.film is not None and emb is not None:
            x = self.film(x, emb)
        return self.drop(self.act(x))


class DoubleConv(nn.Module):
    """The classic U-Net level: two ConvNormAct in a row."""

    def __init__(self, spatial_dims, cin, cout, norm_kind, dropout=0.0, time_dim=None):
        super().__init__()
        self.first = ConvNormAct(spatial_dims, cin, cout, norm_kind, dropout, time_dim)
        self.second = ConvNormAct(spatial_dims, cout, cout, norm_kind, dropout, time_dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.second(self.first(x, emb), emb)


class ResBlock(nn.Module):
    """Residual block: (norm, SiLU, conv) twice, FiLM after the second norm, 1x1 projection on
    the shortcut when the channel count changes.

    The activation comes before each conv (as in ADM, Dhariwal & Nichol 2021) so that the last
    conv can start at zero: the block then starts as the identity and gradients stay well-scaled.
    A zero conv followed by a norm would feed the norm a constant, whose gradient is 1/sqrt(eps).
    """

    def __init__(self, spatial_dims, cin, cout, norm_kind="group", dropout=0.0, time_dim=None):
        super().__init__()
        self.norm1 = norm(norm_kind, spatial_dims, cin)
        self.conv1 = conv(spatial_dims, cin, cout, 3, padding=1)
        self.norm2 = norm(norm_kind, spatial_dims, cout)
        self.film = FiLM(time_dim, cout) if time_dim else None
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(spatial_dims, cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.shortcut = conv(spatial_dims, cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None and emb is not None:
            h = self.film(h, emb)
        h = self.conv2(self.drop(F.silu(h)))
        return self.shortcut(x) + h


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018).

    The decoder's up-sampled features ``g`` decide, per voxel, how much of the skip ``x`` passes.
    """

    def __init__(self, spatial_dims: int, channels: int, inter_channels: int | None = None):
        super().__init__()
        inter = inter_channels or max(channels // 2, 1)
        self.theta_x = conv(spatial_dims, channels, inter, 1, bias=False)
        self.phi_g = conv(spatial_dims, channels, inter, 1)
        self.psi = conv(spatial_dims, inter, 1, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(F.relu(self.theta_x(x) + self.phi_g(g))))
        return x * alpha


class SelfAttention(nn.Module):
    """Multi-head self-attention over all voxels of a (low-resolution) feature map, residual."""

    def __init__(self, spatial_dims: int, channels: int, heads: int = 4, norm_kind: str = "group"):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
        self.heads = heads
        self.norm = norm(norm_kind, spatial_dims, channels)
        self.qkv = conv(spatial_dims, channels, 3 * channels, 1)
        self.out = conv(spatial_dims, channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, tokens, dim)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, *spatial)
        return x + self.out(h)
