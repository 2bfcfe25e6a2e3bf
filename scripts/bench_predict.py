"""Prediction speed and memory, side by side: medseg, its options, and a plain MONAI loop.

Every arm segments the same folder of phantoms in a fresh process (so its peak RSS is its own),
with the same network: a medseg checkpoint (trained for a few steps; speed does not depend on
the weights). The arms:

- ``medseg``: ``medseg predict`` with the defaults;
- ``monai``: a plain loop written from MONAI's tutorials around the same network: MONAI's
  transforms at the plan's spacing, ``sliding_window_inference`` (the plan's window, overlap
  0.25, Gaussian blending, fp32), ``Invertd``, argmax, ``SaveImaged``;
- ``prefetch``: medseg reading the next case in a second thread (``predict_many(prefetch=True)``);
- ``tta``: ``--tta`` on a model trained with mirrors along 2 axes (4 passes);
- ``ensemble``: two models (``-m A -m B``);
- ``probabilities``: ``--save-probabilities``; ``uncertainty``: ``--tta --uncertainty``;
- ``openvino``, ``onnxruntime``: the plain checkpoint exported (``medseg export``) and predicted
  from its model folder with that runtime (``--runtime``);
- ``int8``: the plain checkpoint exported with ``--int8`` (calibrated on the training phantoms,
  its Dice checked on them), in OpenVINO.

Speed is input voxels per second of the whole process (start-up, reading, writing included).
``--windows`` first times one window of the network in torch (fp32; bf16 with channels-last,
medseg's default on a CPU with native bf16), ONNX Runtime and OpenVINO (fp32, bf16, int8).
With ``--big`` it also segments one 512 x 512 x 300 float volume (a CT's size) with the arms
among medseg, monai, probabilities, tta, openvino and int8, and reports their peak RSS. Run it alone on
the machine: another job on the cores changes the figures.

    python scripts/bench_predict.py --cases 16 --repeats 3 --big
    python scripts/bench_predict.py --stages RUN/best.pt IMAGES_DIR --cases 10   # stage by stage
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from benchmark import make_phantoms, peak_rss_mb  # noqa: E402

ARMS = (
    "medseg",
    "monai",
    "prefetch",
    "tta",
    "ensemble",
    "probabilities",
    "uncertainty",
    "openvino",
    "onnxruntime",
    "int8",
)


# The arms ``--big`` runs on the CT-sized volume (of those ``--arms`` names).
BIG_ARMS = ("medseg", "monai", "probabilities", "tta", "openvino", "int8")


def _checkpoints(work: Path, data: Path) -> dict[str, str]:
    """A plain checkpoint, one trained with mirrors along axes 1 and 2 (for TTA), and the plain
    one exported."""
    from medseg.config import load_config
    from medseg.inference.export import export_model
    from medseg.training.trainer import Trainer

    found = {}
    for name, extra in (("plain", []), ("mirrored", ["augment.flip_prob=0.5", "augment.flip_axes=[1, 2]"])):
        run = work / name
        if not (run / "best.pt").is_file():
            config = load_config(None, ["train.epochs=1", "train.iters_per_epoch=5", *extra])
            config.data.root, config.train.output_dir = str(data), str(run)
            Trainer(config, overwrite=True).fit()
        found[name] = str(run / "best.pt")
    if not (work / "exported" / "medseg-model.json").is_file():
        export_model(found["plain"], work / "exported")
    found["exported"] = str(work / "exported")
    if not (work / "int8" / "medseg-model.json").is_file():
        export_model(found["plain"], work / "int8", int8=True, validate=data, max_dice_drop=1.0)
    found["int8"] = str(work / "int8")  # (the guard is off: a 5-step network's Dice says nothing)
    return found


def _cli_args(arm: str, models: dict[str, str]) -> list[str]:
    return {
        "medseg": ["-m", models["plain"]],
        "tta": ["-m", models["mirrored"], "--tta"],
        "ensemble": ["-m", models["plain"], "-m", models["mirrored"]],
        "probabilities": ["-m", models["plain"], "--save-probabilities"],
        "uncertainty": ["-m", models["mirrored"], "--tta", "--uncertainty"],
        "openvino": ["-m", models["exported"], "--runtime", "openvino"],
        "onnxruntime": ["-m", models["exported"], "--runtime", "onnxruntime"],
        "int8": ["-m", models["int8"]],
    }[arm]


# -- one arm, in its own process ---------------------------------------------------------------


def _run_arm(arm: str, models: dict[str, str], images: str, out: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if arm == "monai":
        _monai_loop(models["plain"], images, out)
    elif arm == "prefetch":
        from medseg.inference.batch import predict_many
        from medseg.inference.predictor import Predictor

        result = predict_many(Predictor(models["plain"], device="cpu"), images, out, prefetch=True)
        assert not result.failed, result.failed
    else:
        from medseg.cli import main

        code = main(["predict", *_cli_args(arm, models), "-i", images, "-o", out, "--device", "cpu", "-q"])
        assert code == 0, code
    print(json.dumps({"rss_mb": peak_rss_mb()}))


def _monai_loop(checkpoint: str, images: str, out: str) -> None:
    """The plain MONAI loop, around medseg's network and its plan."""
    import torch
    from monai import transforms as mt
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.inferers import sliding_window_inference

    from medseg.checkpoint import Checkpoint
    from medseg.models.factory import model_from_checkpoint

    found = Checkpoint.load(checkpoint)
    plan = found.preprocessing()
    net = model_from_checkpoint(found)
    pre = mt.Compose(
        [
            mt.LoadImaged("image"),
            mt.EnsureChannelFirstd("image"),
            mt.Orientationd("image", axcodes="RAS"),
            mt.Spacingd("image", pixdim=plan.spacing, mode="bilinear"),
            mt.NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        ]
    )
    post = mt.Compose(
        [
            mt.Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
            mt.AsDiscreted("pred", argmax=True),
            mt.SaveImaged("pred", output_dir=out, output_postfix="", separate_folder=False, resample=False),
        ]
    )
    files = [{"image": str(p)} for p in sorted(Path(images).glob("*.nii.gz"))]
    with torch.inference_mode():
        for batch in DataLoader(Dataset(files, pre), batch_size=1):
            batch["pred"] = sliding_window_inference(
                batch["image"], plan.patch_size, 4, net, overlap=0.25, mode="gaussian"
            )
            for item in decollate_batch(batch):
                post(item)


