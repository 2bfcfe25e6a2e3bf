"""The U-Net family behind one constructor, ``build_model``.

- ``unet``: the classic U-Net (Ronneberger et al. 2015).
- ``residual_unet``: residual blocks with GroupNorm, SiLU and FiLM time conditioning.
- ``attention_unet``: the residual U-Net with attention-gated skips and self-attention at
  low resolution only.

All take ``forward(x, t=None)``: ``t`` is a diffusion timestep per sample, used when the model
was built with ``time_conditioning=True``. Segmentation passes none: the network then runs at
its ``timestep`` attribute (0 unless its pretraining fixed another; ``model.timestep``). With
``deep_supervision=True`` a model in training mode returns a list: the full-resolution logits,
then coarser ones (for ``monai.losses.DeepSupervisionLoss``); in eval mode only the first.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.blocks import (
    AttentionGate,
    ConvNormAct,
    DoubleConv,
    ResBlock,
    SelfAttention,
    TimeEmbedding,
    conv,
)
from medseg.models.blocks import norm as make_norm

__all__ = ["UNet", "ResidualUNet", "AttentionUNet", "build_model", "model_options", "MODELS"]


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


class _UNetBase(nn.Module):
    """What the family shares: strides, size checks, time embedding, output heads."""

    timestep = 0  # the diffusion timestep when forward gets none (a time-conditioned network)

    def __init__(
        self,
        *,
        spatial_dims,
        out_channels,
        channels,
        strides,
        time_conditioning,
        deep_supervision,
        stem_stride=None,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {channels}")
        self.spatial_dims = spatial_dims
        self.channels = tuple(channels)
        self.strides = _strides(spatial_dims, len(channels), strides)
        self.stem_stride = None if stem_stride is None else _strides(spatial_dims, 2, [stem_stride])[0]
        self.time_dim = 4 * channels[0] if time_conditioning else None
        self.time_embed = TimeEmbedding(channels[0], self.time_dim) if time_conditioning else None
        # One coarse head per decoder level below full resolution (not the bottleneck).
        self.ds_heads = (
            nn.ModuleList(
                conv(spatial_dims, channels[level], out_channels, 1) for level in range(1, len(channels) - 1)
            )
            if deep_supervision
            else None
        )
        self._up = (nn.ConvTranspose2d, nn.ConvTranspose3d)[spatial_dims - 2]

    @property
    def size_factor(self) -> tuple[int, ...]:
        """Each input axis must be a multiple of this."""
        strides = [*self.strides, *([self.stem_stride] if self.stem_stride else [])]
        return tuple(math.prod(s[a] for s in strides) for a in range(self.spatial_dims))

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
                f"input size {spatial} does not fit this network: each axis must be a multiple of "
                f"{factor}; pad to {fit}"
            )

    def _embed(self, t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        if self.time_embed is None:
            return None
        if t is None:
            t = torch.full((x.shape[0],), float(self.timestep), device=x.device)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        return self.time_embed(t)

    @torch.no_grad()
    def fold_time(self, t: float | None = None) -> None:
        """Fix the timestep for inference (by default the one segmentation runs at, ``timestep``):
        every FiLM's scale and shift move into the norm before it and the time embedding goes,
        so a network pretrained with time conditioning costs no more to run than one without.
        The outputs do not change."""
        if self.time_embed is None:
            return
        t = self.timestep if t is None else t
        reference = next(self.time_embed.parameters())
        emb = self.time_embed(torch.full((1,), float(t), device=reference.device, dtype=reference.dtype))
        for module in self.modules():
            film = getattr(module, "film", None)
            if film is not None:
                film.fold_into(module.norm if hasattr(module, "norm") else module.norm2, emb)
                module.film = None
        self.time_embed = None

    def _outputs(self, logits: torch.Tensor, decoded: list[torch.Tensor]):
        """``decoded`` holds the decoder features from coarse to fine, excluding full resolution."""
        if self.ds_heads is None or not self.training:
            return logits
        coarse = [head(f) for head, f in zip(self.ds_heads, reversed(decoded))]
        return [logits, *coarse]


class UNet(_UNetBase):
    """The classic U-Net (Ronneberger et al. 2015): per level two 3x3 convs with norm and ReLU,
    max-pool down, transposed-conv up, skip features concatenated, channels growing per level.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes (background included).
        channels: features per level, e.g. ``(32, 64, 128, 256)``; depth is its length.
        strides: down-sampling factor per level after the first, an int or one per axis,
            e.g. ``[(2, 2, 1), 2, 2]`` to keep thick slices at first. Default 2 everywhere.
        norm: ``batch``, ``instance`` or ``group``. Default: batch in 3D, instance in 2D,
            where a patch is most of one image, so batch statistics would be one image's and
            their running averages would fit none (validation Dice fell to 0 in a 2D test task).
        dropout: dropout probability in each conv block.
        deep_supervision: add coarse output heads (see the module docstring).
        time_conditioning: FiLM every conv block with a sinusoidal timestep embedding.
        stem_stride: None for the classic full-resolution first level. Otherwise one strided
            conv takes the image down by this factor (an int or one per axis) before the first
            level, and at the end a transposed conv brings the features back up, where one conv
            over them and the image itself sharpens the boundaries. No double conv then runs at
            full resolution, which on CPUs cuts a training step's time by more than half
            (docs/performance.md); MONAI's UNet is built the same way.

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
        norm: str | None = None,
        dropout: float = 0.0,
        deep_supervision: bool = False,
        time_conditioning: bool = False,
        stem_stride=None,
    ):
        super().__init__(
            spatial_dims=spatial_dims,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            time_conditioning=time_conditioning,
            deep_supervision=deep_supervision,
            stem_stride=stem_stride,
        )
        norm = norm or ("batch" if spatial_dims == 3 else "instance")
        pool = (nn.MaxPool2d, nn.MaxPool3d)[spatial_dims - 2]
        block = lambda cin, cout: DoubleConv(spatial_dims, cin, cout, norm, dropout, self.time_dim)  # noqa: E731
        self.pools = nn.ModuleList(pool(s) for s in self.strides)
        first_in = in_channels
        if self.stem_stride:
            c0 = channels[0]
            self.stem = ConvNormAct(
                spatial_dims, in_channels, c0, norm, dropout, self.time_dim, stride=self.stem_stride
            )
            self.stem_up = self._up(c0, c0, self.stem_stride, self.stem_stride)
            # As wide as the first level: a half-width one lost the thin RV at coarse spacings.
            self.refine = ConvNormAct(spatial_dims, c0 + in_channels, c0, norm, dropout, self.time_dim)
            first_in = c0
        self.encoders = nn.ModuleList(block(cin, cout) for cin, cout in zip((first_in, *channels), channels))
        levels = list(reversed(range(len(channels) - 1)))
        self.ups = nn.ModuleList(
            self._up(channels[i + 1], channels[i], self.strides[i], self.strides[i]) for i in levels
        )
        self.decoders = nn.ModuleList(block(2 * channels[i], channels[i]) for i in levels)
        self.head = conv(spatial_dims, channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None):
        """Logits for ``x`` of shape (B, C, *spatial); ``t`` is a timestep per sample or None."""
        self._check_size(x)
        emb = self._embed(t, x)
        image = x
        if self.stem_stride:
            x = self.stem(x, emb)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pools[level - 1](x)
            x = encoder(x, emb)
            skips.append(x)
        x = skips.pop()
        decoded = []
        for up, decoder in zip(self.ups, self.decoders):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1), emb)
            decoded.append(x)
        if self.stem_stride:
            x = self.refine(torch.cat([self.stem_up(x), image], dim=1), emb)
        return self._outputs(self.head(x), decoded[:-1])


