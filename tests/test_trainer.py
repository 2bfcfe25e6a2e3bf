import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.checkpoint import Checkpoint
from medseg.config import load_config
from medseg.data.plan import load_plan
from medseg.errors import ConfigError, InputError
from medseg.inference.predictor import Predictor
from medseg.models.factory import model_from_checkpoint
from medseg.training.trainer import Trainer
from tests.conftest import TINY_OVERRIDES


def test_checkpoint_holds_what_predict_needs(tiny_run):
    payload = torch.load(tiny_run["best"], weights_only=True)
    assert payload["format"] == "medseg-checkpoint/1"
    assert payload["labels"] == {0: "background", 1: "LV", 2: "myocardium", 3: "RV"}
    assert payload["plan"]["spacing"] == pytest.approx([4.4, 4.4, 10.0], abs=1e-3)
    assert payload["plan"]["normalization"] == "zscore"
    assert payload["config"]["model"]["channels"] == [8, 16]
    assert payload["step"] == 2
    assert {"model", "optimizer", "rng", "epoch"} <= set(payload)
    # infer.keep_largest: auto -> validation's choice, kept in the checkpoint, used by predict
    assert payload["config"]["infer"]["keep_largest"] == "auto"
    assert set(payload["keep_largest"]) <= {1, 2, 3}
    assert Predictor(tiny_run["best"], device="cpu").keep_largest == sorted(payload["keep_largest"])


