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


def write_dicom_series(
    image, folder, uid="1.2.826.0.1.3680043.2.1125.1", description="cine SA", skip=(), nudge=None
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
            "0008|0060": "MR",
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