class _ResidualFamily(_UNetBase):
    """The residual U-Net, optionally with gated skips and self-attention (see the subclasses)."""

    def __init__(
        self,
        *,  # the subclasses pass everything by name: reordering cannot mis-wire them
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        strides=None,
        norm: str = "group",
        dropout: float = 0.0,
        deep_supervision: bool = False,
        time_conditioning: bool = False,
        blocks_per_level: int = 2,
        attention_levels: Sequence[int] = (),
        heads: int = 4,
        gated_skips: bool = False,
        stem_stride=None,
    ):
        super().__init__(
            spatial_dims=spatial_dims,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            time_conditioning=time_conditioning,
            deep_supervision=deep_supervision,
            stem_stride=stem_stride,
        )
        if 0 in attention_levels:
            raise ValueError("self-attention at full resolution (level 0) is too costly; use levels >= 1")
        if any(not 0 < a < len(channels) for a in attention_levels):
            raise ValueError(
                f"attention_levels must lie in 1..{len(channels) - 1}, got {list(attention_levels)}"
            )
        self.attention_levels = tuple(attention_levels)
        res = lambda cin, cout: ResBlock(spatial_dims, cin, cout, norm, dropout, self.time_dim)  # noqa: E731

        def attention(level: int) -> nn.Module:
            return (
                SelfAttention(spatial_dims, channels[level], heads, norm)
                if level in self.attention_levels
                else nn.Identity()
            )

        self.stem = conv(spatial_dims, in_channels, channels[0], 3, stride=self.stem_stride or 1, padding=1)
        if self.stem_stride:  # as in UNet: back to full resolution, one conv over it and the image
            self.stem_up = self._up(channels[0], channels[0], self.stem_stride, self.stem_stride)
            self.refine = conv(spatial_dims, channels[0] + in_channels, channels[0], 3, padding=1)
        self.encoders = nn.ModuleList()
        self.encoder_attention = nn.ModuleList()
        self.downs = nn.ModuleList()
        for level, ch in enumerate(channels):
            cin = channels[0] if level == 0 else channels[level - 1]
            if level > 0:
                stride = self.strides[level - 1]
                self.downs.append(conv(spatial_dims, cin, cin, 3, stride=stride, padding=1))
            self.encoders.append(
                nn.ModuleList(res(cin if b == 0 else ch, ch) for b in range(blocks_per_level))
            )
            self.encoder_attention.append(attention(level))
        levels = list(reversed(range(len(channels) - 1)))
        self.ups = nn.ModuleList(
            self._up(channels[i + 1], channels[i], self.strides[i], self.strides[i]) for i in levels
        )
        self.gates = (
            nn.ModuleList(AttentionGate(spatial_dims, channels[i]) for i in levels) if gated_skips else None
        )
        self.decoders = nn.ModuleList(
            nn.ModuleList(
                res(2 * channels[i] if b == 0 else channels[i], channels[i]) for b in range(blocks_per_level)
            )
            for i in levels
        )
        self.decoder_attention = nn.ModuleList(attention(i) for i in levels)
        self.out_norm = make_norm(norm, spatial_dims, channels[0])
        self.head = conv(spatial_dims, channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None):
        """Logits for ``x`` of shape (B, C, *spatial); ``t`` is a timestep per sample or None."""
        self._check_size(x)
        emb = self._embed(t, x)
        image = x
        x = self.stem(x)
        skips = []
        for level, (blocks, attention) in enumerate(zip(self.encoders, self.encoder_attention)):
            if level > 0:
                x = self.downs[level - 1](x)
            for block in blocks:
                x = block(x, emb)
            x = attention(x)
            skips.append(x)
        x = skips.pop()
        decoded = []
        for k, (up, blocks, attention) in enumerate(zip(self.ups, self.decoders, self.decoder_attention)):
            x = up(x)
            skip = skips.pop()
            if self.gates is not None:
                skip = self.gates[k](skip, x)
            x = torch.cat([x, skip], dim=1)
            for block in blocks:
                x = block(x, emb)
            x = attention(x)
            decoded.append(x)
        if self.stem_stride:
            x = self.refine(torch.cat([self.stem_up(x), image], dim=1))
        return self._outputs(self.head(F.silu(self.out_norm(x))), decoded[:-1])


