"""medseg against a plain MONAI script, side by side on held-out cases, in one run.

On phantoms by default, or on any dataset medseg reads with ``--data DIR`` (an nnU-Net or MSD
folder): its ``imagesTs``/``labelsTs`` are the held-out cases when it has them, otherwise a
seeded split of ``--test`` training cases. Both arms get the same training cases, the same time
budget and the same threads, then predict the same test cases as whole processes; medseg holds
out its own validation share of the training cases, as a user's run does. Reported per arm:
Dice and HD95 per class (on the input grid), the worst case's mean Dice, training steps,
prediction voxels/s (input voxels over the whole process's wall time, start-up, loading and
saving included, over the test set linked ``--copies`` times: 32 volumes by default) and peak
RSS. ``--repeats N`` alternates the arms and gives mean +- std; repeat k trains both arms
with seed k. Each finished arm leaves ``result.json`` in its folder and is reused, so an
interrupted study resumes. ``--snapshots 5,10``
also saves both arms' weights after 5 and 10 minutes of training and scores them: the learning
curves, drawn to ``curves.png``.

The MONAI arm is a script written from MONAI's spleen tutorial: UNet(16, 32, 64, 128, 256;
strides 2; 2 residual units; batch norm), DiceCE, Adam 1e-3, RandCropByPosNegLabeld (96x96x32,
2 samples), spacing 1.5 x 1.5 x 3 mm, fp32, sliding_window_inference (overlap 0.5, Gaussian),
Invertd back onto the input grid and SaveImaged. ``--monai-spacing``, ``--monai-patch`` and
``--monai-flip`` set it up for other data as its tutorials would.

    python scripts/benchmark.py --budget 240 --repeats 3
    python scripts/benchmark.py --budget 75 --train 5 --model residual_unet
    python scripts/benchmark.py --data ../shared/realdata/acdc --budget 600 --copies 1 \
        --monai-spacing 1.5,1.5,5 --monai-patch 128,128,16 --monai-flip --work bench_acdc
    python scripts/benchmark.py --curves bench_acdc other_study --title ACDC --work curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ledger
import numpy as np

HERE = Path(__file__).resolve()
LABELS = {0: "background", 1: "LV", 2: "myocardium", 3: "RV"}  # the phantoms'
MONAI_PHANTOMS = {"spacing": "1.5,1.5,3", "patch": "96,96,32"}
ORIENTATIONS = ("ras", "lps", "flipped", "oblique")


def make_phantoms(
    folder: Path, n_train: int, n_test: int, seed: int = 1000, variety: float = 1.0, wide: bool = False
) -> Path:
    """An MSD-style set of phantoms with varied orientation and spacing (1.1-1.5 mm in-plane,
    2.6-3.9 mm between slices), covering the same field of view as the sample data. ``variety``
    is ``make_phantom``'s. ``wide`` also turns each body to any angle within the slice plane and
    mirrors half of them left-right (the heart on the other side, each label on its own
    structure), poses the training cases need not have shown."""
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
        if wide:
            image, label = _turn_and_mirror(image, label, rng)
        name = f"case_{k:03d}.nii.gz"
        for kind, volume in (("images", image), ("labels", label)):
            (folder / f"{kind}{tag}").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(volume, str(folder / f"{kind}{tag}" / name), useCompression=True)
        entries[split].append({"image": f"./images{tag}/{name}", "label": f"./labels{tag}/{name}"})
    meta = {"name": "benchmark phantoms", "modality": {"0": "MRI"}, "labels": LABELS, **entries}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return folder


def real_data(source: Path, folder: Path, n_test: int, seed: int = 0) -> Path:
    """An MSD-style folder over a real dataset (links, nothing copied): its training cases in
    ``dataset.json``, the held-out ones in ``imagesTs``/``labelsTs`` named ``CASE.nii.gz``.
    The held-out cases are the dataset's own test cases when they have labels, else a seeded
    draw of ``n_test`` training cases."""
    import random

    from medseg.data.datasets import find_cases

    if (folder / "dataset.json").is_file():
        return folder
    cases = find_cases(source)
    test = [c for c in cases.test if c.get("label")]
    train = list(cases.training)
    if not test:
        random.Random(seed).shuffle(train)
        test, train = train[:n_test], sorted(train[n_test:], key=lambda c: c["id"])
    for kind in ("imagesTs", "labelsTs"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for case in test:
        (folder / "imagesTs" / f"{case['id']}.nii.gz").symlink_to(Path(case["image"]).resolve())
        (folder / "labelsTs" / f"{case['id']}.nii.gz").symlink_to(Path(case["label"]).resolve())
    meta = {
        "name": source.name,
        "modality": {"0": cases.modality},
        "labels": {str(k): v for k, v in cases.labels.items()},
        "training": [
            {"image": str(Path(c["image"]).resolve()), "label": str(Path(c["label"]).resolve())}
            for c in train
        ],
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return folder


def labels_of(data: Path) -> dict[int, str]:
    return {int(k): v for k, v in json.loads((data / "dataset.json").read_text())["labels"].items()}


def _turn_and_mirror(image, label, rng):
    """The voxels turned by a random angle within the slice plane, and mirrored along the first
    axis half of the time; the grid stays as it was."""
    import SimpleITK as sitk
    from scipy import ndimage

    from medseg.io import to_array

    angle = rng.uniform(0, 360)
    mirror = rng.random() < 0.5
    out = []
    for volume, order in ((image, 1), (label, 0)):
        array = ndimage.rotate(
            to_array(volume), angle, axes=(0, 1), reshape=False, order=order, mode="constant"
        )
        array = array[::-1] if mirror else array
        turned = sitk.GetImageFromArray(
            np.ascontiguousarray(array.transpose()).astype(to_array(volume).dtype)
        )
        turned.CopyInformation(volume)
        out.append(turned)
    return tuple(out)


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


def _minutes(snapshots: str) -> list[float]:
    return sorted(float(m) for m in snapshots.split(",") if m)


# A budget is "seconds=600" (train for that long) or "steps=1200" (that many optimizer steps,
# whatever the machine is doing: the figure a ledger keeps). Snapshots are in the same unit
# (minutes for a time budget).
ITERS_PER_EPOCH = 25  # medseg's default epoch; a step budget is a whole number of them


def _budget(budget: str) -> tuple[str, float]:
    unit, value = budget.split("=")
    return unit, float(value)


def _medseg_overrides(budget: str, model: str, extra: str, seed: str) -> list[str]:
    unit, value = _budget(budget)
    if unit == "steps":
        length = [f"train.iters_per_epoch={ITERS_PER_EPOCH}", f"train.epochs={int(value) // ITERS_PER_EPOCH}"]
    else:
        length = [f"train.max_time={value}"]
    return [*length, f"model.name={model}", f"train.seed={seed}", *filter(None, extra.split(";"))]


def _medseg_train(
    data: str, out: str, budget: str, model: str, extra: str, seed: str, snapshots: str
) -> dict:
    import torch

    import medseg

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config = medseg.load_config(None, _medseg_overrides(budget, model, extra, seed))
    config.data.root, config.train.output_dir = data, out
    marks = _minutes(snapshots)
    by_steps = _budget(budget)[0] == "steps"

    class Snapshots:  # the weights as they stand after each mark's minutes (or steps) of training
        def on_epoch_end(self, trainer, row):
            done = trainer.step if by_steps else trainer.elapsed / 60
            while marks and done >= marks[0]:
                trainer.checkpoint().save(Path(out) / f"snapshot_{marks.pop(0):g}.pt")

    summary = medseg.Trainer(config, overwrite=True, callbacks=[Snapshots()]).fit()
    return {"steps": summary["steps"], "train_seconds": summary["seconds"], "rss_mb": peak_rss_mb()}


class _Measured(Exception):
    """Raised by the speed probe once it has timed enough steps."""


def _medseg_speed(data: str, out: str, model: str, extra: str, steps: str) -> dict:
    """Seconds per optimizer step, over ``steps`` steps after one epoch of warm-up, and the share
    of those seconds spent waiting for data (augmentation runs in the training process)."""
    import torch

    import medseg

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    epochs = 1 + math.ceil(int(steps) / ITERS_PER_EPOCH)
    config = medseg.load_config(
        None, _medseg_overrides(f"steps={(epochs + 1) * ITERS_PER_EPOCH}", model, extra, "0")
    )
    config.data.root, config.train.output_dir = data, out
    config.train.val_every = 10**6
    marks, waits = [], []

    class Probe:  # epoch starts hold the steps only (checkpoints included, validation not)
        def on_epoch_start(self, trainer, epoch):
            marks.append((time.perf_counter(), trainer.step))
            if epoch == epochs + 1:
                raise _Measured

        def on_epoch_end(self, trainer, row):
            if row["epoch"] > 1:  # the first epoch warms up
                waits.append(row["data_wait"])

    try:
        medseg.Trainer(config, overwrite=True, callbacks=[Probe()]).fit()
    except _Measured:
        pass
    (t0, s0), (t1, s1) = marks[1], marks[-1]
    return {
        "seconds_per_step": (t1 - t0) / (s1 - s0),
        "steps": s1 - s0,
        "data_wait": statistics.mean(waits),
    }


def _medseg_predict(checkpoint: str, images: str, out: str) -> dict:
    # As a batch user runs it: the command line, in this process (start-up included in the wall).
    from medseg.cli import main

    code = main(["predict", "--model", checkpoint, "--input", images, "--output", out, "--overwrite", "-q"])
    return {"code": code, "rss_mb": peak_rss_mb()}


def _monai_transforms(with_label: bool, spacing: str):
    from monai import transforms as mt

    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    return [
        mt.LoadImaged(keys),
        mt.EnsureChannelFirstd(keys),
        mt.Orientationd(keys, axcodes="RAS"),
        mt.Spacingd(keys, pixdim=[float(v) for v in spacing.split(",")], mode=modes),
        mt.NormalizeIntensityd("image", nonzero=True),
        mt.CropForegroundd(keys, source_key="image", allow_smaller=True),
    ]


def _monai_net(classes: int):
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    return UNet(
        3, 1, classes, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm=Norm.BATCH
    )


def _monai_train(
    data: str, out: str, budget: str, spacing: str, patch: str, flip: str, seed: str, snapshots: str
) -> dict:
    import torch
    from monai import transforms as mt
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    set_determinism(int(seed))
    meta = json.loads(Path(data, "dataset.json").read_text())
    files = [{k: str(Path(data, v)) for k, v in e.items()} for e in meta["training"]]
    size = [int(v) for v in patch.split(",")]
    keys = ["image", "label"]
    train = mt.Compose(
        _monai_transforms(True, spacing)
        + [
            mt.SpatialPadd(keys, size),
            mt.RandCropByPosNegLabeld(keys, "label", size, pos=1, neg=1, num_samples=2, image_key="image"),
            *([mt.RandFlipd(keys, prob=0.5, spatial_axis=0)] if flip == "1" else []),
        ]
    )
    loader = DataLoader(CacheDataset(files, train, progress=False), batch_size=1, shuffle=True)
    net = _monai_net(len(meta["labels"]))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)  # the tutorial's: constant, no schedule
    marks = _minutes(snapshots)
    unit, limit = _budget(budget)
    steps, began = 0, time.monotonic()
    times = []  # each step's end, for the speed probe
    done = lambda: steps if unit == "steps" else time.monotonic() - began  # noqa: E731
    while done() < limit:
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            steps += 1
            times.append(time.perf_counter())
            mark = steps if unit == "steps" else (time.monotonic() - began) / 60
            while marks and mark >= marks[0]:
                torch.save(net.state_dict(), Path(out) / f"snapshot_{marks.pop(0):g}.pt")
            if done() >= limit:
                break
    torch.save(net.state_dict(), Path(out) / "monai.pt")
    warm = min(ITERS_PER_EPOCH, len(times) // 4)
    per_step = (times[-1] - times[warm]) / max(len(times) - 1 - warm, 1)
    return {
        "steps": steps,
        "train_seconds": time.monotonic() - began,
        "rss_mb": peak_rss_mb(),
        "seconds_per_step": per_step,
    }


def _monai_predict(checkpoint: str, images: str, out: str, spacing: str, patch: str, classes: str) -> dict:
    import torch
    from monai import transforms as mt
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    pre = mt.Compose(_monai_transforms(False, spacing))
    post = mt.Compose(
        [
            mt.Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
            mt.AsDiscreted("pred", argmax=True),
            mt.SaveImaged("pred", output_dir=out, output_postfix="", separate_folder=False, resample=False),
        ]
    )
    net = _monai_net(int(classes))
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    net.eval()
    size = [int(v) for v in patch.split(",")]
    files = [{"image": str(p)} for p in sorted(Path(images).glob("*.nii.gz"))]
    with torch.inference_mode():
        for batch in DataLoader(Dataset(files, pre), batch_size=1):
            batch["pred"] = sliding_window_inference(batch["image"], size, 4, net, 0.5, "gaussian")
            for item in decollate_batch(batch):
                post(item)
    return {"rss_mb": peak_rss_mb()}


# -- scoring ---------------------------------------------------------------------------------


def score(pred_dir: Path, ref_dir: Path, labels: dict[int, str]) -> dict:
    """Mean Dice and HD95 (mm) per foreground class over the test cases, on the input grid.

    A missing prediction scores Dice 0; HD95 is left out where either mask is empty (it is
    undefined there), and ``empty`` counts those class-cases."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    from medseg.evaluation.metrics import dice
    from medseg.io import read_volume, to_array

    classes = [c for c in labels if c]
    dices = {c: [] for c in classes}
    hd95 = {c: [] for c in classes}
    empty = 0
    for ref_path in sorted(ref_dir.glob("*.nii.gz")):
        pred_path = pred_dir / ref_path.name
        ref_image = read_volume(ref_path)
        ref = to_array(ref_image)
        pred = to_array(read_volume(pred_path)) if pred_path.is_file() else np.zeros_like(ref)
        if pred.shape != ref.shape:
            sys.exit(f"{pred_path}: shape {pred.shape} is not the input's {ref.shape}")
        for c in classes:
            dices[c].append(dice(pred == c, ref == c))
            if not (pred == c).any() or not (ref == c).any():
                empty += 1
                continue
            a = torch.as_tensor(pred == c)[None, None]
            b = torch.as_tensor(ref == c)[None, None]
            hd = compute_hausdorff_distance(a, b, percentile=95, spacing=ref_image.GetSpacing())
            hd95[c].append(float(hd))
    result = {f"dice_{labels[c]}": float(np.nanmean(v)) for c, v in dices.items()}
    result["dice_mean"] = float(np.mean(list(result.values())))
    result["dice_worst_case"] = float(np.min(np.mean([dices[c] for c in classes], axis=0)))
    result.update({f"hd95_{labels[c]}": float(np.mean(v)) if v else math.nan for c, v in hd95.items()})
    result["empty"] = empty
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


