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


def _on_main_worker(rank: int, store: str, results: str) -> None:
    import json

    import torch.distributed as dist

    from medseg.errors import InputError
    from medseg.training.distributed import Distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ranks = Distributed(rank=rank, world=2)
    calls = []
    labels = ranks.on_main(lambda: calls.append(rank) or {0: "background", 1: "LV"})

    def refuse():
        calls.append(rank)
        raise InputError("data/", "2 training case(s) cannot be used (listed above)")

    try:
        ranks.on_main(refuse)
        error = None
    except InputError as exc:
        error = str(exc)
    Path(results, f"{rank}.json").write_text(json.dumps({"labels": labels, "calls": calls, "error": error}))
    dist.destroy_process_group()


def test_only_rank_0_checks_the_data_and_every_rank_gets_its_verdict(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_on_main_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["labels"] == {"0": "background", "1": "LV"}  # rank 0's result, on both
        assert got["calls"] == ([0, 0] if rank == 0 else [])  # the work ran on rank 0 alone
        assert got["error"] == "data/: 2 training case(s) cannot be used (listed above)"
