"""Shared fixtures: tiny phantom datasets and a tiny checkpoint, made once per session."""

from __future__ import annotations

import pytest
import torch

from medseg.config import load_config
from medseg.data.phantom import make_dataset
from medseg.training.trainer import Trainer

TINY_SHAPE = (40, 40, 12)
TINY_SPACING = (4.4, 4.4, 10.0)
# Settings that train in seconds on tiny volumes.
TINY_OVERRIDES = [
    "data.patch_size=[32, 32, 8]",
    "model.channels=[8, 16]",
    "train.epochs=1",
    "train.iters_per_epoch=2",
    "train.batch_size=1",
    "data.samples_per_volume=1",
]


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """An MSD-style dataset of 3 training and 2 test phantoms (RAS, LPS, oblique...)."""
    return make_dataset(tmp_path_factory.mktemp("data") / "heart", 3, 2, TINY_SHAPE, TINY_SPACING)


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory):
    """A run folder trained for two steps on the tiny dataset."""
    config = load_config(None, TINY_OVERRIDES)
    config.data.root = str(tiny_dataset)
    config.train.output_dir = str(tmp_path_factory.mktemp("runs") / "tiny")
    summary = Trainer(config).fit()
    return summary