def run_arm(arm: str, data: Path, run: Path, args, seed: int) -> dict:
    """Train, predict and score one arm in ``run``; a finished arm's ``result.json`` is reused."""
    done = run / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    labels = labels_of(data)
    monai = [args.monai_spacing, args.monai_patch]
    if arm == "medseg":
        trained = _child(
            "medseg_train",
            [str(data), str(run), budget_of(args), args.model, args.set, str(seed), args.snapshots],
            args.threads,
        )
        checkpoint = run / "best.pt"
        predict = lambda ckpt, out: _child("medseg_predict", [str(ckpt), str(images), str(out)], args.threads)  # noqa: E731
    else:
        flip = "1" if args.monai_flip else "0"
        trained = _child(
            "monai_train",
            [str(data), str(run), budget_of(args), *monai, flip, str(seed), args.snapshots],
            args.threads,
        )
        checkpoint = run / "monai.pt"
        predict = lambda ckpt, out: _child(  # noqa: E731
            "monai_predict", [str(ckpt), str(images), str(out), *monai, str(len(labels))], args.threads
        )
    preds, images = run / "predictions", speed_folder(data, args.copies)
    predicted = predict(checkpoint, preds)
    voxels = sum(int(np.prod(_size(p))) for p in images.glob("*.nii.gz"))
    result = {
        **score(preds, data / "labelsTs", labels),
        "steps": trained["steps"],
        "train_wall": trained["wall"],
        "train_rss_mb": trained["rss_mb"],
        "predict_wall": predicted["wall"],
        "predict_voxels_per_s": voxels / predicted["wall"],
        "predict_rss_mb": predicted["rss_mb"],
    }
    curve = {}
    images = data / "imagesTs"  # snapshots are scored, not timed
    for minutes in _minutes(args.snapshots):
        snapshot = run / f"snapshot_{minutes:g}.pt"
        if snapshot.is_file():
            predict(snapshot, run / f"predictions_{minutes:g}")
            curve[f"{minutes:g}"] = score(run / f"predictions_{minutes:g}", data / "labelsTs", labels)[
                "dice_mean"
            ]
    curve[f"{args.steps}" if args.steps else f"{args.budget / 60:g}"] = result["dice_mean"]
    result["curve"] = curve
    done.write_text(json.dumps(result, indent=1))
    if args.steps:
        ledger.append(
            {**_ledger_fields(arm, data, args, seed), "kind": "run", "steps_budget": args.steps, **result},
            args.ledger,
        )
    return result