def test_metrics_and_config_are_written(tiny_run):
    run = tiny_run["best"].rsplit("/", 1)[0]
    rows = list(csv.DictReader(open(f"{run}/metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1"]
    per_class = [float(rows[0][f"dice_{name}"]) for name in ("LV", "myocardium", "RV")]
    assert float(rows[0]["dice_mean"]) == pytest.approx(sum(per_class) / 3, abs=1e-4)
    assert float(rows[0]["dice_mean"]) == pytest.approx(
        torch.load(tiny_run["best"], weights_only=True)["best_dice"], abs=1e-4
    )
    saved = load_config(f"{run}/config.yaml")
    assert saved.model.channels == [8, 16]
    # config.yaml keeps what was asked for (a patch size; pooling null: planned), plan.yaml the
    # answer, and the network was built from the plan's pooling
    assert saved.data.patch_size == [32, 32, 8] and saved.model.strides is None
    plan = load_plan(f"{run}/plan.yaml")
    # 10 mm slices are not pooled by the stem; at 8.8 mm in-plane after it, they are.
    assert plan.stem_stride == [2, 2, 1]
    assert plan.strides == [[2, 2, 2]]
    net = model_from_checkpoint(Checkpoint.load(tiny_run["best"]))
    assert [list(s) for s in net.strides] == plan.strides


def test_time_budget_stops_training(tiny_dataset, tmp_path):
    config = load_config(None, [*TINY_OVERRIDES, "train.epochs=1000", "train.max_time=3"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    summary = Trainer(config).fit()
    assert summary["epochs"] < 1000
    assert summary["seconds"] < 60  # stopped near 3 s, plus one validation and the checkpoints
    assert (tmp_path / "run" / "best.pt").is_file()


def test_refuses_to_overwrite_a_run(tiny_run, tiny_dataset):
    run = Path(tiny_run["best"]).parent
    before = (run / "last.pt").read_bytes()
    config = load_config(None, TINY_OVERRIDES)
    config.data.root, config.train.output_dir = str(tiny_dataset), str(run)
    with pytest.raises(InputError, match="already holds a training run"):
        Trainer(config).fit()
    assert (run / "last.pt").read_bytes() == before


def test_needs_a_dataset():
    with pytest.raises(ConfigError, match="no dataset given"):
        Trainer(load_config(None))


@pytest.mark.parametrize("name", ["unet", "residual_unet", "attention_unet"])
def test_every_model_trains_with_deep_supervision(tiny_dataset, tmp_path, name):
    overrides = [
        *TINY_OVERRIDES,
        f"model.name={name}",
        "model.channels=[8, 16, 32]",
        "model.deep_supervision=true",
    ]
    config = load_config(None, overrides)
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit()
    assert summary["steps"] == 2
    changed = [
        k
        for k, v in trainer.model.state_dict().items()
        if v.dtype.is_floating_point and not torch.equal(v, before[k])
    ]
    assert any(k.startswith("ds_heads") for k in changed)  # the coarse heads were trained
    payload = torch.load(summary["best"], weights_only=True)
    assert payload["config"]["model"]["name"] == name


def test_unknown_model_name_is_a_config_error(tiny_dataset, tmp_path):
    config = load_config(None, [*TINY_OVERRIDES, "model.name=vnet"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    with pytest.raises(ConfigError, match="unknown model 'vnet'"):
        Trainer(config)


def test_trains_from_the_disk_cache(tiny_dataset, tmp_path):
    overrides = [*TINY_OVERRIDES, "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}"]
    for run in ("first", "second"):
        config = load_config(None, overrides)
        config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / run)
        assert Trainer(config).fit()["steps"] == 2
    # three training cases: two train, one validation; both runs share the same entries
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 3


class _Recorder:
    def __init__(self):
        self.calls = []

    def on_train_start(self, trainer):
        self.calls.append("start")

    def on_epoch_start(self, trainer, epoch):
        self.calls.append(f"epoch {epoch}")

    def on_validation_end(self, trainer, metrics):
        self.calls.append(f"val {sorted(metrics)}")

    def on_train_end(self, trainer, summary):
        self.calls.append(f"end {summary['steps']}")


def test_callbacks_hooks_and_a_custom_loss(tiny_dataset, tmp_path):
    losses = []

    def loss_fn(logits, label):
        loss = logits.float().square().mean()  # any differentiable function of the logits
        losses.append(float(loss.detach()))
        return loss

    config = load_config(None, [*TINY_OVERRIDES, "train.epochs=2", "train.val_every=1"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    recorder = _Recorder()

    class Overriding(Trainer):
        def on_validation_end(self, metrics):  # no super(): the callbacks must still hear of it
            self.heard = [*getattr(self, "heard", []), metrics["dice_mean"]]

    trainer = Overriding(config, callbacks=[recorder], loss_fn=loss_fn)
    trainer.fit()
    dice_keys = "['dice_LV', 'dice_RV', 'dice_mean', 'dice_mean_largest', 'dice_myocardium', 'val_cases']"
    assert recorder.calls == ["start", "epoch 1", f"val {dice_keys}", "epoch 2", f"val {dice_keys}", "end 4"]
    assert len(trainer.heard) == 2  # the override ran too
    assert len(losses) == 4


def test_a_custom_model_trains_and_is_marked(tiny_dataset, tmp_path):
    from medseg.errors import CheckpointError
    from medseg.inference.predictor import Predictor
    from medseg.models import build_model

    net = build_model("residual_unet", 3, 1, 4, channels=(8, 16), blocks_per_level=1)
    config = load_config(None, TINY_OVERRIDES)
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    trainer = Trainer(config, model=net)
    assert trainer.model is net
    summary = trainer.fit()
    with pytest.raises(CheckpointError, match="custom model"):
        Predictor(summary["best"], device="cpu")


def test_research_example_runs(tiny_dataset, tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "scripts/research_example.py", "--data", str(tiny_dataset)]
    args += ["--output", str(tmp_path / "r"), "--max-time", "2"]
    args += [a for o in TINY_OVERRIDES for a in ("--set", o)]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=300, cwd=__file__.rsplit("/tests/", 1)[0]
    )
    assert proc.returncode == 0, proc.stderr
    assert "validations, best Dice" in proc.stdout
    assert (tmp_path / "r" / "best.pt").is_file()


def test_training_logs_and_does_not_print(tiny_dataset, tmp_path, caplog, capsys):
    # Research code can capture or silence the library's messages; only the CLI prints.
    config = load_config(None, TINY_OVERRIDES)
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    with caplog.at_level("INFO", logger="medseg"):
        Trainer(config).fit()
    assert any(
        r.name == "medseg.training.trainer" and r.getMessage().startswith("epoch 1: loss=")
        for r in caplog.records
    )
    assert "epoch 1" not in capsys.readouterr().out


def test_validation_takes_at_most_a_tenth_of_a_run_unless_val_every_is_set():
    from types import SimpleNamespace

    def due(epoch, elapsed, validated, every=None, done=False):
        config = load_config(None, [] if every is None else [f"train.val_every={every}"])
        state = SimpleNamespace(
            config=config,
            val_cases=[{"id": "a"}],
            epoch=epoch,
            elapsed=elapsed,
            _validated=validated,
            dist=SimpleNamespace(from_main=lambda x: x),
        )
        return Trainer._validation_due(state, done)

    assert due(2, 10.0, None)  # the first time every 2 epochs
    assert not due(3, 10.0, None)
    # the last validation took 5 s and ended at 40 s: not again before 40 + 9 x 5 = 85 s
    assert not due(4, 80.0, (40.0, 5.0)) and due(4, 86.0, (40.0, 5.0))
    assert due(5, 41.0, (40.0, 5.0), done=True)  # always at the end
    assert due(4, 41.0, (40.0, 5.0), every=2)  # asked for: every 2 epochs, whatever it costs


class _AllLV(torch.nn.Module):
    """Every voxel class 1 (LV): its validation Dice is known from the labels alone."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:], device=x.device)
        logits[:, 1] = 10.0
        return logits + self.anchor


def test_validation_dice_is_the_dice_of_what_the_model_says(tiny_dataset, tmp_path):
    config = load_config(None, [*TINY_OVERRIDES, "data.val_fraction=0.5", "train.val_pictures=0"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    trainer = Trainer(config)
    trainer.model = _AllLV()
    result = trainer.validate()
    refs = [np.asarray(item["label"][0]) for item in trainer._val_dataset()]
    lv = np.mean([2 * (ref == 1).sum() / ((ref == 1).sum() + ref.size) for ref in refs])
    assert result["dice_LV"] == pytest.approx(lv, abs=1e-6)
    assert result["dice_myocardium"] == 0.0 and result["dice_RV"] == 0.0  # present, never predicted
    assert result["dice_mean"] == pytest.approx(lv / 3, abs=1e-6)
    assert result["val_cases"] == len(refs) >= 1
    # one piece per label: keeping the largest changes nothing, and a tie keeps it
    assert result["dice_mean_largest"] == pytest.approx(result["dice_mean"])
    assert trainer.keep_largest == [1, 2, 3]


class _FakeClock:
    """time.monotonic for the trainer: a training step costs 1 s, a validation 100 s."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_validation_is_off_the_time_budget(tiny_dataset, tmp_path, monkeypatch):
    import medseg.training.trainer as trainer_module

    clock = _FakeClock()
    # the trainer's own view of time only (threads elsewhere keep the real clock)
    monkeypatch.setattr(trainer_module, "time", type("FakeTime", (), {"monotonic": staticmethod(clock)}))

    class Timed(Trainer):
        def train_step(self, batch):
            clock.now += 1.0
            return super().train_step(batch)

        def validate(self):
            clock.now += 100.0
            return super().validate()

    overrides = [
        *TINY_OVERRIDES,
        "train.epochs=1000",
        "train.iters_per_epoch=2",
        "train.max_time=10",
        "train.val_every=1",
    ]
    config = load_config(None, overrides)
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    summary = Timed(config).fit()
    # 10 s of training buy 10 steps, however long the validations between them took
    assert summary["steps"] == 10
    assert summary["seconds"] == pytest.approx(10.0)


def test_a_run_without_validation_cases_keeps_its_final_weights(tiny_dataset, tmp_path):
    config = load_config(None, [*TINY_OVERRIDES, "train.epochs=2", "data.val_fraction=0"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    trainer = Trainer(config)
    validated = []
    trainer.callbacks.append(type("Spy", (), {"on_validation_end": lambda self, t, m: validated.append(m)})())
    trainer.fit()
    assert not trainer.val_cases and not validated  # every case trained, no time spent validating
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    final = {k: v for k, v in trainer.model.state_dict().items()}
    assert best["step"] == trainer.step == 2 * config.train.iters_per_epoch
    for name, value in final.items():
        torch.testing.assert_close(best["model"][name], value)


def _break_dataset(source: Path, target: Path) -> list[Path]:
    """A copy of a phantom dataset with an all-NaN scan, a truncated scan and a label holding
    a value the label map does not name; returns the three bad files."""
    import json
    import shutil

    import SimpleITK as sitk

    shutil.copytree(source, target)
    training = json.loads((target / "dataset.json").read_text())["training"]
    nan_image, cut_image = (target / training[k]["image"] for k in (0, 1))
    bad_label = target / training[2]["label"]
    image = sitk.ReadImage(str(nan_image))
    array = sitk.GetArrayFromImage(image).astype(np.float32) * np.nan
    nan = sitk.GetImageFromArray(array)
    nan.CopyInformation(image)
    sitk.WriteImage(nan, str(nan_image))
    cut_image.write_bytes(cut_image.read_bytes()[:-300])
    label = sitk.ReadImage(str(bad_label))
    array = sitk.GetArrayFromImage(label)
    array[0, 0, 0] = 7
    seven = sitk.GetImageFromArray(array)
    seven.CopyInformation(label)
    sitk.WriteImage(seven, str(bad_label))
    return [nan_image, cut_image, bad_label]


def test_bad_scans_over_a_finished_run_name_every_file_and_leave_the_model(tiny_dataset, tiny_run, tmp_path):
    import hashlib
    import shutil

    from tests.conftest import run_cli

    run = tmp_path / "run"
    shutil.copytree(Path(tiny_run["best"]).parent, run)
    kept = ("best.pt", "last.pt", "metrics.csv", "config.yaml", "plan.yaml", "splits.json")
    before = {n: hashlib.sha256((run / n).read_bytes()).hexdigest() for n in kept}
    bad = _break_dataset(tiny_dataset, tmp_path / "broken")
    settings = [arg for setting in TINY_OVERRIDES for arg in ("--set", setting)]
    for extra in ([], ["--overwrite"]):
        done = run_cli("train", "--data", str(tmp_path / "broken"), "--output", str(run), *extra, *settings)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and "FATAL" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
        for path in bad:
            assert sum(str(path) in line for line in errors) == 1, (path, errors)
    # a mistyped setting found only when the data are loaded: the run is kept too
    done = run_cli(
        "train",
        "--data",
        str(tiny_dataset),
        "--output",
        str(run),
        "--overwrite",
        *settings,
        "--set",
        "data.cache=dsk",
    )
    assert done.returncode == 2 and "data.cache" in done.stderr, done.stderr
    assert {n: hashlib.sha256((run / n).read_bytes()).hexdigest() for n in kept} == before


def test_a_training_batch_holds_patches_of_distinct_cases(tiny_dataset, tmp_path):
    overrides = [
        o for o in TINY_OVERRIDES if not o.startswith(("train.batch_size", "data.samples_per_volume"))
    ]
    config = load_config(None, [*overrides, "data.val_fraction=0"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    trainer = Trainer(config)
    assert (trainer.plan.batch_size, trainer.plan.samples_per_volume) == (2, 1)  # planned for 3D
    batches = iter(trainer._train_loader())
    for _ in range(3):
        batch = next(batches)
        assert batch["image"].shape[0] == 2
        assert len(set(batch["id"])) == 2, batch["id"]


class _Lopsided(torch.nn.Module):
    """Classes from each voxel's intensity plus a ramp along the first spatial axis: mirroring
    moves its answers, so flip TTA changes its Dice."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 3.0, -3.0, 0.0]).view(4, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.5]))

    def forward(self, x):
        ramp = torch.linspace(-2.0, 2.0, x.shape[2], device=x.device).view(1, -1, 1, 1)
        return self.conv(x) + torch.stack([0 * ramp, ramp, -ramp, 0 * ramp], dim=1)


def test_training_records_what_flip_tta_adds_to_best_validation_dice(tiny_dataset, tmp_path):
    from medseg.evaluation.metrics import dice_per_class
    from medseg.inference.sliding import sliding_window_probs

    mirrored = ["augment.flip_prob=0.5", "augment.flip_axes=[0]", "train.precision=fp32"]
    config = load_config(None, [*TINY_OVERRIDES, *mirrored, "data.val_fraction=0.5", "train.val_pictures=0"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    trainer = Trainer(config, model=_Lopsided())
    summary = trainer.fit()
    found = Checkpoint.load(summary["best"])
    model = _Lopsided()
    model.load_state_dict(found.weights)
    model.eval()

    def dice(probs, ref):  # mean over classes of the mean over cases, as validation's
        return dice_per_class(probs.argmax(0).numpy(), ref, [1, 2, 3], both_empty=float("nan"))

    plain, both = [], []
    for item in trainer._val_dataset():
        ref = np.asarray(item["label"][0]).astype(np.int64)
        window = trainer.plan.window_size
        probs = sliding_window_probs(model, item["image"], window, overlap=0.25, sw_batch_size=1)
        flipped = sliding_window_probs(
            model, torch.flip(item["image"], [1]), window, overlap=0.25, sw_batch_size=1
        )
        plain.append(dice(probs, ref))
        both.append(dice((probs + torch.flip(flipped, [1])) / 2, ref))
    gain = np.nanmean([np.nanmean([s[c] for s in both]) for c in (1, 2, 3)]) - np.nanmean(
        [np.nanmean([s[c] for s in plain]) for c in (1, 2, 3)]
    )
    assert abs(gain) > 1e-4  # the mirrors disagree: a gain of 0 would be a wrong one
    assert found.tta_gain == pytest.approx(gain, abs=1e-5)
    assert Checkpoint.load(summary["last"]).tta_gain is None  # weighed for best.pt's weights only


def test_a_run_trained_without_mirroring_records_no_tta_gain(tiny_dataset, tmp_path):
    config = load_config(None, [*TINY_OVERRIDES, "data.val_fraction=0.5", "train.val_pictures=0"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    assert Checkpoint.load(Trainer(config).fit()["best"]).tta_gain is None


def test_a_run_whose_validation_never_gave_a_dice_still_finishes(tiny_dataset, tmp_path, monkeypatch):
    mirrored = ["augment.flip_prob=0.5", "augment.flip_axes=[0]"]
    config = load_config(None, [*TINY_OVERRIDES, *mirrored, "data.val_fraction=0.5", "train.val_pictures=0"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    monkeypatch.setattr(Trainer, "validate", lambda self: {"dice_mean": float("nan")})  # no label seen
    summary = Trainer(config).fit()
    assert not Path(summary["best"]).exists() and Path(summary["last"]).is_file()  # nothing to weigh
