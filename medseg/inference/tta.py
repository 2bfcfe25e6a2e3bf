"""Test-time augmentation and ensembles: the mean class probabilities of several passes, and
how much the passes disagree.

Each pass (a mirror of the input, or another model) gives class probabilities on the network's
grid. They are summed in place, so a case holds one running sum however many passes it takes.
Disagreement is the mutual information between the prediction and the pass: the entropy of the
mean minus the mean of the passes' entropies. It is 0 where every pass gives the same
probabilities (even uncertain ones) and grows as they differ; it is divided by log(classes) so
it lies in 0..1 for any number of classes.
"""

from __future__ import annotations

import itertools
import math

import torch

from medseg.config import Config
from medseg.data.plan import Plan
from medseg.errors import ConfigError
from medseg.inference.sliding import sliding_window_probs

__all__ = [
    "MIRRORS",
    "TTA_MIN_GAIN",
    "flip_passes",
    "mirrored_pass",
    "resolve_mirrors",
    "tta_axes",
    "tta_by_default",
    "ProbabilityMean",
    "entropy",
]


MIRRORS = ("auto", "all", "single")

# What flip TTA must add to a model's validation Dice for ``infer.tta: null`` to keep it on. It
# multiplies the network's work by 3 to 4; on the left atrium's held-out cases it moved Dice by
# -0.0011 to +0.0018 (level), on cine MRI by +0.0045 to +0.0096 (docs/prediction.md).
TTA_MIN_GAIN = 0.002


def tta_axes(config: Config, plan: Plan) -> list[int]:
    """The axes flip TTA mirrors: ``infer.tta_axes``, else the axes training mirrored but the
    one a 2D network slices across (reversing the slices' order changes none of its answers).

    Raises:
        ConfigError: ``infer.tta_axes`` names an axis the image lacks, or training mirrored none.
    """
    spatial_dims = plan.spatial_dims
    if config.infer.tta_axes is not None:
        axes = sorted(set(config.infer.tta_axes))
        if any(not 0 <= a < spatial_dims for a in axes):
            raise ConfigError("infer.tta_axes", f"{axes} is not a list of axes 0..{spatial_dims - 1}")
        return axes
    axes = [a for a in config.augment.mirrored_axes(spatial_dims) if a != plan.slice_axis]
    if not axes:
        raise ConfigError(
            "tta",
            "this model was trained without mirroring (augment.flip_prob 0), so mirrored images would "
            "be new to it; train with augment.flip_prob > 0 and flip_axes, or set infer.tta_axes",
        )
    return axes


def tta_by_default(config: Config, gain: float | None) -> bool:
    """Whether a model predicts with flip TTA when not told: ``infer.tta`` when set; else for a
    model trained with mirroring, unless training measured TTA's validation Dice ``gain`` (its
    checkpoint's ``tta_gain``) and it fell short of ``TTA_MIN_GAIN``."""
    if config.infer.tta is not None:
        return bool(config.infer.tta)
    return config.augment.flip_prob > 0 and (gain is None or gain >= TTA_MIN_GAIN)


def flip_passes(axes: list[int], mirrors: str = "all") -> list[tuple[int, ...]]:
    """The mirrors of each pass along ``axes``, the unmirrored pass first: ``all`` of their
    combinations (2 ** len(axes) passes), or ``single``: one axis at a time (1 + len(axes))."""
    axes = sorted(set(axes))
    most = len(axes) if mirrors == "all" else min(1, len(axes))
    return [combo for count in range(most + 1) for combo in itertools.combinations(axes, count)]


def mirrored_pass(model, image: torch.Tensor, flip: tuple[int, ...], window, **options) -> torch.Tensor:
    """One TTA pass: the class probabilities (C, *spatial) of ``image`` (channels first) mirrored
    along the spatial axes ``flip``, mirrored back. ``options`` go to ``sliding_window_probs``."""
    dims = [a + 1 for a in flip]  # past the channel axis
    probs = sliding_window_probs(
        model, torch.flip(torch.as_tensor(image), dims) if dims else image, window, **options
    )
    return torch.flip(probs, dims) if dims else probs


def resolve_mirrors(mirrors: str, axes: list[int]) -> str:
    """``infer.tta_mirrors``'s ``auto``: ``single`` for three axes or more, else ``all``.

    Mirroring a volume along its three axes one at a time (4 passes) gave the Dice of every
    combination (8) on the left atrium's three benchmark checkpoints (+0.0006, +0.0026, +0.0005)
    for half the network's work; on ACDC's two in-plane axes, 3 passes instead of 4 lost 0.0004 to
    0.0021 for a quarter of it, so two axes keep every combination (docs/prediction.md).

    Raises:
        ConfigError: not ``auto``, ``all`` or ``single``.
    """
    if mirrors not in MIRRORS:
        raise ConfigError("infer.tta_mirrors", f"must be {', '.join(MIRRORS)}, not {mirrors!r}")
    if mirrors == "auto":
        return "single" if len(set(axes)) >= 3 else "all"
    return mirrors


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the class axis (0) of probabilities (C, *spatial); 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(0)


class ProbabilityMean:
    """The running mean of class probabilities over passes.

    Args:
        disagreement: also keep the mean entropy of the passes, for ``disagreement()``.
    """

    def __init__(self, disagreement: bool = False):
        self.track = disagreement
        self.total: torch.Tensor | None = None
        self.entropy_total: torch.Tensor | None = None
        self.passes = 0

    def add(self, probs: torch.Tensor) -> None:
        """Add one pass's probabilities (C, *spatial); the first one is kept, not copied."""
        if self.track:
            spread = entropy(probs)
            self.entropy_total = spread if self.entropy_total is None else self.entropy_total.add_(spread)
        self.total = probs if self.total is None else self.total.add_(probs)
        self.passes += 1

    def mean(self) -> torch.Tensor:
        """The mean probabilities (C, *spatial). Divides the running sum in place: call once."""
        if self.total is None:
            raise ValueError("no passes were added")
        return self.total.div_(self.passes)

    def disagreement(self, mean: torch.Tensor) -> torch.Tensor:
        """Mutual information between prediction and pass, over log(classes): 0..1 per voxel.

        Args:
            mean: what ``mean()`` returned.
        """
        if not self.track or self.entropy_total is None:
            raise ValueError("made without disagreement=True")
        information = entropy(mean).sub_(self.entropy_total.div_(self.passes))
        return information.clamp_(min=0).div_(math.log(mean.shape[0]))