def budget_of(args) -> str:
    return f"steps={args.steps}" if args.steps else f"seconds={args.budget}"


def _ledger_fields(arm: str, data: Path, args, seed: int) -> dict:
    """What names a run in the ledger: the arm and its settings, the data, the machine."""
    settings = (
        f"{args.set}" + (f";model.name={args.model}" if args.model != "unet" else "")
        if arm == "medseg"
        else f"spacing={args.monai_spacing};patch={args.monai_patch};flip={int(args.monai_flip)}"
    )
    name = Path(args.data).name if args.data else "phantoms"
    split = (
        "imagesTs" if args.data and Path(args.data, "imagesTs").is_dir() else f"seeded {args.test} held out"
    )
    return {
        "arm": arm,
        "overrides": settings.strip(";"),
        "data": name,
        "split": split,
        "seed": seed,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        **ledger.machine(),
    }


def measure_speed(arm: str, data: Path, args) -> dict:
    """One arm's seconds per step, alone and short, after a warm-up; appended to the ledger."""
    run = Path(args.work) / "speed" / arm
    run.mkdir(parents=True, exist_ok=True)
    if arm == "medseg":
        timed = _child(
            "medseg_speed", [str(data), str(run), args.model, args.set, str(args.speed)], args.threads
        )
    else:
        monai = [args.monai_spacing, args.monai_patch, "1" if args.monai_flip else "0"]
        budget = f"steps={args.speed + ITERS_PER_EPOCH}"
        timed = _child("monai_train", [str(data), str(run), budget, *monai, "0", ""], args.threads)
    record = {
        **_ledger_fields(arm, data, args, 0),
        "kind": "speed",
        "seconds_per_step": timed["seconds_per_step"],
        **({"data_wait": timed["data_wait"]} if "data_wait" in timed else {}),
    }
    ledger.append(record, args.ledger)
    return record


