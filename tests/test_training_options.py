"""Trainer options: precision with gradient scaling, optimisers and schedules, EMA, compile,
TensorBoard, cross-validation folds and cases passed in directly."""

import csv
import json
import math
import shutil

import pytest
import torch

from medseg.cli import main
from medseg.config import load_config
from medseg.data.datasets import find_cases, fold_splits
from medseg.errors import ConfigError, InputError
from medseg.inference.predictor import Predictor
from medseg.training.optim import ema_decay_at, lr_factor, make_ema
from medseg.training.trainer import Trainer
from tests.conftest import TINY_OVERRIDES


def _trainer(root, tmp_path, *overrides, **kwargs):
    config = load_config(None, [*TINY_OVERRIDES, *overrides])
    config.data.root, config.train.output_dir = (str(root) if root else None), str(tmp_path / "run")
    return Trainer(config, **kwargs)


def test_schedules_warm_up_then_decay():
    assert lr_factor(0.015, "cosine", warmup=0.03) == pytest.approx(0.5)
    assert lr_factor(0.03, "cosine", warmup=0.03) == pytest.approx(1.0)
    assert lr_factor(0.515, "cosine", warmup=0.03) == pytest.approx(0.5)
    assert lr_factor(0.515, "poly", warmup=0.03) == pytest.approx(0.5**0.9)
    assert lr_factor(1.0, "poly") == 0.01  # never quite zero
    with pytest.raises(ConfigError, match="train.schedule"):
        lr_factor(0.5, "step")


def test_each_model_has_its_own_learning_rate_unless_one_is_set(tiny_dataset, tmp_path):
    expected = {"unet": 3e-3, "residual_unet": 2e-3, "attention_unet": 2e-3}
    for name, lr in expected.items():
        trainer = _trainer(tiny_dataset, tmp_path / name, f"model.name={name}")
        assert trainer.config.train.lr == lr  # resolved, so config.yaml records it
        assert trainer.optimizer.param_groups[0]["lr"] == lr
    trainer = _trainer(tiny_dataset, tmp_path / "set", "model.name=residual_unet", "train.lr=0.05")
    assert trainer.config.train.lr == 0.05


def test_sgd_poly_with_fp16_gradient_scaling(tiny_dataset, tmp_path):
    trainer = _trainer(
        tiny_dataset,
        tmp_path,
        "train.optimizer=sgd",
        "train.schedule=poly",
        "train.precision=fp16",
        "train.epochs=2",
    )
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults["nesterov"]
    assert trainer.scaler.is_enabled()
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}  # not norm statistics
    summary = trainer.fit()
    payload = torch.load(summary["last"], weights_only=True)
    # the scaler ran (a disabled one saves no state) and its scale is a power of two it backed
    # off to or grew to from 2**16
    assert math.log2(payload["scaler"]["scale"]) in range(0, 33)
    # and it let steps through: the weights moved (a step skipped on inf gradients leaves them)
    assert any(
        not torch.equal(start[k], v)
        for k, v in payload["train_model" if "train_model" in payload else "model"].items()
        if k in start
    )
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[1] < lrs[0] and all(math.isfinite(float(r["loss"])) for r in rows)
    assert all(0.0 <= float(r["data_wait"]) <= 1.0 for r in rows)


def test_ema_is_the_warmed_up_average_of_the_weights():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(model, 0.9)
    for value in (1.0, 3.0, 5.0):
        model.weight.data.fill_(value)
        ema.update_parameters(model)
    # the first update copies; then decays min(0.9, 2/11) and min(0.9, 3/12)
    first = 2 / 11 * 1.0 + 9 / 11 * 3.0
    assert ema.module.weight.item() == pytest.approx(0.25 * first + 0.75 * 5.0)
    assert [ema_decay_at(0.999, n) for n in (0, 990, 10000)] == [0.1, 0.991, 0.999]
    # 200 steps at a new weight: the average has moved there, not stayed with the first step
    slow = make_ema(model, 0.999)
    model.weight.data.fill_(0.0)
    slow.update_parameters(model)
    model.weight.data.fill_(1.0)
    for _ in range(200):
        slow.update_parameters(model)
    assert slow.module.weight.item() > 0.95  # a fixed 0.999 would give 1 - 0.999**200 = 0.18


class _Recording(Trainer):
    """Keeps the weights after every step, to recompute the average the run saved."""

    def train_step(self, batch):
        loss = super().train_step(batch)
        self.seen = [
            *getattr(self, "seen", []),
            {k: v.detach().clone() for k, v in self.model.state_dict().items()},
        ]
        return loss


