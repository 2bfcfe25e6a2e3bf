"""The Trainer: ``Trainer(config).fit()`` trains, validates and writes checkpoints."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset, list_data_collate
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from medseg.atomic import write_text_atomic
from medseg.checkpoint import SEGMENT, Checkpoint
from medseg.config import Config, save_config
from medseg.data.cache import cached_dataset
from medseg.data.datasets import (
    Cases,
    find_cases,
    given_cases,
    label_names,
    read_splits,
    refuse_bad_cases,
    split_for_run,
    unlabeled_cases,
)
from medseg.data.plan import Plan, fingerprint, plan_for_config
from medseg.data.transforms import eval_transforms, pretrain_transforms, train_transforms
from medseg.device import autocast_dtype, channels_last_format, use_channels_last, windows_per_forward
from medseg.errors import CheckpointError, ConfigError, InputError
from medseg.evaluation.metrics import dice_per_class
from medseg.evaluation.pictures import case_figure
from medseg.files import safe_name
from medseg.inference.postprocess import keep_largest_component
from medseg.inference.sliding import sliding_window_probs
from medseg.inference.tta import (
    ProbabilityMean,
    flip_passes,
    mirrored_pass,
    resolve_mirrors,
    tta_axes,
    tta_by_default,
)
from medseg.io import image_from_ras
from medseg.models.factory import model_for_plan
from medseg.training.callbacks import Callback, TensorBoardLogger, tensorboard_available
from medseg.training.distributed import setup_distributed
from medseg.training.history import plot_curves, write_metrics
from medseg.training.optim import default_lr, lr_factor, make_ema, make_optimizer
from medseg.training.pseudo import PseudoLabeller
from medseg.training.sampling import SeededSamples, StepSampler, rng_state, set_rng_state
from medseg.training.semi import MeanTeacher, consistency_weight
from medseg.training.transfer import load_matching, network_of

__all__ = ["Trainer", "Callback"]

log = logging.getLogger(__name__)  # epoch lines (info) and warnings; the CLI shows them
VALIDATION_SHARE = 9.0  # train at least this many times a validation's length between two (val_every null)


class Trainer:
    """Train a segmentation network from a config, on one CPU, one GPU or many (torchrun).

    Args:
        config: the run's configuration; ``config.data.root`` names the dataset and
            ``config.train.output_dir`` the run folder (checkpoints, ``metrics.csv``, ``config.yaml``).
        overwrite: replace the results of an earlier run in the same folder. Without it, a run
            folder that already holds checkpoints is an error.
        callbacks: objects with any of the hook methods of ``Callback``.
        model: your own network instead of ``model.name`` (called as ``model(x)``; the
            checkpoint then stores its weights, and ``Predictor`` cannot rebuild it).
        loss_fn: your own loss ``loss_fn(logits, label)`` instead of Dice + CE.
        train_cases, val_cases: your own cases (``{"image", "label", "id"}`` dicts) instead of
            ``data.root``; without ``val_cases`` the training cases are split as configured.
        plan: a ``Plan`` to use instead of planning (``Trainer.resume`` passes the run's own).

    Hooks: a subclass may override ``on_train_start``, ``on_epoch_start``, ``train_step``,
    ``on_validation_end``, ``on_epoch_end`` and ``on_train_end`` (call ``super()`` to keep the
    callbacks).

    Example:
        >>> from medseg import Trainer, load_config
        >>> config = load_config(None, ["data.root=sample_data/heart", "train.max_time=60"])
        >>> summary = Trainer(config).fit()
        >>> summary = Trainer.resume("runs/heart").fit()  # after an interruption
    """

    kind = SEGMENT  # recorded in checkpoints; a Pretrainer's networks predict noise (PRETRAIN)

    def __init__(
        self,
        config: Config,
        overwrite: bool = False,
        callbacks: Sequence[Callback] = (),
        model: nn.Module | None = None,
        loss_fn: Callable | None = None,
        train_cases: list[dict] | None = None,
        val_cases: list[dict] | None = None,
        plan: Plan | None = None,
    ):
        self.overwrite = overwrite
        self.folds: list[dict] | None = None
        self.dist, self.device = setup_distributed(config.train.device)
        self.amp_dtype = autocast_dtype(self.device, config.train.precision)
        self.output_dir = Path(config.train.output_dir)

        dataset, self.train_cases, self.val_cases = self._cases(config, train_cases, val_cases)
        source = config.data.root or "train_cases"
        # Rank 0 alone reads every label, checks every case and plans; the other ranks take its word.
        self.labels = self.dist.on_main(lambda: label_names(dataset, source))
        self.dist.on_main(lambda: refuse_bad_cases(dataset.training, self.labels, source))
        if config.train.init and model is None:
            config, init_plan = network_of(config.train.init, config)
            plan = plan or Plan.from_dict(init_plan, source=config.train.init)
            _check_channels(plan, dataset, config.train.init)
        # The plan owns the geometry (spacing, patch, pooling); the config keeps what was asked
        # for (null: planned). config.yaml and plan.yaml together reproduce the run.
        self.plan = plan or self.dist.on_main(lambda: plan_for_config(config, dataset))
        self.config = config = Config.from_dict(config.to_dict())  # the caller's stays untouched
        _absolute_paths(config)
        train = config.train
        if train.lr is None:  # resolved here, so the saved config says which rate was used
            train.lr = default_lr(config.model.name)
        _seed_everything(train.seed, train.deterministic)
        self.callbacks = list(callbacks)
        self.custom_model = model is not None
        self.model = (model or self._build_model()).to(self.device)
        self.channels_last = use_channels_last(train.channels_last, self.device, self.amp_dtype, self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=channels_last_format(self.plan.network_dims))
        self.ema = make_ema(self.model, train.ema_decay)
        # Unlabelled images (train.unlabeled): found and checked now, before the run folder is touched.
        self.unlabeled_cases = unlabeled_cases(train.unlabeled, dataset) if train.unlabeled else []
        # ...learnt from by self-training (train.pseudo_labels: a model labels them) or else by
        # mean-teacher consistency.
        self.labeller = self._labeller() if train.pseudo_labels else None
        self.pseudo_cases: list[dict] = []
        self.teacher = (
            MeanTeacher.from_config(self.model, train) if self.unlabeled_cases and not self.labeller else None
        )
        if self.teacher is not None and train.unlabeled_mix == "cutmix" and self.plan.batch_size < 2:
            # cutmix joins each patch with the next of its batch: one patch would join itself
            raise ConfigError("train.unlabeled_mix", "cutmix needs train.batch_size of 2 or more, not 1")
        self.progress = 0.0  # of the run, 0..1: the consistency weight's ramp follows it
        # What the training step calls: the network, wrapped for DDP and compiled if asked.
        self.net: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        if train.compile:
            if self.device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
                raise ConfigError("train.compile", "needs a C++ compiler (c++ or g++) on the PATH for CPUs")
            self.net = torch.compile(self.net)
        self.loss_fn = loss_fn or DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            include_background=train.dice_background,
            batch=train.batch_dice,
        )
        if config.model.deep_supervision:
            # Coarse outputs weigh 1/2, 1/4, ... of the full-resolution one.
            self.loss_fn = DeepSupervisionLoss(self.loss_fn, weight_mode="exp")
        self.optimizer = make_optimizer(self.model.parameters(), train)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        wants_tensorboard = train.tensorboard or (train.tensorboard is None and tensorboard_available())
        if self.dist.is_main and wants_tensorboard:
            self.callbacks.append(TensorBoardLogger(self.output_dir / "tensorboard"))
        self.epoch = 0
        self.step = 0
        self.elapsed = 0.0  # seconds of training so far, across resumptions
        self.best_dice = -math.inf
        # Labels whose validation Dice keep-largest-component did not lower (infer.keep_largest: auto)
        self.keep_largest: list[int] | None = None
        self.history: list[dict] = []
        self.resumed = False
        self.val_data: Dataset | None = None
        self._validated: tuple[float, float] | None = None  # when the last validation ended, and its seconds

    def _build_model(self) -> nn.Module:
        """The network the config names, for the plan's channels and the dataset's classes."""
        return model_for_plan(self.config, self.plan, len(self.labels))

    def _labeller(self) -> PseudoLabeller:
        """The model of ``train.pseudo_labels``, checked: it predicts this dataset's classes."""
        if not self.unlabeled_cases:
            raise ConfigError(
                "train.pseudo_labels", "needs train.unlabeled (--unlabeled): the images to label"
            )
        return PseudoLabeller(self.config.train.pseudo_labels, self.labels, str(self.device))

    def _load_init(self) -> None:
        """Start from ``train.init``'s weights (a fresh run only; a resumed one has its own)."""
        train = self.config.train
        transfer = load_matching(self.model, train.init, train.init_parts)
        self.ema = make_ema(self.model, train.ema_decay)  # the average starts from the loaded weights
        if self.teacher is not None:  # and so does the teacher
            self.teacher = MeanTeacher.from_config(self.model, train)
        if self.dist.is_main:
            log.info("started from %s: %s", train.init, transfer.summary())

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: Sequence[str] = (), **kwargs) -> Trainer:
        """A trainer that continues the run in ``run_dir`` from its ``last.pt``.

        Its config, plan, weights, optimizer, scaler, step, clock and random states are restored,
        so with ``train.deterministic`` a run killed and resumed ends with the weights of one
        that never stopped. ``overrides`` (``key=value``) change the saved config, e.g.
        ``train.epochs=80`` to train on; ``kwargs`` go to ``Trainer`` (a custom model must be
        passed again).
        """
        run_dir = Path(run_dir)
        checkpoint = Checkpoint.load(run_dir / "last.pt")
        config = checkpoint.settings().override(list(overrides))
        config.train.output_dir = str(run_dir)
        if (run_dir / "splits.json").is_file():  # the run's own split, whatever the folder holds now
            config.data.splits = str(run_dir / "splits.json")
        if checkpoint.custom_model and "model" not in kwargs:
            raise CheckpointError(run_dir / "last.pt", "was trained with a custom model: pass it as model=")
        trainer = cls(config, plan=checkpoint.preprocessing(), **kwargs)
        trainer.load_state(checkpoint)
        return trainer

    # -- data -------------------------------------------------------------------------------

    def _cases(self, config: Config, train_cases, val_cases) -> tuple[Cases, list, list]:
        """The dataset (for labels and planning) and its training and validation cases."""
        data = config.data
        if train_cases is None:
            if not data.root:
                raise ConfigError("data.root", "no dataset given (set data.root or pass --data)")
            dataset = find_cases(data.root)
            cases = dataset.training
        else:
            cases = given_cases(train_cases)
            val_cases = None if val_cases is None else given_cases(val_cases)
            dataset = Cases(cases + (val_cases or []), modality=data.modality)
        if val_cases is not None:
            return dataset, cases, val_cases
        saved = read_splits(data.splits) if data.splits and Path(data.splits).is_file() else None
        train, val, self.folds = split_for_run(cases, data, config.train.seed, saved)
        return dataset, train, val

    def _train_transform(self):
        """The training pipeline: preprocessing, class-balanced patches, augmentation."""
        return train_transforms(self.config, self.plan, num_classes=len(self.labels))

    def _train_loader(self) -> DataLoader:
        data, train = self.config.data, self.config.train
        transform = self._train_transform()
        if data.cache == "disk" and not self.dist.is_main:
            self.dist.barrier()  # rank 0 fills the shared disk cache; the others then read it
        labelled = self.train_cases + self.pseudo_cases
        cases = cached_dataset(labelled, transform, self.plan, data.cache, data.cache_dir)
        if data.cache == "disk" and self.dist.is_main:
            self.dist.barrier()
        batch = self.plan.batch_size  # train.batch_size, or planned
        return DataLoader(
            SeededSamples(cases, train.seed),
            batch_size=batch,
            sampler=StepSampler(batch, start=self.step, rank=self.dist.rank, world=self.dist.world),
            num_workers=data.num_workers,
            collate_fn=list_data_collate,
            pin_memory=self.device.type == "cuda",
        )

    def _unlabeled_loader(self) -> DataLoader:
        """Batches of unlabelled patches, as many as a labelled batch holds, drawn as reproducibly
        (their own seed) and resumed at the same step."""
        data, train = self.config.data, self.config.train
        transform = pretrain_transforms(self.config, self.plan)  # the image alone, in random patches
        cases = cached_dataset(self.unlabeled_cases, transform, self.plan, data.cache, data.cache_dir)
        batch = self.plan.batch_size
        return DataLoader(
            SeededSamples(cases, train.seed + 7919),
            batch_size=batch,
            sampler=StepSampler(batch, start=self.step, rank=self.dist.rank, world=self.dist.world),
            num_workers=data.num_workers,
            collate_fn=list_data_collate,
            pin_memory=self.device.type == "cuda",
        )

    def _val_dataset(self) -> Dataset | None:
        """This rank's share of the validation cases, preprocessed once (None without any)."""
        mine = self.val_cases[self.dist.rank :: self.dist.world]
        if self.val_data is None and mine:
            data = self.config.data
            self.val_data = cached_dataset(
                mine, eval_transforms(self.plan), self.plan, data.cache, data.cache_dir
            )
        return self.val_data

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until ``train.epochs`` or ``train.max_time``; returns a summary dict.

        Writes ``last.pt`` after every epoch, ``best.pt`` whenever validation Dice improves, a row
        of ``metrics.csv`` per epoch and ``curves.png`` at the end (rank 0 only under torchrun).
        At the end, a model trained with mirroring records in ``best.pt`` what flip TTA adds to
        its validation Dice (``tta_gain``), which decides whether prediction uses TTA by default.
        """
        train = self.config.train
        self._refuse_earlier_run()
        if self.labeller is not None:  # a prediction each, into pseudo_labels/ alone; then cases
            self.pseudo_cases = self.labeller.label(
                self.unlabeled_cases, self.output_dir, self.dist.rank, self.dist.world
            )
            self.labeller = None  # its network's memory is training's now
            self.dist.barrier()
        # Every case is loaded (and checked) before the run's files are written: a bad scan or
        # setting found here leaves an earlier run there as it was.
        batches = iter(self._train_loader())
        unlabeled = iter(self._unlabeled_loader()) if self.teacher else None
        self._write_run_files()
        if train.init and not self.resumed and self.step == 0 and not self.custom_model:
            self._load_init()
        epochs = train.epoch_limit
        total_steps = epochs * train.iters_per_epoch
        clock = time.monotonic() - self.elapsed
        if self.resumed and (self.epoch >= epochs or self._progress(clock, total_steps) >= 1.0):
            log.warning(
                "the run in %s already finished (epoch %d); raise train.epochs or train.max_time to train on",
                self.output_dir,
                self.epoch,
            )
        self._notify("on_train_start")
        while self.epoch < epochs and self._progress(clock, total_steps) < 1.0:
            self.epoch += 1
            self._notify("on_epoch_start", self.epoch)
            self.net.train()
            losses, waited, began = [], 0.0, time.monotonic()
            bar = tqdm(
                range(train.iters_per_epoch),
                desc=f"epoch {self.epoch}" + (f"/{epochs}" if math.isfinite(epochs) else ""),
                leave=False,
                disable=None if self.dist.is_main else True,
            )
            for _ in bar:
                progress = self._progress(clock, total_steps)
                if progress >= 1.0:
                    break
                self._set_lr(progress)
                self.progress = progress
                fetch = time.monotonic()
                batch = next(batches)
                if unlabeled is not None:
                    batch["unlabeled"] = next(unlabeled)["image"]
                waited += time.monotonic() - fetch
                losses.append(self.train_step(batch))
                bar.set_postfix(
                    loss=f"{losses[-1]:.3f}", run_left=_time_left(progress, time.monotonic() - clock)
                )
            bar.close()
            self.elapsed = time.monotonic() - clock
            done = self.epoch >= epochs or self._progress(clock, total_steps) >= 1.0
            row = {
                "epoch": self.epoch,
                "step": self.step,
                "loss": _mean(losses),
                "lr": self.optimizer.param_groups[0]["lr"],
                "data_wait": waited / max(time.monotonic() - began, 1e-9),
                "time": self.elapsed,
            }
            if self._validation_due(done):
                began = time.monotonic()
                row.update(self.validate())
                seconds = time.monotonic() - began
                # Off the training clock: train.max_time buys training steps, not validations.
                clock += seconds
                self._validated = (time.monotonic() - clock, seconds)
            self._end_epoch(row)
        self._weigh_tta()
        if self.dist.is_main and self.history:
            plot_curves(self.output_dir / "metrics.csv", self.output_dir / "curves.png")
        summary = {
            "epochs": self.epoch,
            "steps": self.step,
            "seconds": round(self.elapsed, 1),
            "best_dice": self.best_dice,
            "best": str(self.output_dir / "best.pt"),
            "last": str(self.output_dir / "last.pt"),
        }
        self._notify("on_train_end", summary)
        return summary

    # -- hooks: override them in a subclass, or pass callbacks --------------------------------
    # The trainer calls each hook, then every callback's method of that name, separately: a
    # subclass that overrides a hook without calling super() does not switch the callbacks off.

    def _notify(self, hook: str, *args) -> None:
        getattr(self, hook)(*args)
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    def on_train_start(self) -> None:
        """Before the first step (data are loaded, the run folder exists)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before each epoch's first step; ``epoch`` counts from 1."""

    def on_validation_end(self, metrics: dict[str, float]) -> None:
        """After each validation, with Dice per class and ``dice_mean`` (all ranks agree)."""

    def on_epoch_end(self, row: dict) -> None:
        """After each epoch, with its ``metrics.csv`` row, before the checkpoints are written."""

    def on_train_end(self, summary: dict) -> None:
        """After training, with the summary ``fit`` returns."""

    def train_step(self, batch: dict) -> float:
        """One optimiser step on a batch; returns the loss."""
        train = self.config.train
        loss = self.compute_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.teacher is not None:
            self.teacher.update(self.model)
        self.step += 1
        return float(loss.detach())

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """The loss of a batch: the network under autocast, then ``loss_fn`` (Dice + CE), plus,
        with unlabelled patches (``train.unlabeled``), the mean teacher's consistency loss. Both
        kinds of patch go through the network in one forward, so DDP sees one graph per step."""
        image = self.to_device(batch["image"])
        label = batch["label"].to(self.device, non_blocking=True)
        extra = self.to_device(batch["unlabeled"]) if "unlabeled" in batch else None
        seed = self.config.train.seed * 1_000_003 + self.step  # this step's teacher noise and boxes
        masks = self.teacher.masks(extra, seed) if extra is not None else None
        with self.autocast():
            if extra is None:
                logits = self.net(image)
            else:
                logits = self.net(torch.cat([image, self.teacher.student_input(extra, masks)]))
        logits = [x.float() for x in logits] if isinstance(logits, list) else logits.float()
        if extra is None:
            return self.loss_fn(logits, label)
        n = image.shape[0]
        labelled = [x[:n] for x in logits] if isinstance(logits, list) else logits[:n]
        student = logits[0][n:] if isinstance(logits, list) else logits[n:]
        weight = consistency_weight(self.progress, self.teacher.weight)
        consistency = self.teacher.loss(student, extra, self.autocast, seed, masks)
        return self.loss_fn(labelled, label) + weight * consistency

    def to_device(self, image: torch.Tensor) -> torch.Tensor:
        """A batch of images on the training device, channels-last where that is faster."""
        image = image.to(self.device, non_blocking=True)
        if self.channels_last and self.plan.network_dims == self.plan.spatial_dims:
            image = image.contiguous(memory_format=channels_last_format(self.plan.spatial_dims))
        return image

    def autocast(self):
        """The mixed-precision context of this run (a no-op in fp32)."""
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and saved: the moving average when ``ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Dice per class on the validation cases (in the preprocessed space), over all ranks."""
        if not self.val_cases:
            return {}
        model = self.eval_model
        model.eval()
        classes = [c for c in self.labels if c != 0]
        windows = windows_per_forward(self.config.infer.sw_batch_size, self.device, self.amp_dtype)
        scores, largest = [], []
        for number, item in enumerate(self._val_dataset() or []):
            probs = sliding_window_probs(
                model,
                item["image"],
                self.plan.window_size,
                overlap=self.config.infer.overlap,  # as prediction will use
                sw_batch_size=windows,
                amp_dtype=self.amp_dtype,
                channels_last=self.channels_last,
            )
            ref = np.asarray(item["label"][0]).astype(np.int64)
            labels = probs.argmax(0).numpy().astype(np.uint8)
            # a label absent from both is no evidence for choosing a checkpoint: nan, not 1
            scores.append(dice_per_class(labels, ref, classes, both_empty=math.nan))
            cleaned = keep_largest_component(labels, classes)
            largest.append(dice_per_class(cleaned, ref, classes, both_empty=math.nan))
            if self.dist.is_main and number < self.config.train.val_pictures:
                self._draw_validation(item, labels, ref, scores[-1])
        scores = [s for rank in self.dist.gather(scores) for s in rank]
        largest = [s for rank in self.dist.gather(largest) for s in rank]
        result = {f"dice_{self.labels[c]}": _mean([s[c] for s in scores]) for c in classes}
        result["dice_mean"] = _mean(list(result.values()))
        cleaned = {c: _mean([s[c] for s in largest]) for c in classes}
        result["dice_mean_largest"] = _mean(list(cleaned.values()))
        # nan (a label absent from every validation case) compares False: no evidence, no change
        self.keep_largest = [c for c in classes if cleaned[c] >= result[f"dice_{self.labels[c]}"]]
        result["val_cases"] = len(scores)
        self._notify("on_validation_end", result)
        return result

    @torch.inference_mode()
    def _weigh_tta(self) -> None:
        """Record in ``best.pt`` what flip TTA adds to its weights' validation Dice (``tta_gain``):
        ``infer.tta: null`` predicts with it only where it gained ``TTA_MIN_GAIN``. The passes are
        prediction's (``infer.tta_mirrors``); a model trained without mirroring gets none."""
        best = self.output_dir / "best.pt"
        if self.kind != SEGMENT or not self.val_cases or not self.history:
            return
        try:
            axes = tta_axes(self.config, self.plan)
        except ConfigError:
            return  # trained without mirroring: TTA is refused, nothing to weigh
        self.dist.barrier()  # best.pt is rank 0's
        # no best.pt when no validation ever gave a Dice (labels absent from every case)
        found = Checkpoint.load(best) if self.dist.is_main and best.is_file() else None
        weights = self.dist.from_main(found.weights if found and found.tta_gain is None else None)
        if weights is None:
            return  # weighed already: a finished run resumed
        model = copy.deepcopy(self.eval_model)
        model.load_state_dict(weights)
        model.eval()
        classes = [c for c in self.labels if c != 0]
        windows = windows_per_forward(self.config.infer.sw_batch_size, self.device, self.amp_dtype)
        flips = flip_passes(axes, resolve_mirrors(self.config.infer.tta_mirrors, axes))
        plain, mirrored = [], []
        for item in self._val_dataset() or []:
            ref = np.asarray(item["label"][0]).astype(np.int64)
            mean = ProbabilityMean()
            for flip in flips:
                probs = mirrored_pass(
                    model,
                    item["image"],
                    flip,
                    self.plan.window_size,
                    overlap=self.config.infer.overlap,
                    sw_batch_size=windows,
                    amp_dtype=self.amp_dtype,
                    channels_last=self.channels_last,
                )
                if not flip:
                    plain.append(dice_per_class(probs.argmax(0).numpy(), ref, classes, both_empty=math.nan))
                mean.add(probs)
            labels = mean.mean().argmax(0).numpy()
            mirrored.append(dice_per_class(labels, ref, classes, both_empty=math.nan))
        plain = [s for rank in self.dist.gather(plain) for s in rank]
        mirrored = [s for rank in self.dist.gather(mirrored) for s in rank]
        gain = _mean([_mean([s[c] for s in mirrored]) for c in classes]) - _mean(
            [_mean([s[c] for s in plain]) for c in classes]
        )
        if self.dist.is_main and math.isfinite(gain):
            found.tta_gain = round(gain, 6)
            found.save(best)
            verdict = "on" if tta_by_default(self.config, gain) else "off (--tta turns it on)"
            log.info(
                "flip TTA (%d passes) changed best.pt's validation Dice by %+.4f: prediction has it %s",
                len(flips),
                gain,
                verdict,
            )

    def _draw_validation(self, item: dict, labels: np.ndarray, ref: np.ndarray, scores: dict) -> None:
        """A picture of one validation case in the preprocessed space (RAS axes at the plan's
        spacing), replaced at each validation."""
        affine = np.diag([*self.plan.spacing, 1.0])
        image = image_from_ras(np.asarray(item["image"][0], dtype=np.float32), affine)
        pred, truth = (image_from_ras(np.ascontiguousarray(a, dtype=np.uint8), affine) for a in (labels, ref))
        dice = _mean(list(scores.values()))
        title = f"{item['id']}   epoch {self.epoch}, step {self.step}: mean Dice {dice:.3f}"
        target = self.output_dir / "validation" / f"{safe_name(str(item['id']))}.png"
        case_figure(pred, target, image, truth, self.labels, title)

    # -- bookkeeping ------------------------------------------------------------------------

    def _validation_due(self, done: bool) -> bool:
        """At the end, and every ``val_every`` epochs; with ``val_every`` null every 2, unless the
        run has trained for less than 9x the last validation's time since it (all ranks agree)."""
        every = self.config.train.val_every
        if not self.val_cases or (self.epoch % (every or 2) and not done):
            return False
        if done or every or self._validated is None:
            return True
        ended, seconds = self._validated
        return bool(self.dist.from_main(self.elapsed - ended >= VALIDATION_SHARE * seconds))

    def _progress(self, clock: float, total_steps: int) -> float:
        """How far the run is (0..1): the larger of steps and time used, agreed by all ranks."""
        max_time = self.config.train.max_time
        progress = self.step / total_steps
        if max_time:
            progress = self.dist.max(max(progress, (time.monotonic() - clock) / max_time))
        return progress

    def _set_lr(self, progress: float) -> None:
        train = self.config.train
        for group in self.optimizer.param_groups:
            group["lr"] = train.lr * lr_factor(progress, train.schedule, train.warmup)

    def _refuse_earlier_run(self) -> None:
        """Refuse a folder that holds another run, unless asked to overwrite it. Nothing is
        deleted: the new run's files replace the old ones as they are written, so a run that
        fails before its first checkpoint leaves the old model in place."""
        problem = None
        if self.dist.is_main and not self.resumed and not self.overwrite:
            if any((self.output_dir / n).exists() for n in ("last.pt", "best.pt", "metrics.csv")):
                problem = "already holds a training run; resume it, choose another folder or overwrite it"
        problem = self.dist.from_main(problem)
        if problem:
            raise InputError(self.output_dir, problem)

    def _write_run_files(self) -> None:
        """Write config, plan and splits (rank 0)."""
        if not self.dist.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.output_dir / "config.yaml")
        self.plan.save(self.output_dir / "plan.yaml")
        folds = {"folds": self.folds, "fold": self.config.data.fold} if self.folds else {}
        splits = {
            "train": [c["id"] for c in self.train_cases],
            "val": [c["id"] for c in self.val_cases],
            **folds,
        }
        write_text_atomic(self.output_dir / "splits.json", json.dumps(splits, indent=1))
        shared = self.config.data.splits
        if self.folds and shared and Path(shared).resolve() != (self.output_dir / "splits.json").resolve():
            # the folds every fold of this cross-validation takes (new cases added to them)
            Path(shared).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(shared), json.dumps({"folds": self.folds}, indent=1))
        if self.history:
            write_metrics(self.history, self._metric_columns(), self.output_dir / "metrics.csv")

    def _metric_columns(self) -> list[str]:
        dice = ["dice_mean"] + [f"dice_{n}" for c, n in self.labels.items() if c] + ["dice_mean_largest"]
        return ["epoch", "step", "time", "loss", "lr", "data_wait", *dice]

    def _end_epoch(self, row: dict) -> None:
        self.history.append(row)
        self._notify("on_epoch_end", row)
        dice = row.get("dice_mean")
        improved = dice is not None and dice > self.best_dice
        if improved:
            self.best_dice = dice
        if self.dist.is_main:
            write_metrics(self.history, self._metric_columns(), self.output_dir / "metrics.csv")
            checkpoint = self.checkpoint()
            # best before last: a kill between the two leaves last.pt older, and the resumed
            # run repeats the epoch and writes the same best.pt again.
            if improved or not self.val_cases:
                checkpoint.save(self.output_dir / "best.pt")
            checkpoint.save(self.output_dir / "last.pt")
            shown = ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("dice") or k == "loss")
            log.info("epoch %d: %s", row["epoch"], shown)

    def checkpoint(self) -> Checkpoint:
        """The run as it stands: the weights to predict with, and the state to resume."""
        training = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "elapsed": self.elapsed,
            "world_size": self.dist.world,
            "best_dice": self.best_dice,
            "history": self.history,
            "rng": rng_state(),
        }
        if self.ema is not None:
            training["train_model"] = _cpu_state(self.model)
            training["ema_updates"] = int(self.ema.n_averaged)
        if self.teacher is not None:
            training["teacher"] = self.teacher.state_dict()
        return Checkpoint(
            weights=_cpu_state(self.eval_model),
            config=self.config.to_dict(),
            labels=dict(self.labels),
            plan=self.plan.to_dict(),
            kind=self.kind,
            custom_model=self.custom_model,
            keep_largest=self.keep_largest,
            training=training,
        )

    def load_state(self, checkpoint: Checkpoint) -> None:
        """Continue from a checkpoint this trainer wrote (see ``Trainer.resume``)."""
        state = checkpoint.training
        self.model.load_state_dict(state.get("train_model", checkpoint.weights))
        if self.ema is not None:
            self.ema.module.load_state_dict(checkpoint.weights)
            self.ema.n_averaged.fill_(state.get("ema_updates", 0))
        if self.teacher is not None and "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.best_dice = float(state.get("best_dice", -math.inf))
        self.keep_largest = checkpoint.keep_largest
        self.history = list(state.get("history", []))
        set_rng_state(state.get("rng", {}))
        self.resumed = True


def _absolute_paths(config: Config) -> None:
    """Paths in the config made absolute, so that config.yaml (and --resume) finds the data
    from any working directory."""
    data, train = config.data, config.train
    for owner, key in (
        (data, "root"),
        (data, "plan"),
        (data, "splits"),
        (train, "init"),
        (train, "pseudo_labels"),
    ):
        value = getattr(owner, key)
        if value:
            setattr(owner, key, str(Path(value).resolve()))
    if train.unlabeled and train.unlabeled != "dataset":
        train.unlabeled = str(Path(train.unlabeled).resolve())


def _check_channels(plan: Plan, dataset: Cases, init: str) -> None:
    """Refuse a pretrained network whose input takes another number of image channels."""
    if dataset.training:
        channels = fingerprint(Cases(dataset.training[:1])).channels
        if channels != plan.channels:
            raise CheckpointError(
                init, f"was trained on {plan.channels}-channel images; this dataset has {channels}"
            )


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _time_left(progress: float, elapsed: float) -> str:
    """The whole run's time left, from its progress so far (the bar's own ETA is the epoch's)."""
    if progress <= 0:
        return "?"
    minutes, seconds = divmod(int(elapsed * (1 - progress) / progress), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace; it reads this when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