class ResidualUNet(_ResidualFamily):
    """U-Net of residual blocks (GroupNorm, SiLU, zero-initialised last conv) with a sinusoidal
    timestep embedding fed to every block as FiLM. Down-sampling by strided conv, up-sampling by
    transposed conv, skips concatenated.

    Args:
        spatial_dims, in_channels, out_channels, channels, strides, dropout, deep_supervision,
        time_conditioning: as for ``UNet``.
        norm: ``group`` (default), ``batch`` or ``instance``.
        blocks_per_level: residual blocks at each level of the encoder and of the decoder.
        stem_stride: None: the first conv and level run at full resolution. Otherwise the first
            conv is strided by this factor, and at the end a transposed conv and one conv over
            its output and the image bring the features back to full resolution (as ``UNet``).

    Example:
        >>> net = ResidualUNet(2, 1, 3, channels=(16, 32, 64), time_conditioning=True)
        >>> net(torch.zeros(2, 1, 32, 32), t=torch.tensor([10, 500])).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        strides=None,
        norm: str = "group",
        dropout: float = 0.0,
        deep_supervision: bool = False,
        time_conditioning: bool = False,
        blocks_per_level: int = 2,
        stem_stride=None,
    ):
        # By keyword: a reordered parameter must not silently mis-wire the network.
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            norm=norm,
            dropout=dropout,
            deep_supervision=deep_supervision,
            time_conditioning=time_conditioning,
            blocks_per_level=blocks_per_level,
            stem_stride=stem_stride,
        )


class AttentionUNet(_ResidualFamily):
    """The residual U-Net with attention gates on every skip (Oktay et al. 2018) and multi-head
    self-attention at the lowest resolutions only.

    Args:
        attention_levels: levels with self-attention (0 is full resolution and is refused);
            default: the deepest level.
        heads: attention heads.
        Others: as for ``ResidualUNet``.

    Example:
        >>> net = AttentionUNet(3, 1, 4, channels=(8, 16, 32))
        >>> net(torch.zeros(1, 1, 16, 16, 16)).shape
        torch.Size([1, 4, 16, 16, 16])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        strides=None,
        norm: str = "group",
        dropout: float = 0.0,
        deep_supervision: bool = False,
        time_conditioning: bool = False,
        blocks_per_level: int = 2,
        attention_levels: Sequence[int] | None = None,
        heads: int = 4,
        stem_stride=None,
    ):
        if attention_levels is None:
            attention_levels = (len(channels) - 1,)
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            norm=norm,
            dropout=dropout,
            deep_supervision=deep_supervision,
            time_conditioning=time_conditioning,
            blocks_per_level=blocks_per_level,
            attention_levels=attention_levels,
            heads=heads,
            gated_skips=True,
            stem_stride=stem_stride,
        )


MODELS = {"unet": UNet, "residual_unet": ResidualUNet, "attention_unet": AttentionUNet}


def model_options(name: str) -> set[str]:
    """The option names a model takes besides spatial_dims and channel counts.

    Raises:
        ValueError: no model has that name (the one place names are checked).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    names = set(inspect.signature(MODELS[name].__init__).parameters)
    return names - {"self", "spatial_dims", "in_channels", "out_channels"}


def build_model(name: str, spatial_dims: int, in_channels: int, out_channels: int, **options) -> nn.Module:
    """Build a model by name.

    Args:
        name: ``unet``, ``residual_unet`` or ``attention_unet``.
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes, background included.
        **options: ``channels``, ``strides``, ``norm``, ``dropout``, ``deep_supervision``,
            ``time_conditioning``; for the residual and attention models also
            ``blocks_per_level``; for the attention model ``attention_levels`` and ``heads``.

    Example:
        >>> net = build_model("attention_unet", 3, in_channels=1, out_channels=4, channels=(16, 32, 64))
    """
    unknown = set(options) - model_options(name)
    if unknown:
        raise ValueError(f"{name} takes no option {', '.join(sorted(unknown))}")
    return MODELS[name](spatial_dims, in_channels, out_channels, **options)
