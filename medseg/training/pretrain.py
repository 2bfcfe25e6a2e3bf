"""Diffusion-denoising pretraining: a U-Net learns to predict the noise added to unlabelled
scans (DDPM's epsilon objective), then its weights start the segmentation training.

The noise schedule and the noising are MONAI's ``DDPMScheduler``; the timestep sampling and the
loss are small functions here. ``Pretrainer`` is the ``Trainer`` with images for data and the
denoising loss for a step, so resume, checkpoints, mixed precision and torchrun work as they do
for segmentation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler
from torch import nn
from torch.nn import functional as F

from medseg.checkpoint import PRETRAIN
from medseg.config import Config
from medseg.data.datasets import Cases, find_cases, given_cases
from medseg.data.transforms import pretrain_transforms
from medseg.errors import ConfigError, InputError
from medseg.models.factory import model_for_plan
from medseg.training.trainer import Trainer

__all__ = ["noise_scheduler", "sample_timesteps", "denoising_loss", "Pretrainer"]

# MONAI's names for the two schedules medseg offers: DDPM's linear betas (Ho et al., 2020) and
# the cosine alpha-bar (Nichol & Dhariwal, 2021).
SCHEDULES = {"linear": "linear_beta", "cosine": "cosine"}


def noise_scheduler(steps: int = 1000, schedule: str = "linear") -> DDPMScheduler:
    """MONAI's DDPM scheduler for ``steps`` noise levels: its ``alphas_cumprod`` is alpha-bar_t,
    the share of signal left after t steps, and ``add_noise`` draws from q(x_t | x_0)."""
    if schedule not in SCHEDULES:
        raise ConfigError("pretrain.schedule", f"must be linear or cosine, not {schedule!r}")
    return DDPMScheduler(num_train_timesteps=steps, schedule=SCHEDULES[schedule])


def sample_timesteps(
    count: int, steps: int, mode: str = "low", generator: torch.Generator | None = None, fixed: int = 0
) -> torch.Tensor:
    """Timesteps in [0, steps): ``uniform``; ``low``: t = steps * u^2, biased toward low and
    middle noise (median steps/4), where DDPM features carry most of the segmentation signal
    (Baranchuk et al., 2022); or ``fixed``: always ``fixed``, one noise level (DDeP)."""
    if mode == "fixed":
        if not 0 <= fixed < steps:
            raise ConfigError("model.timestep", f"must lie in 0..{steps - 1} (pretrain.steps), not {fixed}")
        return torch.full((count,), fixed, dtype=torch.long)
    u = torch.rand(count, generator=generator)
    if mode == "low":
        u = u**2
    elif mode != "uniform":
        raise ConfigError("pretrain.timesteps", f"must be uniform, low or fixed, not {mode!r}")
    return (u * steps).long().clamp(max=steps - 1)


def denoising_loss(
    model: nn.Module, x0: torch.Tensor, t: torch.Tensor, scheduler: DDPMScheduler, noise=None
) -> torch.Tensor:
    """The epsilon-prediction MSE of ``model`` on clean images ``x0`` at timesteps ``t``."""
    noise = torch.randn_like(x0) if noise is None else noise
    predicted = model(scheduler.add_noise(x0.float(), noise.float(), t), t)
    return F.mse_loss(predicted.float(), noise.float())


def pretrain_cases(dataset: Cases) -> list[dict]:
    """Every image of a dataset, labelled or not: training, test and unlabelled cases."""
    return [{"image": c["image"], "id": c["id"]} for c in dataset.all_images]


class Pretrainer(Trainer):
    """Train a U-Net to denoise images (``pretrain.*`` settings); its checkpoint starts a
    segmentation run through ``train.init``.

    Same arguments and outputs as ``Trainer``, except that cases need no labels and there is no
    validation: ``best.pt`` is the latest weights, and ``denoising.png`` shows what it learned.

    Example:
        >>> config = load_config(None, ["data.root=sample_data/heart", "train.epochs=20"])
        >>> summary = Pretrainer(config).fit()  # then: train.init=summary["best"]
    """

    kind = PRETRAIN

    def __init__(self, config: Config, **kwargs):
        config = Config.from_dict(config.to_dict())
        config.model.time_conditioning = True
        config.model.deep_supervision = False
        config.train.init = None
        config.train.unlabeled = None  # every image is pretraining's already
        if config.pretrain.timesteps != "fixed":
            config.model.timestep = 0  # drawn at random: segmentation will see clean images
        # Checks the mode and the fixed timestep now, before any image is read.
        sample_timesteps(1, config.pretrain.steps, config.pretrain.timesteps, fixed=config.model.timestep)
        self.scheduler = noise_scheduler(config.pretrain.steps, config.pretrain.schedule)
        super().__init__(config, **kwargs)

    def _cases(self, config: Config, train_cases, val_cases) -> tuple[Cases, list, list]:
        if train_cases is None:
            if not config.data.root:
                raise ConfigError("data.root", "no dataset given (set data.root or pass --data)")
            dataset = find_cases(config.data.root, need_labels=False)
            cases = pretrain_cases(dataset)
        else:
            cases = [
                {"image": c["image"], "id": c["id"]} for c in given_cases(train_cases, need_labels=False)
            ]
            dataset = Cases([], modality=config.data.modality)
        if not cases:
            raise InputError(config.data.root or "train_cases", "holds no images to pretrain on")
        # Planned on all the images, labelled or not; the labels only name the classes.
        return Cases(cases, [], dataset.labels or {0: "background"}, dataset.modality), cases, []

    def _build_model(self) -> nn.Module:
        """A noise-prediction network: one output channel per image channel."""
        return model_for_plan(self.config, self.plan, self.plan.channels)

    def _train_transform(self):
        """Images alone, preprocessed as for segmentation, in random patches."""
        return pretrain_transforms(self.config, self.plan)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """The denoising loss of a batch of images at random timesteps."""
        image = self.to_device(batch["image"])
        self.last_patch = image[:1].detach()  # for the picture at the end
        noise = self.config.pretrain
        t = sample_timesteps(
            image.shape[0], noise.steps, noise.timesteps, fixed=self.config.model.timestep
        ).to(self.device)
        with self.autocast():
            return denoising_loss(self.net, image, t, self.scheduler)

    def on_train_end(self, summary: dict) -> None:
        if self.dist.is_main and getattr(self, "last_patch", None) is not None:
            fixed = self.config.pretrain.timesteps == "fixed"  # the one noise level it knows
            times = (self.config.model.timestep,) if fixed else (50, 150, 250, 500)
            draw_denoising(
                self.eval_model, self.last_patch, self.scheduler, self.output_dir / "denoising.png", times
            )
        super().on_train_end(summary)


@torch.no_grad()
def draw_denoising(
    model: nn.Module, x0: torch.Tensor, scheduler: DDPMScheduler, png, times=(50, 150, 250, 500)
) -> Path:
    """A grid: a training patch noised at a few t (top) and the network's estimate of the clean
    patch from it (bottom), x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medseg.evaluation.pictures import save_figure

    x0 = x0.float()
    device = x0.device
    was_training = model.training
    model.eval()
    abar = scheduler.alphas_cumprod
    times = [t for t in times if t < len(abar)]
    fig, axes = plt.subplots(2, len(times) + 1, figsize=(2.6 * (len(times) + 1), 5.4))
    middle = lambda v: v[0, 0, ..., v.shape[-1] // 2] if v.ndim == 5 else v[0, 0]  # noqa: E731
    clean = middle(x0).cpu().numpy()
    low, high = np.percentile(clean, [1, 99])
    for row in (0, 1):
        axes[row, 0].imshow(clean.T, cmap="gray", vmin=low, vmax=high, origin="lower")
        axes[row, 0].set_title("clean patch" if row == 0 else "target", fontsize=9)
    generator = torch.Generator().manual_seed(0)
    for k, t in enumerate(times, 1):
        step = torch.full((1,), t, dtype=torch.long, device=device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        noisy = scheduler.add_noise(x0, noise, step)
        a = abar[t].float().to(device)
        estimate = (noisy - (1 - a).sqrt() * model(noisy, step).float()) / a.sqrt()
        axes[0, k].imshow(middle(noisy).cpu().numpy().T, cmap="gray", vmin=low, vmax=high, origin="lower")
        axes[0, k].set_title(f"noised, t={t}", fontsize=9)
        axes[1, k].imshow(middle(estimate).cpu().numpy().T, cmap="gray", vmin=low, vmax=high, origin="lower")
        axes[1, k].set_title(f"denoised from t={t}", fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    model.train(was_training)
    return save_figure(fig, png)
