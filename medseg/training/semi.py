"""Learning from unlabelled images while training: mean-teacher consistency (Tarvainen and
Valpola 2017; the base of UA-MT, Yu et al. 2019, on the left-atrium set).

A teacher network is the exponential moving average of the student's weights. Each step the
student also sees a batch of unlabelled patches, and is pulled towards the teacher's class
probabilities on the same patches with a little noise added: the mean squared difference of
the two softmaxes. Its weight ramps up (``exp(-5 (1 - r)^2)``, r from 0 to 1 over the first
``RAMP_UP`` of the run), since an untrained teacher has nothing to teach. With
``train.unlabeled_loss: confident`` the pull is cross-entropy towards the teacher's class
instead, on the voxels where the teacher gives it at least ``train.confidence`` (confident
pseudo-labels, as FixMatch and UniMatch use): a hard target, larger than the softmaxes' squared
difference, and silent where the teacher is unsure. With ``train.unlabeled_mix: cutmix`` the
student sees each unlabelled patch with a box cut from another pasted in, and is pulled towards
the teacher's answers cut and pasted the same way (French et al. 2020: segmentation consistency
needs a perturbation stronger than noise; BCP and UniMatch build on it).

The teacher is not what training saves or validates (that stays the student, or its own
``train.ema_decay`` average); it lives in the checkpoint's training state, so a resumed run
continues exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError
from medseg.training.optim import make_ema

__all__ = [
    "MeanTeacher",
    "consistency_weight",
    "RAMP_UP",
    "TEACHER_NOISE",
    "UNLABELED_LOSSES",
    "UNLABELED_MIXES",
    "cutmix_masks",
    "unlabeled_loss",
]

RAMP_UP = 0.4  # share of the run over which the consistency weight rises to its full value
TEACHER_NOISE = (0.1, 0.2)  # the teacher's input noise: Gaussian std, clipped at +- this (UA-MT's)
UNLABELED_LOSSES = ("mse", "confident")
UNLABELED_MIXES = ("none", "cutmix")
CUT_SHARE = 0.5  # the pasted box's share of a patch's voxels (French et al.'s half)


def consistency_weight(progress: float, weight: float) -> float:
    """The weight of the consistency loss at ``progress`` (0..1) of the run."""
    r = min(1.0, max(0.0, progress) / RAMP_UP)
    return weight * math.exp(-5.0 * (1.0 - r) ** 2)


def unlabeled_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, kind: str, confidence: float):
    """The student's loss against the teacher's probabilities (N, C, *spatial): ``mse``, their
    softmaxes' mean squared difference; ``confident``, the cross-entropy towards the teacher's
    class on the voxels where its probability is at least ``confidence``, averaged over every
    voxel (so an unsure teacher weighs less, as in FixMatch)."""
    if kind == "confident":
        sure, label = teacher_probs.max(1)
        ce = F.cross_entropy(student_logits.float(), label, reduction="none")
        return (ce * (sure >= confidence)).mean()
    return ((student_logits.float().softmax(1) - teacher_probs) ** 2).mean()


def cutmix_masks(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """One box per patch, as a (N, 1, *spatial) mask of 1 inside and 0 outside: each side
    ``CUT_SHARE ** (1 / dims)`` of the patch's (so the box holds about half its voxels), at a
    random place drawn from ``generator``."""
    spatial = tuple(shape[2:])
    mask = torch.zeros((shape[0], 1, *spatial))
    for i in range(shape[0]):
        box = []
        for size in spatial:
            side = max(1, round(size * CUT_SHARE ** (1 / len(spatial))))
            start = int(torch.randint(0, size - side + 1, (1,), generator=generator))
            box.append(slice(start, start + side))
        mask[(i, 0, *box)] = 1.0
    return mask


def paste(mask: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``inside`` within each patch's box, and the next patch's (``roll`` by one) outside it:
    with two or more patches every mix joins two different ones."""
    return mask * inside + (1 - mask) * inside.roll(1, 0)


