"""Learning from unlabelled images while training: mean-teacher consistency (Tarvainen and
Valpola 2017; the base of UA-MT, Yu et al. 2019, on the left-atrium set).

A teacher network is the exponential moving average of the student's weights. Each step the
student also sees a batch of unlabelled patches, and is pulled towards the teacher's class
probabilities on the same patches with a little noise added: the mean squared difference of
the two softmaxes. Its weight ramps up (``exp(-5 (1 - r)^2)``, r from 0 to 1 over the first
``RAMP_UP`` of the run), since an untrained teacher has nothing to teach.

The teacher is not what training saves or validates (that stays the student, or its own
``train.ema_decay`` average); it lives in the checkpoint's training state, so a resumed run
continues exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.training.optim import make_ema

__all__ = ["MeanTeacher", "consistency_weight", "RAMP_UP", "TEACHER_NOISE"]

RAMP_UP = 0.4  # share of the run over which the consistency weight rises to its full value
TEACHER_NOISE = (0.1, 0.2)  # the teacher's input noise: Gaussian std, clipped at +- this (UA-MT's)


def consistency_weight(progress: float, weight: float) -> float:
    """The weight of the consistency loss at ``progress`` (0..1) of the run."""
    r = min(1.0, max(0.0, progress) / RAMP_UP)
    return weight * math.exp(-5.0 * (1.0 - r) ** 2)


class MeanTeacher:
    """The teacher (a moving average of ``model``) and the consistency loss.

    Args:
        model: the student, unwrapped (not the DDP or compiled wrapper).
        decay: the teacher's decay (0.99: it follows the last hundred or so steps); it warms up
            as ``train.ema_decay`` does, so the teacher tracks the student's first steps.
        weight: the consistency loss's full weight.
    """

    def __init__(self, model: nn.Module, decay: float, weight: float):
        if weight < 0:
            raise ConfigError("train.unlabeled_weight", f"must be 0 or more, not {weight}")
        self.teacher = make_ema(model, decay)
        self.weight = weight
        self.teacher.module.eval()  # its batch norm uses the averaged statistics

    def update(self, model: nn.Module) -> None:
        self.teacher.update_parameters(model)

    def loss(self, student_logits: torch.Tensor, images: torch.Tensor, autocast, seed: int) -> torch.Tensor:
        """Mean squared difference between the student's softmax on ``images`` and the teacher's
        on ``images`` plus clipped noise. The noise comes from its own generator seeded with
        ``seed`` (the run's seed and step), so a resumed run draws the same noise whatever
        else used the global generator meanwhile (a data loader's start does)."""
        std, clip = TEACHER_NOISE
        generator = torch.Generator(device=images.device).manual_seed(seed)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        noisy = images + (noise * std).clamp(-clip, clip)
        with torch.no_grad(), autocast():
            target = self.teacher.module(noisy)
        if isinstance(target, list):  # deep supervision: the full-resolution output
            target = target[0]
        return ((student_logits.float().softmax(1) - target.float().softmax(1)) ** 2).mean()

    def state_dict(self) -> dict:
        return {
            "weights": {k: v.detach().cpu() for k, v in self.teacher.module.state_dict().items()},
            "updates": int(self.teacher.n_averaged),
        }

    def load_state_dict(self, state: dict) -> None:
        self.teacher.module.load_state_dict(state["weights"])
        self.teacher.n_averaged.fill_(state["updates"])
