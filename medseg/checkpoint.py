"""Checkpoints: one file with a network's weights and all it takes to use them (config, labels,
preprocessing plan), and from a training run the state to resume it. ``Checkpoint`` is the one
reader and writer of the file's layout; nothing else indexes its dict.

The file is a flat dict of plain containers, numbers, strings and tensors, so it loads with
``torch.load(..., weights_only=True)``: opening one runs no code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medseg.atomic import atomic_path
from medseg.config import Config
from medseg.data.plan import Plan
from medseg.errors import CheckpointError, first_line
from medseg.files import EXPORTED_MODEL_FILE

__all__ = [
    "FORMAT",
    "SEGMENT",
    "PRETRAIN",
    "Checkpoint",
    "checkpoint_file",
    "checkpoint_files",
    "EXPORTED_MODEL_FILE",
    "file_sha256",
    "weights_sha256",
]

FORMAT = "medseg-checkpoint/1"
SEGMENT, PRETRAIN = "segmentation", "pretrain"  # what the network's output means: classes, or noise
_FIELDS = ("format", "model", "config", "labels", "plan", "kind", "custom_model", "keep_largest", "tta_gain")


@dataclass
class Checkpoint:
    """What a checkpoint file holds.

    Args:
        weights: the network's state dict (the one to predict with: the weight average, when
            training keeps one).
        config: the run's full config, as a dict.
        labels: class index -> name, background included.
        plan: the preprocessing plan, as a dict.
        kind: ``segmentation`` (the network predicts classes) or ``pretrain`` (noise).
        custom_model: the network was not built from ``config.model`` (a model passed in
            Python), so only its own code can rebuild it.
        keep_largest: the labels training's validation chose to keep the largest piece of
            (``infer.keep_largest: auto``); None without a validation.
        tta_gain: validation mean Dice with flip TTA minus without, measured at the end of
            training on the weights of ``best.pt`` (``infer.tta: null`` keeps TTA only where it
            reached ``medseg.inference.tta.TTA_MIN_GAIN``); None: not measured.
        training: the state a resumed run needs (optimizer, step, random states, ...), written
            beside the fields above.
    """

    weights: dict
    config: dict
    labels: dict
    plan: dict
    kind: str = SEGMENT
    custom_model: bool = False
    keep_largest: list[int] | None = None
    tta_gain: float | None = None
    training: dict = field(default_factory=dict)
    source: str = field(default="checkpoint", compare=False)

    # -- the file ------------------------------------------------------------------------

    def to_payload(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.weights,
            "config": self.config,
            "labels": self.labels,
            "plan": self.plan,
            "kind": self.kind,
            "custom_model": self.custom_model,
            "keep_largest": self.keep_largest,
            "tta_gain": self.tta_gain,
            **self.training,
        }

    @classmethod
    def from_payload(cls, payload, source: str = "checkpoint") -> Checkpoint:
        """Check a loaded dict and read it.

        Raises:
            CheckpointError: not a medseg checkpoint, or one that lacks a field.
        """
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(source, f"not a medseg checkpoint (expected format {FORMAT})")
        missing = {"model", "config", "labels", "plan"} - set(payload)
        if missing:
            raise CheckpointError(source, f"checkpoint lacks {', '.join(sorted(missing))}")
        return cls(
            weights=payload["model"],
            config=payload["config"],
            labels={int(k): v for k, v in payload["labels"].items()},
            plan=payload["plan"],
            kind=payload.get("kind") or SEGMENT,
            custom_model=bool(payload.get("custom_model")),
            keep_largest=payload.get("keep_largest"),
            tta_gain=payload.get("tta_gain"),
            training={k: v for k, v in payload.items() if k not in _FIELDS},
            source=source,
        )

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (temp file, then rename)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self.to_payload(), tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Read a checkpoint file (or a run folder's ``best.pt``) safely, with ``weights_only``.

        Raises:
            CheckpointError: missing, unreadable, or not a medseg checkpoint.
        """
        path = checkpoint_file(path)
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or unsafe files
            reason = first_line(exc)
            raise CheckpointError(
                path,
                "is not a medseg checkpoint (the best.pt or last.pt that medseg train writes in its "
                f"run folder; give that file or the folder): cannot load it ({reason[:120]})",
            ) from None
        return cls.from_payload(payload, str(path))

    # -- what it says --------------------------------------------------------------------

    def settings(self) -> Config:
        """The run's config."""
        return Config.from_dict(self.config, source=f"{self.source} config")

    def preprocessing(self) -> Plan:
        """The run's plan."""
        return Plan.from_dict(self.plan, source=self.source)

    def check_segments(self) -> None:
        """Refuse a checkpoint whose network does not predict classes.

        Raises:
            CheckpointError: a pretraining checkpoint.
        """
        if self.kind == PRETRAIN:
            raise CheckpointError(
                self.source,
                "is a pretraining checkpoint (it predicts noise, not labels): fine-tune it first "
                "with medseg train --init",
            )


CHECKPOINT_NAMES = ("best", "last")  # the two files a run folder holds


def checkpoint_file(path: str | Path, which: str = "best") -> Path:
    """The checkpoint file a path names: the file itself, a run folder's ``best.pt``
    (``which="last"``: its ``last.pt``), or an exported model folder's description.

    Raises:
        CheckpointError: there is no such file.
    """
    path = Path(path)
    if path.is_dir():
        exported = path / EXPORTED_MODEL_FILE
        path = exported if exported.is_file() else path / f"{which}.pt"
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint")
    return path


def checkpoint_files(
    paths: str | Path | list, which: str = "best", folds: list[int] | None = None
) -> list[Path]:
    """The checkpoint files of a model or an ensemble.

    Each path is a checkpoint file, a run folder (its ``best.pt``, or ``last.pt`` with
    ``which="last"``), or a cross-validation folder (``medseg train --fold K`` writes
    ``fold_K/``), which stands for every fold's checkpoint, or those of ``folds``.

    Raises:
        CheckpointError: a path names no checkpoint, or a fold has no checkpoint yet.
    """
    if which not in CHECKPOINT_NAMES:
        raise CheckpointError("--checkpoint", f"must be best or last, not {which!r}")
    name = f"{which}.pt"
    files: list[Path] = []
    for item in [paths] if isinstance(paths, (str, Path)) else list(paths):
        item = Path(item)
        found = [] if (item / name).exists() else _fold_folders(item)
        if folds is not None and found:
            missing = sorted(set(folds) - {int(f.name[5:]) for f in found})
            if missing:
                raise CheckpointError(item, f"has no fold {', '.join(map(str, missing))}")
            found = [f for f in found if int(f.name[5:]) in folds]
        elif folds is not None:
            raise CheckpointError(item, "is not a cross-validation folder (fold_K/): --fold needs one")
        for fold in found:
            if not (fold / name).is_file():
                raise CheckpointError(fold, f"has no {name} (is that fold still training?)")
        files += [fold / name for fold in found] or [checkpoint_file(item, which)]
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
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """A SHA-256 of a model's weights (names, shapes and values), for models not from a file."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
