"""medseg against a plain MONAI script, side by side on held-out phantoms, in one run.

Both arms get the same training cases, the same time budget and the same threads, then predict
the same test cases as whole processes. Reported per arm: Dice and HD95 per class (on the input
grid), training steps, prediction voxels/s (input voxels over the whole process's wall time,
start-up, loading and saving included, over the test set linked ``--copies`` times: 32 volumes
by default) and peak RSS. ``--repeats N`` alternates the arms and
gives mean +- std.

The MONAI arm is a script written from MONAI's spleen tutorial: UNet(16, 32, 64, 128, 256;
strides 2; 2 residual units; batch norm), DiceCE, Adam 1e-3, RandCropByPosNegLabeld (96x96x32,
2 samples), spacing 1.5 x 1.5 x 3 mm, fp32, sliding_window_inference (overlap 0.5, Gaussian),
Invertd back onto the input grid and SaveImaged.

    python scripts/benchmark.py --budget 240 --repeats 3
    python scripts/benchmark.py --budget 75 --train 5 --model residual_unet
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
LABELS = {0: "background", 1: "LV", 2: "myocardium", 3: "RV"}
ORIENTATIONS = ("ras", "lps", "flipped", "oblique")


def make_phantoms(folder: Path, n_train: int, n_test: int, seed: int = 1000, variety: float = 1.0) -> Path:
    """An MSD-style set of phantoms with varied orientation and spacing (1.1-1.5 mm in-plane,
    2.6-3.9 mm between slices), covering the same field of view as the sample data. ``variety``
    is ``make_phantom``'s."""
    import SimpleITK as sitk

    from medseg.data.phantom import make_phantom

    if (folder / "dataset.json").is_file():
        return folder
    rng = np.random.default_rng(seed)
    entries = {"training": [], "test": []}
    for k in range(n_train + n_test):
        split, tag = ("training", "Tr") if k < n_train else ("test", "Ts")
        spacing = (rng.uniform(1.1, 1.5),) * 2 + (rng.uniform(2.6, 3.9),)
        shape = tuple(int(round(fov / s)) for fov, s in zip((170, 170, 125), spacing))
        image, label = make_phantom(seed + k, shape, spacing, ORIENTATIONS[k % len(ORIENTATIONS)], variety)
        name = f"case_{k:03d}.nii.gz"
        for kind, volume in (("images", image), ("labels", label)):
            (folder / f"{kind}{tag}").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(volume, str(folder / f"{kind}{tag}" / name), useCompression=True)
        entries[split].append({"image": f"./images{tag}/{name}", "label": f"./labels{tag}/{name}"})
    meta = {"name": "benchmark phantoms", "modality": {"0": "MRI"}, "labels": LABELS, **entries}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return folder


# -- the arms: each step runs as its own process ---------------------------------------------


