"""A model folder to deploy: the network as ONNX, beside everything prediction needs besides
the weights (the plan, labels and settings of the checkpoint it came from). ``medseg predict -m
FOLDER`` runs it with OpenVINO or ONNX Runtime (``medseg.inference.runtime``) through the same
preprocessing, sliding window, TTA, post-processing and writers as a checkpoint.

This module is the one reader and writer of the folder's layout:

- ``network.onnx``: the network for a batch of windows, ``(N, channels, *window)`` -> logits;
  a 2D network on slices is exported as the 2D network (``N`` slices of the window's plane);
- ``medseg-model.json``: the format, the network file and its SHA-256, the source checkpoint's
  name and SHA-256, and the checkpoint's config, labels, plan and keep-largest choice.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from medseg._version import __version__
from medseg.atomic import atomic_path, refuse_existing, write_text_atomic
from medseg.checkpoint import EXPORTED_MODEL_FILE, Checkpoint, checkpoint_file, file_sha256
from medseg.errors import CheckpointError, ConfigError
from medseg.models.factory import model_from_checkpoint
from medseg.models.slicewise import SliceWise

__all__ = ["EXPORT_FORMAT", "MODEL_FILE", "NETWORK_FILE", "export_model", "is_exported", "load_exported"]

EXPORT_FORMAT = "medseg-export/1"
MODEL_FILE = EXPORTED_MODEL_FILE
NETWORK_FILE = "network.onnx"
OPSET = 18  # the lowest the exporter writes; OpenVINO and ONNX Runtime of 2024 on read it

log = logging.getLogger(__name__)


def export_model(checkpoint, output: str | Path, which: str = "best", overwrite: bool = False) -> Path:
    """Write a checkpoint's network and what prediction needs into the folder ``output``.

    Args:
        checkpoint: a checkpoint file or a run folder (its ``best.pt``, or ``last.pt`` with
            ``which="last"``).
        output: the model folder; created if needed. Other files in it are left alone.
        overwrite: replace an exported model already in ``output``.

    Returns:
        The folder's ``medseg-model.json`` (written last: a folder without it is no model).

    Raises:
        CheckpointError: no checkpoint, a pretraining or custom model's checkpoint.
        ConfigError: the ONNX exporter (``pip install "medseg[export]"``) is not installed.
        InputError: ``output`` holds an exported model and ``overwrite`` is off.
    """
    source = checkpoint_file(checkpoint, which)
    output = Path(output)
    refuse_existing(output / MODEL_FILE, overwrite=overwrite)  # before any work
    found = Checkpoint.load(source)
    model = model_from_checkpoint(found)
    if hasattr(model, "fold_time"):
        model.fold_time()  # one timestep for good: no time input in the exported graph
    plan = found.preprocessing()
    network, axis = (model.net, model.axis) if isinstance(model, SliceWise) else (model, None)
    window = [w for a, w in enumerate(plan.patch_size) if a != axis]
    with atomic_path(output / NETWORK_FILE) as tmp:
        _write_onnx(network, torch.zeros(2, plan.channels, *window), tmp)
    description = {
        "format": EXPORT_FORMAT,
        "network": NETWORK_FILE,
        "network_sha256": file_sha256(output / NETWORK_FILE),
        "window": window,
        "slice_axis": axis,
        "exported_from": {"checkpoint": source.name, "sha256": file_sha256(source)},
        "medseg_version": __version__,
        "config": found.config,
        "labels": {str(k): v for k, v in found.labels.items()},
        "plan": found.plan,
        "keep_largest": found.keep_largest,
    }
    write_text_atomic(output / MODEL_FILE, json.dumps(description, indent=1) + "\n")
    return output / MODEL_FILE


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


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` is an exported model's ``medseg-model.json`` or its folder."""
    path = Path(path)
    return path.name == MODEL_FILE or (path / MODEL_FILE).is_file()


def load_exported(path: str | Path, runtime: str = "auto") -> tuple[Checkpoint, nn.Module, str]:
    """An exported model: its description as a weightless ``Checkpoint`` (config, labels,
    plan, keep-largest), its network under a runtime, and the network file's SHA-256.

    Raises:
        CheckpointError: not an exported model, a network file missing or changed since export.
        ConfigError: the runtime is not installed.
    """
    from medseg.inference.runtime import RuntimeNetwork

    path = Path(path)
    file = path if path.name == MODEL_FILE else path / MODEL_FILE
    try:
        description = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(file, f"cannot read the exported model's description ({exc})") from None
    if not isinstance(description, dict) or description.get("format") != EXPORT_FORMAT:
        raise CheckpointError(file, f"not a medseg exported model (expected format {EXPORT_FORMAT})")
    network_file = file.parent / NETWORK_FILE
    if not network_file.is_file():
        raise CheckpointError(network_file, "is missing: the model folder is incomplete")
    sha256 = file_sha256(network_file)
    if sha256 != description.get("network_sha256"):
        raise CheckpointError(network_file, "differs from the network exported (its SHA-256 changed)")
    found = Checkpoint(
        weights={},
        config=description["config"],
        labels={int(k): v for k, v in description["labels"].items()},
        plan=description["plan"],
        keep_largest=description.get("keep_largest"),
        source=str(file),
    )
    network: nn.Module = RuntimeNetwork(network_file, runtime)
    if description.get("slice_axis") is not None:
        network = SliceWise(network, int(description["slice_axis"]))
    return found, network, sha256
