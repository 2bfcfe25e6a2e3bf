"""Dice and HD95 of the prediction options, side by side: flip TTA and keep-largest-component.

Trains the demo's model on the sample heart data (a fixed number of steps, so the result does
not depend on the machine's speed) for several seeds, without mirroring (the demo) and with
mirroring along the given axes, then segments held-out phantoms with every combination of the
options and scores them on their own grids. With TTA it also measures whether the uncertainty
map points at the errors: its mean on wrongly against rightly labelled voxels.

    python scripts/quality_options.py --seeds 0 1 2 --flip-axes 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import make_phantoms  # noqa: E402

from medseg.config import load_config  # noqa: E402
from medseg.data.phantom import LABELS  # noqa: E402
from medseg.demo import DEMO_EPOCHS, SAMPLE_DATA  # noqa: E402
from medseg.evaluation.metrics import dice  # noqa: E402
from medseg.inference.postprocess import keep_largest_component  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.io import read_volume, to_array  # noqa: E402
from medseg.training.trainer import Trainer  # noqa: E402

CLASSES = [c for c in LABELS if c]


def train(work: Path, seed: int, flip_axes: list[int] | None) -> Path:
    name = f"flip{''.join(map(str, flip_axes))}" if flip_axes else "noflip"
    out = work / f"{name}_seed{seed}"
    if (out / "best.pt").is_file():
        return out / "best.pt"
    overrides = [f"train.epochs={DEMO_EPOCHS}", f"train.seed={seed}"]
    if flip_axes:
        overrides += ["augment.flip_prob=0.5", f"augment.flip_axes={flip_axes}"]
    config = load_config(None, overrides)
    config.data.root, config.train.output_dir = str(SAMPLE_DATA), str(out)
    Trainer(config, overwrite=True).fit()
    return out / "best.pt"


def hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    from monai.metrics import compute_hausdorff_distance

    a, b = torch.as_tensor(pred)[None, None], torch.as_tensor(ref)[None, None]
    return float(compute_hausdorff_distance(a, b, percentile=95, spacing=spacing))


def score(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    out = {}
    for c in CLASSES:
        out[f"dice_{LABELS[c]}"] = dice(pred == c, ref == c)
        out[f"hd95_{LABELS[c]}"] = hd95(pred == c, ref == c, spacing)
    out["dice_mean"] = float(np.mean([out[f"dice_{LABELS[c]}"] for c in CLASSES]))
    out["hd95_mean"] = float(np.mean([out[f"hd95_{LABELS[c]}"] for c in CLASSES]))
    return out


def evaluate(checkpoint: Path, cases: list[tuple[Path, Path]], tta: bool) -> dict[str, list[dict]]:
    """Scores per case of one model, with and without keep-largest; TTA as asked."""
    predictor = Predictor(checkpoint, device="cpu", tta=tta, keep_largest="none")
    found: dict[str, list[dict]] = {"plain": [], "largest": [], "uncertainty": [], "seconds": []}
    for image_path, label_path in cases:
        reference = read_volume(label_path)
        truth = to_array(reference)
        start = time.perf_counter()
        result = predictor.segment(predictor.load(image_path), uncertainty=tta)
        found["seconds"].append(time.perf_counter() - start)
        labels = np.array(result.labels)
        found["plain"].append(score(labels, truth, reference.GetSpacing()))
        cleaned = keep_largest_component(labels.copy(), CLASSES)
        found["largest"].append(score(cleaned, truth, reference.GetSpacing()))
        if tta:
            spread = sitk.GetArrayFromImage(result.uncertainty).transpose()
            wrong = labels != truth
            found["uncertainty"].append(
                {
                    "wrong": float(spread[wrong].mean()) if wrong.any() else 0.0,
                    "right": float(spread[~wrong].mean()),
                }
            )
    return found


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--flip-axes", type=int, nargs="+", default=[1, 2], help="axes the mirrored arm flips"
    )
    parser.add_argument("--heldout", type=int, default=10, help="extra held-out phantoms besides imagesTs")
    parser.add_argument("--work", default="quality_work")
    args = parser.parse_args()
    work = Path(args.work)
    extra = make_phantoms(work / "heldout", n_train=0, n_test=args.heldout, seed=5000)
    cases = [(p, SAMPLE_DATA / "labelsTs" / p.name) for p in sorted((SAMPLE_DATA / "imagesTs").iterdir())]
    cases += [(p, extra / "labelsTs" / p.name) for p in sorted((extra / "imagesTs").iterdir())]
    print(f"{len(cases)} held-out cases; seeds {args.seeds}; mirrored arm: axes {args.flip_axes}")
    rows: dict[str, list[float]] = {}
    for seed in args.seeds:
        for flip_axes in (None, args.flip_axes):
            checkpoint = train(work, seed, flip_axes)
            arm = f"mirror {args.flip_axes}" if flip_axes else "no mirroring"
            for tta in (False, True) if flip_axes else (False,):
                found = evaluate(checkpoint, cases, tta)
                for post in ("plain", "largest"):
                    largest = "on " if post == "largest" else "off"
                    key = f"{arm:<14} TTA {'on ' if tta else 'off'}  keep-largest {largest}"
                    for metric in ("dice_mean", "hd95_mean", *(f"dice_{LABELS[c]}" for c in CLASSES)):
                        rows.setdefault(f"{key} | {metric}", []).append(
                            statistics.mean(s[metric] for s in found[post])
                        )
                rows.setdefault(f"{arm:<14} TTA {'on ' if tta else 'off'} | seconds per case", []).append(
                    statistics.mean(found["seconds"])
                )
                if tta:
                    ratio = statistics.mean(u["wrong"] for u in found["uncertainty"]) / max(
                        1e-12, statistics.mean(u["right"] for u in found["uncertainty"])
                    )
                    rows.setdefault(f"{arm:<14} TTA on  | uncertainty wrong/right", []).append(ratio)
            print(f"seed {seed} done", flush=True)
    print(f"\nmean +- sd over {len(args.seeds)} seeds (each value: the mean over {len(cases)} cases)")
    for key, values in rows.items():
        print(f"{key:<70} {mean_sd(values)}   {[round(v, 4) for v in values]}")


if __name__ == "__main__":
    main()
