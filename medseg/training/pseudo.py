"""Self-training (``train.pseudo_labels``): a trained model labels the unlabelled images once, and
the run learns from those masks as from the real labels.

The labeller predicts as ``medseg predict`` does (TTA, keep-largest), so its masks are the best it
can give, on each image's own grid, exactly where a label file would be. They are written into the
run folder one by one and atomically (``pseudo_labels/MODEL/IMAGE.nii.gz``, both hashes: image
names never steer where files go), so a run stopped while labelling, or resumed later, labels only
what is missing, and a new labelling model starts afresh.

Its cost is one prediction per unlabelled image, once; what it gained on real scans, against the
mean teacher and training on the labelled cases alone, is in docs/pretraining.md.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medseg.errors import CheckpointError, ConfigError

__all__ = ["PseudoLabeller", "FOLDER"]

log = logging.getLogger(__name__)

FOLDER = "pseudo_labels"  # inside the run folder


class PseudoLabeller:
    """Labels unlabelled images with a trained model, for a run to train on (``label``).

    Args:
        model: the labelling model: a checkpoint, run folder or anything ``Predictor`` takes.
        labels: the run's class index -> name; the model must predict these same classes.
        device: where the model predicts (the run's device).

    Raises:
        ConfigError: (``train.pseudo_labels``) the model cannot be loaded, or predicts other classes.
    """

    def __init__(self, model, labels: dict[int, str], device: str = "cpu"):
        from medseg.inference.predictor import Predictor  # inference needs nothing of training

        benchmark = torch.backends.cudnn.benchmark
        try:
            self.predictor = Predictor(model, device=device)
        except CheckpointError as error:  # it names the file and the problem
            raise ConfigError("train.pseudo_labels", str(error)) from None
        finally:  # a predictor tunes cuDNN for speed; training's own choice (train.deterministic) stands
            torch.backends.cudnn.benchmark = benchmark
        theirs = {int(k): v for k, v in self.predictor.labels.items()}
        if theirs != {int(k): v for k, v in labels.items()}:
            raise ConfigError(
                "train.pseudo_labels",
                f"{model} predicts the classes {_names(theirs)}, the dataset has {_names(labels)}",
            )

    def label(self, cases: list[dict], run_dir: Path, rank: int = 0, world: int = 1) -> list[dict]:
        """Every case of ``cases`` (``{"image", "id"}``) with its ``label``: the model's mask,
        predicted now unless the run folder holds it already.

        A mask's place is named by the model's SHA-256 and a hash of the image's path, so a mask
        found there is this model's for this image: another model, or another list of images,
        never reuses it. Under torchrun each rank labels its share; the caller waits for all of
        them (a barrier) before reading the others' masks.
        """
        folder = Path(run_dir) / FOLDER / self.predictor.sha256[:16]
        folder.mkdir(parents=True, exist_ok=True)
        masks = [folder / f"{_digest(case['image'])}.nii.gz" for case in cases]
        before = sum(mask.is_file() for mask in masks)
        mine = [i for i in range(rank, len(cases), world) if not masks[i].is_file()]
        for index in tqdm(mine, desc="pseudo-labels", unit="image", disable=None if rank == 0 else True):
            self.predictor.predict_file(cases[index]["image"], masks[index], overwrite=True)
        if rank == 0:
            log.info("pseudo-labels of %d image(s): %d were there from before", len(cases), before)
        return [
            {"image": case["image"], "label": str(mask), "id": f"pseudo{index:05d}"}
            for index, (case, mask) in enumerate(zip(cases, masks))
        ]


def _digest(image) -> str:
    """A name for an image's mask that says nothing of the image's own name (patient data)."""
    paths = image if isinstance(image, (list, tuple)) else [image]
    text = "\n".join(str(Path(p).resolve()) for p in paths)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _names(labels: dict) -> str:
    return ", ".join(f"{k}:{v}" for k, v in sorted(labels.items()))
