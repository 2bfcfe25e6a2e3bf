"""int8 for an exported model, behind a Dice guard: post-training quantization with NNCF,
calibrated on the windows the network really sees in prediction, then both networks predict a
labelled validation set and the int8 one is refused when its mean Dice falls more than a set
margin below fp32's.

``medseg.inference.export`` calls it; this module knows nothing of the folder's layout.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import ConfigError
from medseg.evaluation.metrics import dice_per_class
from medseg.io import read_volume, to_array

log = logging.getLogger(__name__)

CALIBRATION_WINDOWS = 300  # NNCF's own default subset: enough for activation ranges
CALIBRATION_IMAGES = 8
MAX_DICE_DROP = 0.005


@dataclass
class Guard:
    """How the int8 network compared with fp32 on the validation cases."""

    cases: int
    dice_fp32: float
    dice_int8: float

    @property
    def drop(self) -> float:
        return self.dice_fp32 - self.dice_int8


def check_quantizer() -> None:
    """Raise ``ConfigError`` unless NNCF and OpenVINO are installed."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        raise ConfigError("--int8", 'needs NNCF and OpenVINO: pip install "medseg[int8]"') from None


def calibration_windows(predictor, images: list, limit: int = CALIBRATION_WINDOWS, seed: int = 0) -> list:
    """Windows (``(1, C, *window)`` arrays) the predictor's exported network is fed while it
    predicts ``images`` (files or lists of channel files): preprocessed, mirrored and sliced
    as in prediction, a seeded ``limit`` of them."""
    from medseg.inference.runtime import runtime_of

    network = runtime_of(predictor.model)
    network.seen = []
    try:
        for image in images:
            predictor.network_probabilities(predictor.load(image))
        windows = [batch[i : i + 1] for batch in network.seen for i in range(len(batch))]
    finally:
        network.seen = None
    random.Random(seed).shuffle(windows)
    return windows[:limit]


def quantize(onnx_file: Path, windows: list, xml_file: Path) -> None:
    """Quantize an ONNX network to int8 with NNCF and save it as OpenVINO IR (``xml_file`` and
    its ``.bin`` beside it)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(onnx_file))
    quiet = logging.getLogger("nncf")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its progress bars and notes are not the user's business
    try:
        quantized = nncf.quantize(model, nncf.Dataset(windows), subset_size=len(windows))
    finally:
        quiet.setLevel(level)
    ov.save_model(quantized, str(xml_file), compress_to_fp16=False)


def guard(fp32, int8, cases: list[dict], max_drop: float = MAX_DICE_DROP) -> Guard:
    """Compare both predictors' mean foreground Dice on ``cases`` (``{"image", "label"}``).

    Raises:
        ConfigError: int8's falls more than ``max_drop`` below fp32's (saying by how much).
    """
    log.info("int8 guard: predicting %d validation case(s) with both networks", len(cases))
    classes = [k for k in fp32.labels if k != 0]
    scores: dict[str, list[float]] = {"fp32": [], "int8": []}
    for case in cases:
        loaded = fp32.load(case["image"])  # one checkpoint's plan: one read serves both networks
        label = to_array(read_volume(case["label"]))
        for name, predictor in (("fp32", fp32), ("int8", int8)):
            mask = predictor.segment(loaded).labels
            scores[name].append(float(np.mean(list(dice_per_class(mask, label, classes).values()))))
    found = Guard(len(cases), float(np.mean(scores["fp32"])), float(np.mean(scores["int8"])))
    if found.drop > max_drop:
        raise ConfigError(
            "--int8",
            f"int8's mean Dice {found.dice_int8:.4f} is {found.drop:.4f} below fp32's {found.dice_fp32:.4f} "
            f"on {found.cases} validation case(s) (at most {max_drop} allowed); nothing written",
        )
    return found


def pick(items: list, count: int, seed: int = 0) -> list:
    """A seeded ``count`` of ``items`` (all of them when fewer), in their order."""
    if len(items) <= count:
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), count))
    return [items[i] for i in chosen]
