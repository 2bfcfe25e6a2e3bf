"""DistributedDataParallel under torchrun: two CPU processes over gloo."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from medseg.inference.predictor import Predictor
from medseg.io import read_volume
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


def test_two_process_gloo_run_trains_and_rank0_checkpoint_loads(tiny_dataset, tmp_path):
    run = tmp_path / "ddp"
    overrides = [*TINY_OVERRIDES, "train.epochs=2", "train.val_every=1", "data.val_fraction=0.5"]
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args += [
        "-m",
        "medseg",
        "train",
        "--data",
        str(tiny_dataset),
        "--output",
        str(run),
        "--set",
        "train.device=cpu",
    ]
    args += [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best validation Dice") == 1  # rank 0 reports

    payload = torch.load(run / "last.pt", weights_only=True)
    # Two steps per epoch on each of two ranks; the two validation cases split between the ranks
    # and gathered, each scored once.
    assert payload["world_size"] == 2
    assert payload["step"] == 4 and payload["epoch"] == 2
    assert [row["val_cases"] for row in payload["history"]] == [2, 2]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt"]

    predictor = Predictor(run / "best.pt", device="cpu")
    image = read_volume(tiny_dataset / "imagesTs" / "heart_003.nii.gz")
    assert predictor.predict_image(image).shape == image.GetSize()
