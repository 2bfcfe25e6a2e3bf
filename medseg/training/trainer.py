"""The Trainer: ``Trainer(config).fit()`` trains, validates and writes checkpoints."""

from __future__ import annotations

import csv
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset, list_data_collate
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn
from tqdm.auto import tqdm

from medseg.config import Config, save_config
from medseg.data.cache import cached_dataset
from medseg.data.datasets import check_cases, find_cases, label_names, split_cases
from medseg.data.plan import apply_plan, plan_for_config
from medseg.data.transforms import eval_transforms, train_transforms
from medseg.device import autocast_dtype, channels_last_format, resolve_device, use_channels_last
from medseg.errors import ConfigError, InputError
from medseg.evaluation.metrics import dice_per_class
from medseg.evaluation.report import plot_curves
from medseg.inference.predictor import sliding_window_probs
from medseg.training.checkpoint import model_from_config, save_checkpoint

__all__ = ["Trainer", "Callback"]


class Callback:
    """Base for callbacks: override the hooks you need; each receives the trainer first."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer, summary: dict) -> None: ...


class Trainer:
    """Train a segmentation network from a config.

    Args:
        config: the run's configuration; ``config.data.root`` names the dataset and
            ``config.train.output_dir`` the run folder (checkpoints, ``metrics.csv``, ``config.yaml``).
        overwrite: replace the results of an earlier run in the same folder. Without it, a run
            folder that already holds checkpoints is an error.
        callbacks: objects with any of the hook methods of ``Callback``.
        model: your own network instead of ``model.name`` (called as ``model(x)``; the
            checkpoint then stores its weights, and ``Predictor`` cannot rebuild it).
        loss_fn: your own loss ``loss_fn(logits, label)`` instead of Dice + CE.

    Hooks: a subclass may override ``on_train_start``, ``on_epoch_start``, ``train_step``,
    ``on_validation_end`` and ``on_train_end`` (call ``super()`` to keep the callbacks).

    Example:
        >>> from medseg import Trainer, load_config
        >>> cfg = load_config(None, ["data.root=sample_data/heart", "train.max_time=60"])
        >>> summary = Trainer(cfg).fit()
    """

    def __init__(
        self,
        config: Config,
        overwrite: bool = False,
        callbacks: Sequence[Callback] = (),
        model: nn.Module | None = None,
        loss_fn: Callable | None = None,
    ):
        if not config.data.root:
            raise ConfigError("data.root", "no dataset given (set data.root or pass --data)")
        self.overwrite = overwrite
        self.device = resolve_device(config.train.device)
        self.amp_dtype = autocast_dtype(self.device, config.train.precision)
        self.output_dir = Path(config.train.output_dir)

        dataset = find_cases(config.data.root)
        self.labels = label_names(dataset)
        _refuse_bad_cases(dataset.training, self.labels, config.data.root)
        self.plan = plan_for_config(config, dataset)
        # The saved config holds the planned spacing, patch and pooling: a run is reproducible
        # from its config.yaml alone.
        self.config = config = apply_plan(config, self.plan)
        self.train_cases, self.val_cases = split_cases(
            dataset.training, config.data.val_fraction, config.train.seed
        )
        _seed_everything(config.train.seed)
        self.callbacks = list(callbacks)
        self.custom_model = model is not None
        self.model = model or model_from_config(
            config, len(self.labels), self.plan.channels, self.plan.spatial_dims
        )
        self.model = self.model.to(self.device)
        self.channels_last = use_channels_last(
            config.train.channels_last, self.device, self.amp_dtype, self.model
        )
        if self.channels_last:
            self.model = self.model.to(memory_format=channels_last_format(self.plan.spatial_dims))
        self.loss_fn = loss_fn or DiceCELoss(to_onehot_y=True, softmax=True)
        if config.model.deep_supervision:
            # Coarse outputs weigh 1/2, 1/4, ... of the full-resolution one.
            self.loss_fn = DeepSupervisionLoss(self.loss_fn, weight_mode="exp")
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
        )
        self.epoch = 0
        self.step = 0
        self.best_dice = -math.inf
        self.history: list[dict] = []
        self.val_data: Dataset | None = None

    # -- data -------------------------------------------------------------------------------

    def _train_loader(self) -> DataLoader:
        cfg = self.config
        transform = train_transforms(cfg, self.plan, num_classes=len(self.labels))
        transform.set_random_state(seed=cfg.train.seed)
        dataset = cached_dataset(self.train_cases, transform, self.plan, cfg.data.cache, cfg.data.cache_dir)
        return DataLoader(
            dataset,
            batch_size=cfg.train.batch_size,
            shuffle=True,
            num_workers=cfg.data.num_workers,
            collate_fn=list_data_collate,
            pin_memory=self.device.type == "cuda",
            drop_last=len(dataset) > cfg.train.batch_size,
        )

    def _val_dataset(self) -> Dataset | None:
        """The validation cases, preprocessed once and kept in memory (None without any)."""
        if self.val_data is None and self.val_cases:
            data = self.config.data
            self.val_data = cached_dataset(
                self.val_cases, eval_transforms(self.plan), self.plan, data.cache, data.cache_dir
            )
        return self.val_data

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until ``train.epochs`` or ``train.max_time``; returns a summary dict.

        Writes ``last.pt`` after every epoch, ``best.pt`` whenever validation Dice improves, a row
        of ``metrics.csv`` per epoch and ``curves.png`` at the end.
        """
        cfg = self.config.train
        self._prepare_output_dir()
        save_config(self.config, self.output_dir / "config.yaml")
        self.plan.save(self.output_dir / "plan.yaml")
        loader = self._train_loader()
        batches = _forever(loader)
        total_steps = cfg.epochs * cfg.iters_per_epoch
        start = time.monotonic()
        out_of_time = False
        self.on_train_start()
        for epoch in range(self.epoch, cfg.epochs):
            self.epoch = epoch + 1
            self.on_epoch_start(self.epoch)
            self.model.train()
            losses = []
            bar = tqdm(
                range(cfg.iters_per_epoch), desc=f"epoch {self.epoch}/{cfg.epochs}", leave=False, disable=None
            )
            for _ in bar:
                elapsed = time.monotonic() - start
                progress = max(self.step / total_steps, elapsed / cfg.max_time if cfg.max_time else 0.0)
                if progress >= 1.0:
                    out_of_time = True
                    break
                self._set_lr(progress)
                losses.append(self.train_step(next(batches)))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.close()
            last_epoch = out_of_time or self.epoch == cfg.epochs
            row = {
                "epoch": self.epoch,
                "step": self.step,
                "loss": _mean(losses),
                "time": time.monotonic() - start,
            }
            if self.val_cases and (last_epoch or self.epoch % cfg.val_every == 0):
                row.update(self.validate())
            self._end_epoch(row)
            if last_epoch:
                break
        plot_curves(self.output_dir / "metrics.csv", self.output_dir / "curves.png")
        summary = {
            "epochs": self.epoch,
            "steps": self.step,
            "seconds": round(time.monotonic() - start, 1),
            "best_dice": self.best_dice,
            "best": str(self.output_dir / "best.pt"),
            "last": str(self.output_dir / "last.pt"),
        }
        self.on_train_end(summary)
        return summary

    # -- hooks: override in a subclass (calling super()) or pass callbacks ----------------

    def _call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    def on_train_start(self) -> None:
        """Before the first step (data are loaded, the run folder exists)."""
        self._call("on_train_start")

    def on_epoch_start(self, epoch: int) -> None:
        """Before each epoch's first step; ``epoch`` counts from 1."""
        self._call("on_epoch_start", epoch)

    def on_validation_end(self, metrics: dict[str, float]) -> None:
        """After each validation, with Dice per class and ``dice_mean``."""
        self._call("on_validation_end", metrics)

    def on_train_end(self, summary: dict) -> None:
        """After training, with the summary ``fit`` returns."""
        self._call("on_train_end", summary)

    def train_step(self, batch: dict) -> float:
        """One optimiser step on a batch; returns the loss."""
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        if self.channels_last:
            image = image.contiguous(memory_format=channels_last_format(self.plan.spatial_dims))
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            logits = self.model(image)
        logits = [x.float() for x in logits] if isinstance(logits, list) else logits.float()
        loss = self.loss_fn(logits, label)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 12.0)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Dice per class on the validation cases (in the preprocessed space)."""
        if not self.val_cases:
            return {}
        self.model.eval()
        classes = [c for c in self.labels if c != 0]
        scores = {c: [] for c in classes}
        for item in self._val_dataset():
            probs = sliding_window_probs(
                self.model,
                item["image"],
                self.config.data.patch_size,
                overlap=0.25,
                sw_batch_size=self.config.infer.sw_batch_size,
                amp_dtype=self.amp_dtype,
                channels_last=self.channels_last,
            )
            pred = probs.argmax(0).numpy()
            ref = np.asarray(item["label"][0]).astype(np.int64)
            for c, d in dice_per_class(pred, ref, classes).items():
                scores[c].append(d)
        result = {f"dice_{self.labels[c]}": _mean(v) for c, v in scores.items()}
        result["dice_mean"] = _mean(list(result.values()))
        self.on_validation_end(result)
        return result

    # -- bookkeeping ------------------------------------------------------------------------

    def _prepare_output_dir(self) -> None:
        earlier = [
            self.output_dir / n
            for n in ("last.pt", "best.pt", "metrics.csv")
            if (self.output_dir / n).exists()
        ]
        if earlier and not self.overwrite:
            raise InputError(
                self.output_dir, "already holds a training run; choose another folder or overwrite it"
            )
        for path in earlier:
            path.unlink()
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _set_lr(self, progress: float) -> None:
        """Short linear warm-up, then cosine decay; progress is the larger of steps and time used."""
        warmup = 0.03
        scale = (
            progress / warmup
            if progress < warmup
            else 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.train.lr * max(scale, 0.01)

    def _end_epoch(self, row: dict) -> None:
        self.history.append(row)
        self._append_metrics(row)
        payload = self._checkpoint_payload()
        save_checkpoint(self.output_dir / "last.pt", payload)
        dice = row.get("dice_mean")
        improved = dice is not None and dice > self.best_dice
        if improved or not self.val_cases:
            self.best_dice = dice if dice is not None else self.best_dice
            payload["best_dice"] = self.best_dice
            save_checkpoint(self.output_dir / "best.pt", payload)
        shown = ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("dice") or k == "loss")
        tqdm.write(f"epoch {row['epoch']}: {shown}")

    def _append_metrics(self, row: dict) -> None:
        path = self.output_dir / "metrics.csv"
        columns = ["epoch", "step", "time", "loss", "dice_mean"] + [
            f"dice_{n}" for c, n in self.labels.items() if c
        ]
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            if new:
                writer.writeheader()
            writer.writerow(
                {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items() if k in columns}
            )

    def _checkpoint_payload(self) -> dict:
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "labels": dict(self.labels),
            "plan": self.plan.to_dict(),
            "custom_model": self.custom_model,
            "epoch": self.epoch,
            "step": self.step,
            "best_dice": self.best_dice,
            "rng": {"torch": torch.get_rng_state()},
        }


def _refuse_bad_cases(cases: list[dict], labels: dict[int, str], root) -> None:
    """Name every unusable case at once, before any time goes into training."""
    problems = check_cases(cases, labels)
    for path, problem in problems:
        tqdm.write(f"error: {path}: {problem}", file=sys.stderr)
    if problems:
        raise InputError(root, f"{len(problems)} training case(s) cannot be used (listed above)")


def _forever(loader):
    while True:
        yield from loader


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