def _size(path: Path) -> tuple:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize()


def report(results: dict[str, list[dict]]) -> str:
    """A Markdown table: mean +- std over the repeats, arms side by side."""
    arms = list(results)
    keys = [k for k in results[arms[0]][0] if k != "curve"]
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


def plot_curves(results: dict[str, list[dict]], path: Path, title: str) -> None:
    """Mean Dice against minutes of training, a line per arm and repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = ("tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for colour, (arm, runs) in zip(colours, results.items()):
        for k, run in enumerate(runs):
            points = sorted((float(m), d) for m, d in run.get("curve", {}).items())
            if points:
                ax.plot(*zip(*points), "o-", color=colour, alpha=0.8, label=arm if k == 0 else None)
    ax.set_xlabel("minutes of training (2 CPU threads)")
    ax.set_ylabel("mean foreground Dice, held-out cases")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="a dataset folder (nnU-Net or MSD); default: phantoms")
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per arm")
    parser.add_argument(
        "--steps",
        type=int,
        help=f"train each arm for this many steps (a multiple of {ITERS_PER_EPOCH}) "
        "instead of --budget seconds; finished runs go to the ledger, --snapshots are in steps",
    )
    parser.add_argument(
        "--speed",
        type=int,
        metavar="STEPS",
        help="only time each arm's seconds per step over this many "
        "steps after a warm-up (run it alone) and add them to the ledger",
    )
    parser.add_argument(
        "--ledger", type=Path, default=ledger.LEDGER, help="where finished step-budgeted runs go"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seeds", help="comma-separated seeds, one repeat each (default: 0..repeats-1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", type=int, default=12, help="training phantoms")
    parser.add_argument("--test", type=int, default=8, help="test cases (phantoms, or drawn from --data)")
    parser.add_argument("--variety", type=float, default=1.0, help="phantoms: make_phantom's variety")
    parser.add_argument("--wide", action="store_true", help="phantoms: any in-plane pose, half mirrored")
    parser.add_argument("--copies", type=int, default=4, help="prediction speed over the test set x this")
    parser.add_argument("--model", default="unet", help="medseg's model.name")
    parser.add_argument("--set", default="", help="extra medseg overrides, ';'-separated")
    parser.add_argument("--arms", default="medseg,monai")
    parser.add_argument("--monai-spacing", default=MONAI_PHANTOMS["spacing"], help="mm, e.g. 1,1,1")
    parser.add_argument("--monai-patch", default=MONAI_PHANTOMS["patch"], help="voxels, e.g. 96,96,64")
    parser.add_argument("--monai-flip", action="store_true", help="the MONAI arm mirrors left-right")
    parser.add_argument("--snapshots", default="", help="minutes at which to score both arms too, e.g. 5,10")
    parser.add_argument("--work", default="bench_work", help="folder for data, runs and results")
    parser.add_argument(
        "--curves", nargs="+", metavar="WORK", help="only draw the learning curves of these studies"
    )
    parser.add_argument("--title", default="", help="--curves: the picture's title")
    args = parser.parse_args()
    if args.curves:  # several studies in one picture: arms named by their folders
        merged = {}
        for folder in args.curves:
            saved = json.loads(Path(folder, "results.json").read_text())["results"]
            merged.update({f"{arm} ({Path(folder).name})": runs for arm, runs in saved.items()})
        plot_curves(merged, Path(args.work), args.title)
        return

    work = Path(args.work)
    if args.data:
        data = real_data(Path(args.data), work / "data", args.test)
    else:
        tag = f"{args.train}_{args.test}" + (f"_v{args.variety:g}" if args.variety != 1 else "")
        tag += "_wide" if args.wide else ""
        data = make_phantoms(
            work / f"data_{tag}", args.train, args.test, variety=args.variety, wide=args.wide
        )
    arms = args.arms.split(",")
    if args.speed:
        for arm in arms:
            print(json.dumps(measure_speed(arm, data, args)))
        return
    if args.steps and args.steps % ITERS_PER_EPOCH:
        sys.exit(f"--steps must be a multiple of {ITERS_PER_EPOCH}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(args.repeats))
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat, seed in enumerate(seeds):
        # Alternate which arm goes first, so a drift in machine speed does not favour one.
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            print(f"seed {seed} ({repeat + 1}/{len(seeds)}): {arm}", file=sys.stderr, flush=True)
            results[arm].append(run_arm(arm, data, work / f"r{seed}" / arm, args, seed=seed))
            print(json.dumps(results[arm][-1]), file=sys.stderr, flush=True)
    (work / "results.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1, default=str)
    )
    if args.snapshots:
        plot_curves(results, work / "curves.png", Path(args.data).name if args.data else "phantoms")
    print(" ".join(["python", *sys.argv]))
    print(report(results))


STEPS = {
    "_medseg_train": _medseg_train,
    "_medseg_speed": _medseg_speed,
    "_medseg_predict": _medseg_predict,
    "_monai_train": _monai_train,
    "_monai_predict": _monai_predict,
}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in STEPS:
        print(json.dumps(STEPS[sys.argv[1]](*sys.argv[2:])))
    else:
        main()
