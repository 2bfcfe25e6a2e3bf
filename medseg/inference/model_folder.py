"""Reading a model folder that ``medseg export`` wrote (``medseg.inference.export``): its
layout's names, and its network under a runtime with a weightless ``Checkpoint`` beside it.
The predictor reads folders through this module; only ``export`` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from medseg.checkpoint import EXPORTED_MODEL_FILE, Checkpoint, file_sha256
from medseg.errors import CheckpointError
from medseg.files import is_exported
from medseg.models.slicewise import SliceWise

__all__ = ["EXPORT_FORMAT", "MODEL_FILE", "NETWORK_FILE", "INT8_FILES", "is_exported", "load_exported"]

EXPORT_FORMAT = "medseg-export/1"
MODEL_FILE = EXPORTED_MODEL_FILE
NETWORK_FILE = "network.onnx"
INT8_FILES = ("network.xml", "network.bin")  # OpenVINO IR: the graph, then its weights


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
    name = description.get("network", NETWORK_FILE)
    if name not in (NETWORK_FILE, INT8_FILES[0]):  # a name, never a path the file could steer
        raise CheckpointError(file, f"names an unknown network file {name!r}")
    network_file = file.parent / name
    sha256 = _checked(network_file, description.get("network_sha256"))
    if name == INT8_FILES[0]:
        _checked(file.parent / INT8_FILES[1], description.get("network_weights_sha256"))
    found = Checkpoint(
        weights={},
        config=description["config"],
        labels={int(k): v for k, v in description["labels"].items()},
        plan=description["plan"],
        keep_largest=description.get("keep_largest"),
        tta_gain=description.get("tta_gain"),
        source=str(file),
    )
    network: nn.Module = RuntimeNetwork(network_file, runtime)
    if description.get("slice_axis") is not None:
        network = SliceWise(network, int(description["slice_axis"]))
    return found, network, sha256


def _checked(path: Path, sha256: str | None) -> str:
    """A network file's SHA-256, checked against the one recorded at export."""
    if not path.is_file():
        raise CheckpointError(path, "is missing: the model folder is incomplete")
    found = file_sha256(path)
    if found != sha256:
        raise CheckpointError(path, "differs from the network exported (its SHA-256 changed)")
    return found
