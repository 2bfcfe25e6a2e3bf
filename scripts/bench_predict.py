"""Batch prediction speed with and without reading the next case ahead, side by side.

Trains a checkpoint for a few steps (speed does not depend on the weights), then predicts the
same folder of phantoms with ``predict_many(prefetch=True)`` and ``prefetch=False`` in
alternating passes inside one process, and reports voxels per second of each, their spread and
the ratio. Run it alone on the machine: another job on the cores changes the figures.

    python scripts/bench_predict.py --cases 24 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import make_phantoms  # noqa: E402

from medseg.config import load_config  # noqa: E402
from medseg.inference.batch import predict_many  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.io import read_header  # noqa: E402
from medseg.training.trainer import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=24, help="volumes to predict per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes of each setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="bench_predict_work")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = make_phantoms(work / "data", n_train=4, n_test=args.cases)
    checkpoint = work / "run" / "best.pt"
    if not checkpoint.is_file():
        config = load_config(None, ["train.epochs=1", "train.iters_per_epoch=5"])
        config.data.root, config.train.output_dir = str(data), str(work / "run")
        Trainer(config, overwrite=True).fit()
    predictor = Predictor(checkpoint, device="cpu")
    images = data / "imagesTs"
    voxels = sum(int(np.prod(read_header(p).GetSize())) for p in sorted(images.iterdir()))
    rates: dict[str, list[float]] = {"prefetch": [], "one at a time": []}
    predict_many(predictor, images, work / "warm-up", overwrite=True)  # first-call costs out of the way
    for _ in range(args.repeats):
        for name, prefetch in (("prefetch", True), ("one at a time", False)):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            result = predict_many(predictor, images, out, prefetch=prefetch)
            rates[name].append(voxels / (time.perf_counter() - start))
            assert not result.failed, result.failed
    print(f"{args.cases} volumes, {voxels / args.cases / 1e3:.0f}k voxels each, {args.threads} threads")
    for name, values in rates.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:>14}: {statistics.mean(values) / 1e3:7.0f}k +- {spread / 1e3:.0f}k voxels/s  {values}")
    ratio = statistics.mean(rates["prefetch"]) / statistics.mean(rates["one at a time"])
    print(f"prefetch / one at a time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