def test_ema_weights_are_validated_and_saved(tiny_dataset, tmp_path):
    config = load_config(None, [*TINY_OVERRIDES, "train.ema_decay=0.5", "train.iters_per_epoch=3"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    trainer = _Recording(config)
    summary = trainer.fit()
    payload = torch.load(summary["best"], weights_only=True)
    assert payload["ema_updates"] == 3
    name = next(k for k, v in payload["model"].items() if v.is_floating_point() and v.ndim > 1)
    steps = [weights[name] for weights in trainer.seen]
    expected = steps[0]
    for n, weights in enumerate(steps[1:], start=1):
        decay = ema_decay_at(0.5, n)
        expected = decay * expected + (1 - decay) * weights
    torch.testing.assert_close(payload["model"][name], expected)  # the saved weights are the average
    torch.testing.assert_close(payload["train_model"][name], steps[-1])  # and the raw ones beside
    with pytest.raises(ConfigError, match="ema_decay"):
        _trainer(tiny_dataset, tmp_path, "train.ema_decay=1.5")


@pytest.mark.skipif(not shutil.which("c++"), reason="torch.compile on CPUs needs a C++ compiler")
def test_compiled_training_saves_plain_weights(tiny_dataset, tmp_path):
    trainer = _trainer(tiny_dataset, tmp_path, "train.compile=true", "train.precision=fp32")
    summary = trainer.fit()
    payload = torch.load(summary["best"], weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in payload["model"])
    assert trainer.net is not trainer.model  # the step ran the compiled network
    # the uncompiled network, loaded from the file, computes what the compiled one trained to
    plain = Predictor(summary["best"], device="cpu").model
    trainer.net.eval()
    x = torch.randn(1, 1, *trainer.plan.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trainer.net(x), rtol=1e-4, atol=1e-4)


def test_tensorboard_scalars_are_written(tiny_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _trainer(tiny_dataset, tmp_path, "train.tensorboard=true").fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "validation/dice_mean"} <= set(tags)
    assert events.Scalars("train/loss")[0].step == 2


def test_folds_are_seeded_disjoint_and_cover_every_case():
    cases = [{"id": f"c{k}"} for k in range(11)]
    splits = fold_splits(cases, 5, seed=0)
    vals = [set(s["val"]) for s in splits]
    assert sorted(len(v) for v in vals) == [2, 2, 2, 2, 3]
    assert set().union(*vals) == {c["id"] for c in cases}
    assert all(set(s["train"]) == {c["id"] for c in cases} - set(s["val"]) for s in splits)
    assert fold_splits(cases, 5, seed=0) == splits and fold_splits(cases, 5, seed=1) != splits
    with pytest.raises(Exception, match="needs 2 to 11 folds"):
        fold_splits(cases, 12, seed=0)


def test_cli_fold_trains_in_its_own_folder(tiny_dataset, tmp_path):
    args = [
        "train",
        "--data",
        str(tiny_dataset),
        "--output",
        str(tmp_path / "cv"),
        "--fold",
        "1",
        "--folds",
        "3",
    ]
    assert main(args + [a for o in TINY_OVERRIDES for a in ("--set", o)]) == 0
    saved = json.loads((tmp_path / "cv" / "fold_1" / "splits.json").read_text())
    assert saved["val"] == saved["folds"][1]["val"] and len(saved["val"]) == 1
    assert sorted(saved["train"] + saved["val"]) == ["heart_000", "heart_001", "heart_002"]


def test_cases_passed_in_directly(tiny_dataset, tmp_path):
    cases = [{"image": c["image"], "label": c["label"]} for c in find_cases(tiny_dataset).training]
    with pytest.raises(InputError, match="needs an 'image' and a 'label'"):
        _trainer(None, tmp_path, train_cases=[{"image": cases[0]["image"]}])
    with pytest.raises(InputError, match="case id given 2 times"):
        _trainer(None, tmp_path, train_cases=[cases[0], cases[0]])
    trainer = _trainer(None, tmp_path, train_cases=cases[:2], val_cases=cases[2:])
    assert [c["id"] for c in trainer.val_cases] == ["heart_002"]
    assert trainer.fit()["steps"] == 2
    assert json.loads((tmp_path / "run" / "splits.json").read_text())["train"] == ["heart_000", "heart_001"]


def test_bf16_channels_last_trains_on_the_cpu(tiny_dataset, tmp_path):
    trainer = _trainer(
        tiny_dataset, tmp_path, "train.device=cpu", "train.precision=bf16", "train.channels_last=true"
    )
    assert trainer.amp_dtype is torch.bfloat16 and trainer.channels_last
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    trainer.fit()
    row = trainer.history[-1]
    assert row["loss"] == row["loss"] and row["step"] == 2  # finite, two steps
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    assert next(trainer.model.parameters()).dtype is torch.float32  # autocast keeps fp32 masters
