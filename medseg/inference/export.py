"""A model folder to deploy: the network as ONNX, beside everything prediction needs besides
the weights (the plan, labels and settings of the checkpoint it came from). ``medseg predict -m
FOLDER`` runs it with OpenVINO or ONNX Runtime (``medseg.inference.runtime``) through the same
preprocessing, sliding window, TTA, post-processing and writers as a checkpoint.

This module writes the folder; ``medseg.inference.model_folder`` names its files and reads it
(the predictor needs the reading, and this module needs the predictor for int8's Dice guard):

- ``network.onnx``: the network for a batch of windows, ``(N, channels, *window)`` -> logits;
  a 2D network on slices is exported as the 2D network (``N`` slices of the window's plane);
- or, quantized to int8 (``medseg.inference.quantize``), ``network.xml`` and ``network.bin``:
  the same network as OpenVINO IR;
- ``medseg-model.json``: the format, the network file(s) and their SHA-256, the source
  checkpoint's name and SHA-256, and the checkpoint's config, labels, plan and keep-largest
  choice; for int8, the calibration set's description and the Dice guard's figures.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from medseg._version import __version__
from medseg.atomic import atomic_path, refuse_existing, write_text_atomic
from medseg.checkpoint import Checkpoint, checkpoint_file, file_sha256
from medseg.data.datasets import find_cases, read_splits
from medseg.errors import ConfigError, InputError
from medseg.inference.model_folder import EXPORT_FORMAT, INT8_FILES, MODEL_FILE, NETWORK_FILE
from medseg.models.factory import model_from_checkpoint
from medseg.models.slicewise import SliceWise

__all__ = ["export_model"]

GUARD_CASES = 20  # validation cases both networks predict for the int8 Dice guard, at most
OPSET = 18  # the lowest the exporter writes; OpenVINO and ONNX Runtime of 2024 on read it

log = logging.getLogger(__name__)


def export_model(
    checkpoint,
    output: str | Path,
    which: str = "best",
    overwrite: bool = False,
    *,
    int8: bool = False,
    calibrate=None,
    validate=None,
    max_dice_drop: float | None = None,
) -> Path:
    """Write a checkpoint's network and what prediction needs into the folder ``output``.

    Args:
        checkpoint: a checkpoint file or a run folder (its ``best.pt``, or ``last.pt`` with
            ``which="last"``).
        output: the model folder; created if needed. Other files in it are left alone.
        overwrite: replace an exported model already in ``output``.
        int8: quantize the network to int8 (OpenVINO IR; needs ``medseg[int8]``),
            calibrated on ``calibrate`` and refused when its mean Dice on ``validate`` falls
            more than ``max_dice_drop`` below fp32's.
        calibrate: a folder of images (what ``medseg predict -i`` takes); default: some of the
            run's training images.
        validate: a labelled dataset folder (any layout ``medseg train`` reads); default: the
            run's validation cases (at most ``GUARD_CASES`` of either).
        max_dice_drop: default 0.005.

    Returns:
        The folder's ``medseg-model.json`` (written last: a folder without it is no model).

    Raises:
        CheckpointError: no checkpoint, a pretraining or custom model's checkpoint.
        ConfigError: the exporter (``pip install "medseg[export]"``) or, for int8, NNCF is not
            installed; int8 without images to calibrate on or cases to validate on; int8's Dice
            fell too far (nothing is written then).
        InputError: ``output`` holds an exported model and ``overwrite`` is off.
    """
    from medseg.inference import quantize

    source = checkpoint_file(checkpoint, which)
    output = Path(output)
    refuse_existing(output / MODEL_FILE, overwrite=overwrite)  # before any work
    if int8:
        quantize.check_quantizer()
    elif calibrate is not None or validate is not None or max_dice_drop is not None:
        raise ConfigError("--int8", "--calibrate, --validate and --max-dice-drop go with --int8")
    found = Checkpoint.load(source)
    model = model_from_checkpoint(found)
    if hasattr(model, "fold_time"):
        model.fold_time()  # one timestep for good: no time input in the exported graph
    plan = found.preprocessing()
    network, axis = (model.net, model.axis) if isinstance(model, SliceWise) else (model, None)
    window = [w for a, w in enumerate(plan.patch_size) if a != axis]
    example = torch.zeros(2, plan.channels, *window)
    description = {
        "format": EXPORT_FORMAT,
        "window": window,
        "slice_axis": axis,
        "exported_from": {"checkpoint": source.name, "sha256": file_sha256(source)},
        "medseg_version": __version__,
        "config": found.config,
        "labels": {str(k): v for k, v in found.labels.items()},
        "plan": found.plan,
        "keep_largest": found.keep_largest,
        "tta_gain": found.tta_gain,
    }
    output.mkdir(parents=True, exist_ok=True)
    if int8:
        max_drop = quantize.MAX_DICE_DROP if max_dice_drop is None else max_dice_drop
        images, cases = _int8_sets(found, source, calibrate, validate)
        description.update(_export_int8(network, example, description, output, images, cases, max_drop))
    else:
        with atomic_path(output / NETWORK_FILE) as tmp:
            _write_onnx(network, example, tmp)
        description.update(network=NETWORK_FILE, network_sha256=file_sha256(output / NETWORK_FILE))
    write_text_atomic(output / MODEL_FILE, json.dumps(description, indent=1) + "\n")
    return output / MODEL_FILE


def _int8_sets(found: Checkpoint, source: Path, calibrate, validate) -> tuple[dict, dict]:
    """The images to calibrate on and the labelled cases to guard Dice with, each as
    ``{"from": where, "cases": [...]}``: the folders given, else the run's own split."""
    from medseg.inference.cases import discover
    from medseg.inference.quantize import CALIBRATION_IMAGES, pick

    run = _run_split(found, source)
    if calibrate is not None:
        images = [c.source for c in discover(calibrate, channels=found.preprocessing().channels)]
        if not images:
            raise InputError(calibrate, "holds no images to calibrate int8 on")
        images = {"from": str(calibrate), "cases": images}
    elif run is not None:
        images = {"from": "the run's training images", "cases": [c["image"] for c in run[0]]}
    else:
        raise ConfigError(
            "--calibrate", "int8 needs images to calibrate on: the run's data is not here; give a folder"
        )
    if validate is not None:
        dataset = find_cases(validate)
        labelled = [c for c in dataset.training + dataset.test if c.get("label")]
        cases = {"from": str(validate), "cases": labelled}
    elif run is not None and run[1]:
        cases = {"from": "the run's validation cases", "cases": run[1]}
    else:
        raise ConfigError(
            "--validate",
            "int8 needs labelled cases to check Dice on: the run's are not here; give a dataset folder",
        )
    images["cases"] = pick(images["cases"], CALIBRATION_IMAGES)
    cases["cases"] = pick(cases["cases"], GUARD_CASES)
    return images, cases


