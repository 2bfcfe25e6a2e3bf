"""Training throughput: steps per second and the share of time spent waiting for data.

python scripts/bench_train.py [--data sample_data/heart] [--steps 12] [--model unet]

Each setting trains two epochs of ``--steps`` steps with the real Trainer (no validation); the
first warms up (caches the volumes, primes the allocator) and the second is measured. All
settings run side by side in one process, so their ratios are comparable even when the
machine's absolute speed drifts.
"""

import argparse
import tempfile
from pathlib import Path

import torch

import medseg

SETTINGS = {
    "fp32": ["train.precision=fp32", "train.channels_last=false"],
    "bf16": ["train.precision=bf16", "train.channels_last=false"],
    "bf16 + channels_last": ["train.precision=bf16", "train.channels_last=true"],
    "bf16 + channels_last, 1 worker": [
        "train.precision=bf16",
        "train.channels_last=true",
        "data.num_workers=1",
    ],
}


def measure(data: str, steps: int, model: str, extra: list[str], folder: Path) -> dict:
    config = medseg.load_config(
        None,
        [
            f"data.root={data}",
            f"train.output_dir={folder}",
            "data.val_fraction=0",
            "train.epochs=2",
            f"train.iters_per_epoch={steps}",
            f"model.name={model}",
            "train.tensorboard=false",
            *extra,
        ],
    )
    trainer = medseg.Trainer(config, overwrite=True)
    trainer.fit()
    warm, timed = trainer.history
    seconds = timed["time"] - warm["time"]
    return {"it/s": steps / seconds, "s/step": seconds / steps, "data wait": timed["data_wait"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "sample_data" / "heart"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default="unet")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, extra) in enumerate(SETTINGS.items()):
            results[name] = measure(args.data, args.steps, args.model, extra, Path(tmp) / str(k))
    base = results["fp32"]["it/s"]
    print("| setting | it/s | s/step | speed vs fp32 | data wait |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        speed = r["it/s"] / base
        print(f"| {name} | {r['it/s']:.2f} | {r['s/step']:.3f} | {speed:.2f}x | {r['data wait']:.1%} |")


if __name__ == "__main__":
    main()