def _child(step: str, args: list[str], threads: int) -> dict:
    """Run ``benchmark.py _STEP args`` in a fresh process; its last stdout line is JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(HERE), f"_{step}", *args], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"{step} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ``ru_maxrss``: Linux carries that over from the parent
    through exec, so a child would report its parent's peak if that were larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _medseg_train(data: str, out: str, budget: str, model: str, extra: str) -> dict:
    import torch

    import medseg

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    overrides = [f"train.max_time={budget}", f"model.name={model}", *filter(None, extra.split(";"))]
    config = medseg.load_config(None, overrides)
    config.data.root, config.train.output_dir = data, out
    summary = medseg.Trainer(config, overwrite=True).fit()
    return {"steps": summary["steps"], "train_seconds": summary["seconds"], "rss_mb": peak_rss_mb()}


def _medseg_predict(checkpoint: str, images: str, out: str) -> dict:
    # As a batch user runs it: the command line, in this process (start-up included in the wall).
    from medseg.cli import main

    code = main(["predict", "--model", checkpoint, "--input", images, "--output", out, "--overwrite"])
    return {"code": code, "rss_mb": peak_rss_mb()}


def _monai_transforms(with_label: bool):
    from monai import transforms as mt

    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    return [
        mt.LoadImaged(keys),
        mt.EnsureChannelFirstd(keys),
        mt.Orientationd(keys, axcodes="RAS"),
        mt.Spacingd(keys, pixdim=(1.5, 1.5, 3.0), mode=modes),
        mt.NormalizeIntensityd("image", nonzero=True),
        mt.CropForegroundd(keys, source_key="image", allow_smaller=True),
    ]


def _monai_net():
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    return UNet(
        3, 1, 4, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm=Norm.BATCH
    )


def _monai_train(data: str, out: str, budget: str) -> dict:
    import torch
    from monai import transforms as mt
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(0)
    meta = json.loads(Path(data, "dataset.json").read_text())
    files = [{k: str(Path(data, v)) for k, v in e.items()} for e in meta["training"]]
    train = mt.Compose(
        _monai_transforms(True)
        + [
            mt.SpatialPadd(["image", "label"], (96, 96, 32)),
            mt.RandCropByPosNegLabeld(
                ["image", "label"], "label", (96, 96, 32), pos=1, neg=1, num_samples=2, image_key="image"
            ),
        ]
    )
    loader = DataLoader(CacheDataset(files, train, progress=False), batch_size=1, shuffle=True)
    net = _monai_net()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    steps, began = 0, time.monotonic()
    while time.monotonic() - began < float(budget):
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            steps += 1
            if time.monotonic() - began >= float(budget):
                break
    torch.save(net.state_dict(), Path(out) / "monai.pt")
    return {"steps": steps, "train_seconds": time.monotonic() - began, "rss_mb": peak_rss_mb()}


def _monai_predict(checkpoint: str, images: str, out: str) -> dict:
    import torch
    from monai import transforms as mt
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    pre = mt.Compose(_monai_transforms(False))
    post = mt.Compose(
        [
            mt.Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
            mt.AsDiscreted("pred", argmax=True),
            mt.SaveImaged("pred", output_dir=out, output_postfix="", separate_folder=False, resample=False),
        ]
    )
    net = _monai_net()
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    net.eval()
    files = [{"image": str(p)} for p in sorted(Path(images).glob("*.nii.gz"))]
    with torch.inference_mode():
        for batch in DataLoader(Dataset(files, pre), batch_size=1):
            batch["pred"] = sliding_window_inference(batch["image"], (96, 96, 32), 4, net, 0.5, "gaussian")
            for item in decollate_batch(batch):
                post(item)
    return {"rss_mb": peak_rss_mb()}


# -- scoring ---------------------------------------------------------------------------------


def score(pred_dir: Path, ref_dir: Path) -> dict:
    """Mean Dice and HD95 (mm) per foreground class over the test cases, on the input grid."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    from medseg.evaluation.metrics import dice
    from medseg.io import read_volume, to_array

    dices = {c: [] for c in LABELS if c}
    hd95 = {c: [] for c in LABELS if c}
    for ref_path in sorted(ref_dir.glob("*.nii.gz")):
        pred_path = pred_dir / ref_path.name
        ref_image = read_volume(ref_path)
        ref = to_array(ref_image)
        pred = to_array(read_volume(pred_path)) if pred_path.is_file() else np.zeros_like(ref)
        if pred.shape != ref.shape:
            sys.exit(f"{pred_path}: shape {pred.shape} is not the input's {ref.shape}")
        for c in dices:
            dices[c].append(dice(pred == c, ref == c))
            a = torch.as_tensor(pred == c)[None, None]
            b = torch.as_tensor(ref == c)[None, None]
            hd = compute_hausdorff_distance(a, b, percentile=95, spacing=ref_image.GetSpacing())
            hd95[c].append(float(hd))
    result = {f"dice_{LABELS[c]}": float(np.nanmean(v)) for c, v in dices.items()}
    result["dice_mean"] = float(np.mean(list(result.values())))
    result.update({f"hd95_{LABELS[c]}": float(np.nanmean(v)) for c, v in hd95.items()})
    return result


