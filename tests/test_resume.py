"""Exact resume: a run killed with SIGKILL and resumed ends with the weights of one that never stopped."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medseg.config import load_config
from medseg.errors import InputError
from medseg.training.trainer import Trainer
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [
    *TINY_OVERRIDES,
    "train.epochs=4",
    "train.val_every=2",
    "train.deterministic=true",
    "train.ema_decay=0.9",
    "augment.flip_prob=0.5",
]
# Runs the trainer and kills its own process with SIGKILL right after step 5 (inside epoch 3).
KILLED_RUN = """
import os, signal, sys
import medseg

class KilledMidEpoch(medseg.Trainer):
    def train_step(self, batch):
        loss = super().train_step(batch)
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

config = medseg.load_config(None, sys.argv[3:])
config.data.root, config.train.output_dir = sys.argv[1], sys.argv[2]
KilledMidEpoch(config).fit()
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}


def _run(args):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO, env=_env())


def whole_and_resumed(
    data: Path, tmp_path: Path, settings: list[str], killed_at_epoch: int | None = None
) -> tuple[dict, dict]:
    """The ``last.pt`` of a run with ``settings`` that never stopped (in ``tmp_path/whole``), and
    of the same run killed with SIGKILL after step 5 (``KILLED_RUN``; checked to have saved
    ``killed_at_epoch`` when given) and resumed with ``medseg train --resume`` (``tmp_path/killed``)."""
    config = load_config(None, settings)
    config.data.root, config.train.output_dir = str(data), str(tmp_path / "whole")
    Trainer(config).fit()
    run = tmp_path / "killed"
    killed = _run([sys.executable, "-c", KILLED_RUN, str(data), str(run), *settings])
    assert killed.returncode == -9, killed.stderr
    if killed_at_epoch is not None:
        assert torch.load(run / "last.pt", weights_only=True)["epoch"] == killed_at_epoch
    resumed = _run([sys.executable, "-m", "medseg", "train", "--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr
    return tuple(torch.load(folder / "last.pt", weights_only=True) for folder in (tmp_path / "whole", run))


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    whole, again = whole_and_resumed(tiny_dataset, tmp_path, SETTINGS, killed_at_epoch=2)
    run = tmp_path / "killed"
    assert again["step"] == whole["step"] == 8
    for key in ("model", "train_model"):  # the moving average and the raw weights
        for name, tensor in whole[key].items():
            torch.testing.assert_close(again[key][name], tensor, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    assert again["ema_updates"] == whole["ema_updates"] == 8
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    expected = list(csv.DictReader((tmp_path / "whole" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]
    assert [r["dice_mean"] for r in rows] == [r["dice_mean"] for r in expected]


def test_resume_trains_on_with_more_epochs(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(Path(tiny_run["last"]).parent, run)
    trainer = Trainer.resume(run, ["train.epochs=2"])
    assert (trainer.epoch, trainer.step) == (1, 2)
    summary = trainer.fit()
    assert (summary["epochs"], summary["steps"]) == (2, 4)
    assert [r["epoch"] for r in csv.DictReader((run / "metrics.csv").open())] == ["1", "2"]


def test_resume_needs_a_run_folder(tmp_path):
    from medseg.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Trainer.resume(tmp_path)


def test_a_second_run_into_the_same_folder_points_to_resume(tiny_run):
    config = load_config(Path(tiny_run["last"]).parent / "config.yaml")
    with pytest.raises(InputError, match="resume it, choose another folder or overwrite it"):
        Trainer(config).fit()
