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
    "augment.flip_prob=0",  # one prediction pass (no flip TTA); the tests that mirror say so
]


def run_cli(*args, timeout: int = 600):
    """``python -m medseg ARGS`` from a neutral folder (so the installed package is used, not the
    source tree), its output captured."""
    import subprocess
    import sys
    import tempfile

    return subprocess.run(
        [sys.executable, "-m", "medseg", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tempfile.gettempdir(),
    )


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


LEARNED_SHAPE = (64, 56, 16)  # not square: a transposed mask cannot pass
LEARNED_SPACING = (2.8, 2.8, 7.0)


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory):
    """The default ``unet`` trained for a fixed, seeded 200 steps on four small phantoms (about
    30 s): a model whose masks are good enough to check (mean foreground Dice about 0.93-0.96),
    so tests can tell a right mask from an empty, mirrored or shuffled one."""
    root = make_dataset(tmp_path_factory.mktemp("learn") / "heart", 4, 2, LEARNED_SHAPE, LEARNED_SPACING)
    config = load_config(
        None,
        [
            "train.epochs=1",
            "train.iters_per_epoch=200",
            "data.val_fraction=0",
            "train.tensorboard=false",
            "augment.flip_prob=0",  # its masks come from one pass: quick, and what the tests assume
        ],
    )
    config.data.root, config.train.output_dir = str(root), str(tmp_path_factory.mktemp("run"))
    return root, Trainer(config).fit()


def learned_phantom(seed: int, orientation: str = "ras"):
    """A phantom (image, label) on the geometry ``learned_run`` was trained on."""
    from medseg.data.phantom import make_phantom

    return make_phantom(seed, shape=LEARNED_SHAPE, spacing=LEARNED_SPACING, orientation=orientation)


def mean_dice(mask, label) -> float:
    """Mean Dice of classes 1-3 between two label images (or (i, j, k) arrays)."""
    import numpy as np

    from medseg.evaluation.metrics import dice_per_class
    from medseg.io import to_array

    got, ref = (to_array(x) if not isinstance(x, np.ndarray) else x for x in (mask, label))
    return float(np.mean(list(dice_per_class(got, ref, [1, 2, 3]).values())))


def write_dicom_series(
    image,
    folder,
    uid="1.2.826.0.1.3680043.2.1125.1",
    description="cine SA",
    skip=(),
    nudge=None,
    modality="MR",
):
    """Write a 3D SimpleITK image as a DICOM series, one file per slice.

    Slices in ``skip`` are left out; ``nudge`` maps a slice index to mm to move it along the slice
    normal (to make uneven spacing).
    """
    import locale

    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    # GDCM's writer switches the process locale to "C", which would make Python's default text
    # encoding ASCII for the rest of the test session; put it back afterwards.
    saved_locale = locale.setlocale(locale.LC_ALL)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    image = sitk.Cast(image, sitk.sitkInt16)
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        piece = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        normal = (d[2], d[5], d[8])
        position = [p + (nudge or {}).get(k, 0.0) * n for p, n in zip(position, normal)]
        tags = {
            "0008|0060": modality,
            "0008|103e": description,
            "0020|000d": uid + ".0",
            "0020|000e": uid,
            "0020|0052": uid + ".9",
            "0010|0020": "PHANTOM-1",
            "0010|0010": "Phantom^Heart",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0008|0018": f"{uid}.{k + 1}",
        }
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{uid.replace('.', '_')}_{k:03d}.dcm"))
        writer.Execute(piece)
    locale.setlocale(locale.LC_ALL, saved_locale)
    return folder