def speed_folder(data: Path, copies: int) -> Path:
    """The test images, each linked ``copies`` times (the first under its own name), so that
    prediction speed is measured over a batch, as a hospital runs it, not over a handful."""
    folder = data / f"speed_{copies}"
    if not folder.is_dir():
        folder.mkdir()
        for image in sorted((data / "imagesTs").glob("*.nii.gz")):
            for k in range(copies):
                name = image.name if k == 0 else image.name.replace(".nii.gz", f"_copy{k}.nii.gz")
                (folder / name).symlink_to(image.resolve())
    return folder


def run_arm(arm: str, data: Path, work: Path, args) -> dict:
    run = work / arm
    run.mkdir(parents=True, exist_ok=True)
    if arm == "medseg":
        trained = _child(
            "medseg_train", [str(data), str(run), str(args.budget), args.model, args.set], args.threads
        )
        checkpoint = str(run / "best.pt")
    else:
        trained = _child("monai_train", [str(data), str(run), str(args.budget)], args.threads)
        checkpoint = str(run / "monai.pt")
    preds, images = run / "predictions", speed_folder(data, args.copies)
    predicted = _child(f"{arm}_predict", [checkpoint, str(images), str(preds)], args.threads)
    voxels = sum(int(np.prod(_size(p))) for p in images.glob("*.nii.gz"))
    return {
        **score(preds, data / "labelsTs"),
        "steps": trained["steps"],
        "train_wall": trained["wall"],
        "train_rss_mb": trained["rss_mb"],
        "predict_wall": predicted["wall"],
        "predict_voxels_per_s": voxels / predicted["wall"],
        "predict_rss_mb": predicted["rss_mb"],
    }


def _size(path: Path) -> tuple:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize()


def report(results: dict[str, list[dict]]) -> str:
    """A Markdown table: mean +- std over the repeats, arms side by side."""
    arms = list(results)
    keys = list(results[arms[0]][0])
    lines = ["| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for key in keys:
        cells = []
        for arm in arms:
            values = [r[key] for r in results[arm]]
            spread = f" ± {statistics.stdev(values):.3g}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.4g}{spread}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if len(arms) == 2:
        a, b = (statistics.mean(r["predict_voxels_per_s"] for r in results[x]) for x in arms)
        lines.append(f"\nprediction speed {arms[0]} / {arms[1]}: {a / b:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per arm")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", type=int, default=12, help="training cases")
    parser.add_argument("--test", type=int, default=8, help="test cases")
    parser.add_argument("--copies", type=int, default=4, help="prediction speed over the test set x this")
    parser.add_argument("--model", default="unet", help="medseg's model.name")
    parser.add_argument("--set", default="", help="extra medseg overrides, ';'-separated")
    parser.add_argument("--arms", default="medseg,monai")
    parser.add_argument("--work", default="bench_work", help="folder for data, runs and results")
    args = parser.parse_args()

    work = Path(args.work)
    data = make_phantoms(work / f"data_{args.train}_{args.test}", args.train, args.test)
    arms = args.arms.split(",")
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        # Alternate which arm goes first, so a drift in machine speed does not favour one.
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            print(f"repeat {repeat + 1}/{args.repeats}: {arm}", file=sys.stderr, flush=True)
            results[arm].append(run_arm(arm, data, work / f"r{repeat}", args))
            print(json.dumps(results[arm][-1]), file=sys.stderr, flush=True)
    (work / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(" ".join(["python", *sys.argv]))
    print(report(results))


STEPS = {
    "_medseg_train": _medseg_train,
    "_medseg_predict": _medseg_predict,
    "_monai_train": _monai_train,
    "_monai_predict": _monai_predict,
}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in STEPS:
        print(json.dumps(STEPS[sys.argv[1]](*sys.argv[2:])))
    else:
        main()
