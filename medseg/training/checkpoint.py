"""Checkpoints: one file with weights, config, labels and preprocessing, loadable with
``weights_only=True`` (plain containers, numbers, strings and tensors only)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.config import Config
from medseg.errors import CheckpointError, ConfigError
from medseg.io import atomic_path
from medseg.models import MODELS, build_model, model_options

__all__ = [
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_file",
    "checkpoint_files",
    "file_sha256",
    "weights_sha256",
    "model_from_config",
    "model_from_checkpoint",
    "rng_state",
    "set_rng_state",
]

FORMAT = "medseg-checkpoint/1"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write a checkpoint dict atomically (temp file, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return path


def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file a path names: the file itself, or a run folder's ``best.pt``.

    Raises:
        CheckpointError: there is no such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint")
    return path


def checkpoint_files(paths: str | Path | list) -> list[Path]:
    """The checkpoint files of a model or an ensemble.

    Each path is a checkpoint file, a run folder (its ``best.pt``), or a cross-validation
    folder (``medseg train --fold K`` writes ``fold_K/``), which stands for every fold's
    ``best.pt``.

    Raises:
        CheckpointError: a path names no checkpoint, or a fold has no ``best.pt`` yet.
    """
    files: list[Path] = []
    for item in [paths] if isinstance(paths, (str, Path)) else list(paths):
        item = Path(item)
        folds = [] if (item / "best.pt").exists() else _fold_folders(item)
        for fold in folds:
            if not (fold / "best.pt").is_file():
                raise CheckpointError(fold, "has no best.pt (is that fold still training?)")
        files += [fold / "best.pt" for fold in folds] or [checkpoint_file(item)]
    if not files:
        raise CheckpointError("--model", "no checkpoint given")
    return files


def _fold_folders(folder: Path) -> list[Path]:
    found = (
        [p for p in folder.glob("fold_*") if p.is_dir() and p.name[5:].isdigit()] if folder.is_dir() else []
    )
    return sorted(found, key=lambda p: int(p.name[5:]))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """A SHA-256 of a model's weights (names, shapes and values), for models not from a file."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check that it is medseg's.

    Raises:
        CheckpointError: missing, unreadable, or not a medseg checkpoint.
    """
    path = checkpoint_file(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"cannot load checkpoint ({reason[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, f"not a medseg checkpoint (expected format {FORMAT})")
    missing = {"model", "config", "labels", "plan"} - set(payload)
    if missing:
        raise CheckpointError(path, f"checkpoint lacks {', '.join(sorted(missing))}")
    return payload


def model_from_config(
    config: Config, out_channels: int, in_channels: int = 1, spatial_dims: int = 3, stem_stride=None
) -> nn.Module:
    """The network a config describes, for ``in_channels`` image channels, ``out_channels``
    classes and 2D or 3D images; ``stem_stride`` comes from the plan (``Plan.stem_stride``)."""
    settings = config.to_dict()["model"]
    name = settings.pop("name")
    if name not in MODELS:
        raise ConfigError("model.name", f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    wanted = model_options(name)
    settings["stem_stride"] = stem_stride
    options = {k: v for k, v in settings.items() if k in wanted and v is not None}
    try:
        return build_model(
            name, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **options
        )
    except ValueError as exc:
        raise ConfigError("model", str(exc)) from None


def model_from_checkpoint(payload: dict) -> nn.Module:
    """Rebuild the network a checkpoint was trained with and load its weights (eval mode)."""
    if payload.get("kind") == "pretrain":
        raise CheckpointError(
            "checkpoint",
            "is a pretraining checkpoint (it predicts noise, not labels): fine-tune it "
            "with medseg train --init",
        )
    if payload.get("custom_model"):
        raise CheckpointError(
            "checkpoint", "was trained with a custom model: build it yourself and load payload['model']"
        )
    config = Config.from_dict(payload["config"], source="checkpoint config")
    plan = payload["plan"]
    model = model_from_config(
        config, len(payload["labels"]), plan.get("channels", 1), len(plan["spacing"]), plan.get("stem_stride")
    )
    model.load_state_dict(payload["model"])
    return model.eval()


def rng_state() -> dict:
    """Every random generator's state, as tensors and numbers (so ``weights_only`` loads them)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved (generators it does not name are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
