"""The demo: sample data -> train briefly -> predict the test cases -> score them in a QC report."""

from __future__ import annotations

import shutil
from pathlib import Path

from medseg.config import load_config
from medseg.data.phantom import make_dataset
from medseg.evaluation.report import qc_report
from medseg.inference.batch import predict_many
from medseg.inference.predictor import Predictor
from medseg.training.trainer import Trainer

__all__ = ["SAMPLE_DATA", "DEMO_EPOCHS", "DEMO_OVERRIDES", "run_demo"]

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data" / "heart"
# A fixed number of steps (20 x 25), not a time budget, so a slow machine gets a like model, only
# later: 1.5 minutes on 2 cores with native bf16, about 7 without (fp32; README).
DEMO_EPOCHS = 20
# 500 steps on 8 phantoms are too few for rotation, scaling and mirroring to pay back: with them
# the demo's mean Dice fell from 0.925 to 0.855. Real scans and longer runs gain from them.
DEMO_OVERRIDES = ["augment.spatial_prob=0", "augment.flip_prob=0"]


def run_demo(output: str | Path = "medseg_demo", epochs: int = DEMO_EPOCHS, overrides=None) -> dict:
    """Train on the sample heart data, segment its test cases and score them.

    Writes ``run/`` (checkpoints, ``metrics.csv``, ``curves.png``), ``predictions/`` and
    ``report/`` (``index.html``, a picture per case, ``metrics.csv``, ``summary.json``) inside
    ``output``, replacing its own earlier results there.

    Uses the repository's ``sample_data/heart`` when present and otherwise generates the same
    phantoms into ``output/data``.

    Args:
        output: folder for the run, predictions and metrics.
        epochs: epochs of training (25 steps each).
        overrides: extra ``key=value`` config overrides.

    Returns:
        The evaluation (see ``medseg.evaluate``) plus ``"train"`` (the training summary) and
        ``"report"`` (the page's path).
    """
    output = Path(output)
    _claim(output)
    data = SAMPLE_DATA
    if not (data / "dataset.json").is_file():
        data = output / "data"
        if not (data / "dataset.json").is_file():
            make_dataset(data)
    config = load_config(None, [f"train.epochs={epochs}", *DEMO_OVERRIDES, *(overrides or [])])
    config.data.root, config.train.output_dir = str(data), str(output / "run")
    trainer = Trainer(config, overwrite=True)  # the demo always starts afresh
    summary = trainer.fit()

    predictions = output / "predictions"
    shutil.rmtree(predictions, ignore_errors=True)
    predictor = Predictor(summary["best"], device=config.train.device)
    predict_many(predictor, data / "imagesTs", predictions)
    report = qc_report(
        predictions,
        output / "report",
        images=data / "imagesTs",
        ref_dir=data / "labelsTs",
        labels=trainer.labels,
        overwrite=True,
    )
    result = report["evaluation"]
    result["report"] = report["index"]
    result["train"] = summary
    return result


MARK = ".medseg-demo"  # written into a demo's folder, so a rerun knows the folder is its own


def _claim(output: Path) -> None:
    """Make ``output`` the demo's folder, refusing one that holds anything else: the demo
    replaces its own earlier results there, and nobody else's."""
    from medseg.errors import InputError

    if output.exists() and not output.is_dir():
        raise InputError(output, "is a file; the demo needs a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / MARK).is_file():
        raise InputError(output, "holds files that are not the demo's; give the demo a new or empty folder")
    output.mkdir(parents=True, exist_ok=True)
    (output / MARK).write_text(
        "medseg demo results; a rerun of medseg demo replaces them\n", encoding="utf-8"
    )