class MeanTeacher:
    """The teacher (a moving average of ``model``) and the consistency loss.

    Args:
        model: the student, unwrapped (not the DDP or compiled wrapper).
        decay: the teacher's decay (0.99: it follows the last hundred or so steps); it warms up
            as ``train.ema_decay`` does, so the teacher tracks the student's first steps.
        weight: the consistency loss's full weight.
        kind: ``mse`` (softmaxes' squared difference) or ``confident`` (cross-entropy towards
            the teacher's class where its probability reaches ``confidence``).
        confidence: ``confident``'s threshold, in (0, 1].
        mix: ``none``, or ``cutmix``: the student's unlabelled patches, and the teacher's answers
            it is pulled towards, each get a box of another patch pasted in.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        weight: float,
        kind: str = "mse",
        confidence: float = 0.95,
        mix: str = "none",
    ):
        if weight < 0:
            raise ConfigError("train.unlabeled_weight", f"must be 0 or more, not {weight}")
        if kind not in UNLABELED_LOSSES:
            raise ConfigError(
                "train.unlabeled_loss", f"must be {' or '.join(UNLABELED_LOSSES)}, not {kind!r}"
            )
        if not 0 < confidence <= 1:
            raise ConfigError("train.confidence", f"must be in (0, 1], not {confidence}")
        if mix not in UNLABELED_MIXES:
            raise ConfigError("train.unlabeled_mix", f"must be {' or '.join(UNLABELED_MIXES)}, not {mix!r}")
        self.teacher = make_ema(model, decay)
        self.weight, self.kind, self.confidence, self.mix = weight, kind, confidence, mix
        self.teacher.module.eval()  # its batch norm uses the averaged statistics

    @classmethod
    def from_config(cls, model: nn.Module, train) -> MeanTeacher:
        """The teacher ``train`` (a ``TrainConfig``) asks for."""
        return cls(
            model,
            train.teacher_decay,
            train.unlabeled_weight,
            train.unlabeled_loss,
            train.confidence,
            train.unlabeled_mix,
        )

    def update(self, model: nn.Module) -> None:
        self.teacher.update_parameters(model)

    def masks(self, images: torch.Tensor, seed: int) -> torch.Tensor | None:
        """The boxes this step's ``cutmix`` pastes (None without mixing), drawn from a generator
        seeded with ``seed``, so a resumed run cuts the same boxes."""
        if self.mix == "none":
            return None
        generator = torch.Generator().manual_seed(seed)
        return cutmix_masks(images.shape, generator).to(images.device, images.dtype)

    def student_input(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """The unlabelled patches as the student sees them: mixed by ``masks``, if any."""
        return images if masks is None else paste(masks, images)

    def loss(
        self,
        student_logits: torch.Tensor,
        images: torch.Tensor,
        autocast,
        seed: int,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """How far the student's logits are from the teacher's answer on ``images`` plus clipped
        noise (cut and pasted by ``masks`` as the student's input was): their softmaxes' mean
        squared difference, or (``confident``) the cross-entropy towards the teacher's class on
        its confident voxels, averaged over all. The noise comes from its own generator seeded
        with ``seed`` (the run's seed and step), so a resumed run draws the same noise whatever
        else used the global generator meanwhile (a data loader's start does)."""
        std, clip = TEACHER_NOISE
        generator = torch.Generator(device=images.device).manual_seed(seed)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        noisy = images + (noise * std).clamp(-clip, clip)
        with torch.no_grad(), autocast():
            target = self.teacher.module(noisy)
        if isinstance(target, list):  # deep supervision: the full-resolution output
            target = target[0]
        probs = target.float().softmax(1)
        if masks is not None:
            probs = paste(masks.float(), probs)
        return unlabeled_loss(student_logits, probs, self.kind, self.confidence)

    def state_dict(self) -> dict:
        return {
            "weights": {k: v.detach().cpu() for k, v in self.teacher.module.state_dict().items()},
            "updates": int(self.teacher.n_averaged),
        }

    def load_state_dict(self, state: dict) -> None:
        self.teacher.module.load_state_dict(state["weights"])
        self.teacher.n_averaged.fill_(state["updates"])