def _run_split(found: Checkpoint, source: Path) -> tuple[list, list] | None:
    """The training and validation cases of the checkpoint's run, where its data and
    ``splits.json`` are still here; else None."""
    splits, root = source.parent / "splits.json", found.settings().data.root
    if not splits.is_file() or not root or not Path(root).exists():
        return None
    saved, by_id = read_splits(splits), {c["id"]: c for c in find_cases(root).training}
    return tuple([by_id[i] for i in saved.get(part, []) if i in by_id] for part in ("train", "val"))


def _export_int8(
    network, example, description: dict, output: Path, images: dict, cases: dict, max_drop: float
) -> dict:
    """Export fp32, quantize, check Dice, and only then move the int8 network into ``output``;
    returns what the description gains."""
    from medseg.inference import quantize
    from medseg.inference.predictor import Predictor

    staging = Path(tempfile.mkdtemp(prefix=".medseg-int8-", dir=output))
    try:
        fp32_folder, int8_folder = staging / "fp32", staging / "int8"
        fp32_folder.mkdir()
        int8_folder.mkdir()
        _write_onnx(network, example, fp32_folder / NETWORK_FILE)
        fp32_network = {"network": NETWORK_FILE, "network_sha256": file_sha256(fp32_folder / NETWORK_FILE)}
        write_text_atomic(fp32_folder / MODEL_FILE, json.dumps({**description, **fp32_network}))
        fp32 = Predictor(fp32_folder, device="cpu", precision="fp32", runtime="openvino")
        log.info("int8: calibrating on %d image(s) from %s", len(images["cases"]), images["from"])
        windows = quantize.calibration_windows(fp32, images["cases"])
        quantize.quantize(fp32_folder / NETWORK_FILE, windows, int8_folder / INT8_FILES[0])
        graph, weights = (int8_folder / name for name in INT8_FILES)
        added = {
            "network": graph.name,
            "network_sha256": file_sha256(graph),
            "network_weights": weights.name,
            "network_weights_sha256": file_sha256(weights),
            "precision": "int8",
        }
        write_text_atomic(int8_folder / MODEL_FILE, json.dumps({**description, **added}))
        found = quantize.guard(fp32, Predictor(int8_folder, device="cpu"), cases["cases"], max_drop)
        for name in reversed(INT8_FILES):  # the weights first: the graph names them
            os.replace(int8_folder / name, output / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    added["int8"] = {
        "calibration": {"from": images["from"], "images": len(images["cases"]), "windows": len(windows)},
        "validation": {"from": cases["from"], "cases": found.cases},
        "dice_fp32": round(found.dice_fp32, 5),
        "dice_int8": round(found.dice_int8, 5),
        "max_dice_drop": max_drop,
    }
    return added


def _write_onnx(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise ConfigError("export", 'needs the ONNX exporter: pip install "medseg[export]"') from None
    network = _Logits(network.float()).eval()
    batch = torch.export.Dim("windows", min=1)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it lists torchvision operators it skips, and its steps
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # its own deprecations, not the user's business
            _export(network, example, path, batch)
    finally:
        exporter_log.setLevel(level)


def _export(network: nn.Module, example: torch.Tensor, path: Path, batch) -> None:
    torch.onnx.export(
        network,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


class _Logits(nn.Module):
    """The network with its image as the only input (the exporter traces ``forward(x)``)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)