def _child(arm: str, models: dict[str, str], images: Path, out: Path, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(HERE), "_arm", arm, json.dumps(models), str(images), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"{arm} failed:\n{done.stderr[-3000:]}")
    return {"seconds": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


# -- the report ----------------------------------------------------------------------------------


def _big_volume(folder: Path) -> Path:
    """One 512 x 512 x 300 float volume at 0.7 x 0.7 x 1 mm: a phantom, upsampled, with noise."""
    import SimpleITK as sitk

    from medseg.data.phantom import make_phantom

    path = folder / "big.nii.gz"
    if path.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    small, _ = make_phantom(1, shape=(128, 128, 75), spacing=(2.8, 2.8, 4.0), orientation="lps")
    grid = sitk.Resample(
        sitk.Cast(small, sitk.sitkFloat32),
        [512, 512, 300],
        sitk.Transform(),
        sitk.sitkLinear,
        small.GetOrigin(),
        (0.7, 0.7, 1.0),
    )
    array = sitk.GetArrayFromImage(grid)
    array += np.random.default_rng(0).normal(0, 0.02, array.shape).astype(np.float32)
    big = sitk.GetImageFromArray(array)
    big.CopyInformation(grid)
    sitk.WriteImage(big, str(path), useCompression=True)
    return folder


def _window_costs(models: dict[str, str], threads: int, runs: int = 20) -> None:
    """Milliseconds per window of the plain model's network in each runtime and precision
    (median of ``runs`` after a warm-up), and the share of voxels whose argmax agrees with
    torch fp32, on windows of a test phantom."""
    import torch

    from medseg.checkpoint import Checkpoint
    from medseg.device import channels_last_format
    from medseg.inference.model_folder import INT8_FILES, NETWORK_FILE
    from medseg.inference.runtime import RuntimeNetwork
    from medseg.models.factory import model_from_checkpoint

    torch.set_num_threads(threads)
    found = Checkpoint.load(models["plain"])
    plan = found.preprocessing()
    torch.manual_seed(0)
    windows = torch.randn(4, plan.channels, *plan.patch_size)  # speed does not depend on content
    net = model_from_checkpoint(found)
    fp32 = lambda x: net(x)  # noqa: E731
    net_cl = model_from_checkpoint(found).to(memory_format=channels_last_format(3))

    def bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net_cl(x.contiguous(memory_format=channels_last_format(3))).float()

    arms = {"torch fp32": fp32, "torch bf16 + channels-last (medseg)": bf16}
    for runtime, precision in (("onnxruntime", None), ("openvino", None), ("openvino", torch.bfloat16)):
        exported = RuntimeNetwork(Path(models["exported"]) / NETWORK_FILE, runtime)
        name = f"{runtime} {exported.prepare(precision)}"
        arms[name] = exported
    int8 = RuntimeNetwork(Path(models["int8"]) / INT8_FILES[0])
    arms[f"openvino {int8.prepare(torch.bfloat16)}"] = int8
    with torch.inference_mode():
        reference = fp32(windows[:1]).argmax(1)
        print(f"\nms per window ({'x'.join(map(str, plan.patch_size))}), median of {runs}, {threads} threads")
        for name, run in arms.items():
            run(windows[:1])
            times = []
            for k in range(runs):
                began = time.perf_counter()
                run(windows[k % 4 : k % 4 + 1])
                times.append((time.perf_counter() - began) * 1e3)
            agree = (run(windows[:1]).argmax(1) == reference).float().mean().item()
            print(f"{name:>36}: {statistics.median(times):7.1f} ms  argmax agrees {agree:.4f}")


def _stage_costs(model: str, folder: Path, cases: int, threads: int) -> None:
    """Where one process's prediction time goes, stage by stage, on real cases: median ms per
    case of reading, checking, preprocessing, the network (every TTA pass), resampling back,
    keep-largest and writing; and the one-off costs of importing and loading the model."""
    import tempfile

    start = time.perf_counter()
    import torch

    from medseg.inference.grid import to_input_grid
    from medseg.inference.postprocess import keep_largest_component
    from medseg.inference.predictor import Predictor
    from medseg.io import check_voxel_values, read_channels, write_volume

    imported = time.perf_counter() - start
    torch.set_num_threads(threads)
    start = time.perf_counter()
    predictor = Predictor(model, device="cpu")
    loaded = time.perf_counter() - start
    costs: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def clock(stage: str):
        begin = time.perf_counter()
        yield
        costs.setdefault(stage, []).append(time.perf_counter() - begin)

    out = Path(tempfile.mkdtemp())
    for path in sorted(folder.iterdir())[:cases]:
        with clock("read"):
            channels = read_channels(path, spatial_dims=predictor.plan.spatial_dims)
        with clock("check voxel values"):
            channels = [check_voxel_values(c)[0] for c in channels]
        with clock("preprocess (orient, resample, normalise)"):
            case = predictor.load(channels)
        with clock("network, every pass"):
            probs = predictor.network_probabilities(case)
        with clock("back to the input grid"):
            labels = to_input_grid(probs, case.affine, case.reference)
        with clock("keep-largest"):
            keep_largest_component(labels, predictor.keep_largest)
        with clock("write the mask"):
            write_volume(labels, out / path.name, case.reference, overwrite=True)
    shutil.rmtree(out)
    total = sum(statistics.median(v) for v in costs.values())
    print(f"{len(costs['read'])} cases, {predictor.passes} pass(es) each, {threads} threads")
    print(f"once: imports {imported:.2f} s, loading the model {loaded:.2f} s")
    for stage, values in costs.items():
        median = statistics.median(values)
        print(f"  {stage:<42} {median * 1e3:8.1f} ms  {100 * median / total:5.1f} %")


def _voxels(folder: Path) -> int:
    from medseg.io import read_header

    return sum(int(np.prod(read_header(p).GetSize())) for p in sorted(folder.glob("*.nii.gz")))


def _line(name: str, rates: list[float], rss: list[float], base: float | None) -> str:
    spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
    mean = statistics.mean(rates)
    relative = f"{base / mean:5.2f}x the time" if base else ""
    return f"{name:>14}: {mean / 1e3:7.0f}k +- {spread / 1e3:4.0f}k voxels/s  {max(rss):6.0f} MB  {relative}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_arm":
        _run_arm(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=16, help="volumes to predict per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes of each arm (alternating order)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--big", action="store_true", help="also the peak RSS on a 512 x 512 x 300 volume")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", action="store_true", help="also ms per window in each runtime")
    parser.add_argument("--work", default="bench_predict_work")
    parser.add_argument(
        "--stages",
        nargs=2,
        metavar=("MODEL", "IMAGES"),
        help="only time each stage of prediction with this model on the first --cases images of this folder",
    )
    args = parser.parse_args()
    if args.stages:
        _stage_costs(args.stages[0], Path(args.stages[1]), args.cases, args.threads)
        return
    work = Path(args.work).resolve()
    data = make_phantoms(work / "data", n_train=4, n_test=args.cases)
    models = _checkpoints(work, data)
    if args.windows:
        _window_costs(models, args.threads)
    images = data / "imagesTs"
    voxels = _voxels(images)
    print(f"{args.cases} volumes, {voxels / args.cases / 1e3:.0f}k voxels each, {args.threads} threads")
    rates: dict[str, list[float]] = {a: [] for a in args.arms}
    rss: dict[str, list[float]] = {a: [] for a in args.arms}
    for repeat in range(args.repeats):
        for arm in args.arms if repeat % 2 == 0 else reversed(args.arms):
            result = _child(arm, models, images, work / "out" / arm, args.threads)
            rates[arm].append(voxels / result["seconds"])
            rss[arm].append(result["rss_mb"])
            print(f"  {arm}: {result['seconds']:.1f} s, {result['rss_mb']:.0f} MB", flush=True)
    base = statistics.mean(rates["medseg"]) if "medseg" in rates else None
    print(f"\nmean +- sd over {args.repeats} passes; peak RSS (largest); time relative to medseg's defaults")
    for arm in args.arms:
        print(_line(arm, rates[arm], rss[arm], base if arm != "medseg" else None))
    if "medseg" in rates and "monai" in rates:
        ratio = statistics.mean(rates["medseg"]) / statistics.mean(rates["monai"])
        print(f"medseg / MONAI loop speed: {ratio:.2f}x")
    if args.big:
        big = _big_volume(work / "big")
        print("\none 512 x 512 x 300 float volume:")
        for arm in [a for a in args.arms if a in BIG_ARMS]:
            result = _child(arm, models, big, work / "out" / f"big_{arm}", args.threads)
            print(f"{arm:>14}: {result['seconds']:6.1f} s, peak RSS {result['rss_mb']:6.0f} MB", flush=True)


if __name__ == "__main__":
    main()
