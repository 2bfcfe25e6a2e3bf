"""Self-training (``train.pseudo_labels``): a trained model labels the unlabelled images, and the
run learns from its masks as from labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.inference.predictor import Predictor
from medseg.training.pseudo import FOLDER, PseudoLabeller
from medseg.training.trainer import Trainer
from tests.conftest import TINY_OVERRIDES, run_cli
from tests.test_resume import SETTINGS as EXACT
from tests.test_resume import whole_and_resumed

SETTINGS = [*TINY_OVERRIDES, "train.deterministic=true", "data.val_fraction=0", "train.tensorboard=false"]


def _trainer(data: Path, out: Path, *extra: str) -> Trainer:
    config = load_config(None, [*SETTINGS, *extra])
    config.data.root, config.train.output_dir = str(data), str(out)
    return Trainer(config)


def _images(data: Path) -> list[Path]:
    return sorted((data / "imagesTs").glob("*.nii.gz"))


def test_the_model_labels_each_unlabelled_image_and_the_run_learns_from_its_masks(
    tiny_dataset, tiny_run, tmp_path
):
    teacher = Path(tiny_run["best"]).parent
    unlabeled = f"train.unlabeled={tiny_dataset / 'imagesTs'}"
    trainer = _trainer(tiny_dataset, tmp_path / "self", unlabeled, f"train.pseudo_labels={teacher}")
    assert trainer.teacher is None  # self-training, not the mean teacher
    trainer.fit()

    # One mask per unlabelled image, the labelling model's prediction, on the image's own grid.
    predictor = Predictor(teacher, device="cpu")
    folder = tmp_path / "self" / FOLDER / predictor.sha256[:16]
    masks = sorted(folder.glob("*.nii.gz"))
    assert len(masks) == len(_images(tiny_dataset)) == 2
    for case in trainer.pseudo_cases:
        mask, image = sitk.ReadImage(case["label"]), sitk.ReadImage(case["image"])
        assert Path(case["image"]).name not in case["label"]  # image names never name files
        assert mask.GetSize() == image.GetSize() and mask.GetDirection() == image.GetDirection()
        assert np.allclose(mask.GetOrigin(), image.GetOrigin()) and np.allclose(
            mask.GetSpacing(), image.GetSpacing()
        )
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), predictor.predict(case["image"]).T)
    assert "teacher" not in torch.load(tmp_path / "self" / "last.pt", weights_only=True)

    # The same seeded run without them ends elsewhere: the pseudo-labelled cases were trained on.
    plain = _trainer(tiny_dataset, tmp_path / "plain")
    plain.fit()
    ours, theirs = trainer.model.state_dict(), plain.model.state_dict()
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours if ours[k].is_floating_point())


def test_labelling_resumes_and_a_new_model_labels_afresh(tiny_dataset, tiny_run, tmp_path, monkeypatch):
    cases = [{"image": str(p), "id": p.name} for p in _images(tiny_dataset)]
    labels = Predictor(tiny_run["best"], device="cpu").labels
    labeller = PseudoLabeller(tiny_run["best"], labels)
    first = labeller.label(cases, tmp_path)
    kept = Path(first[0]["label"])
    written = kept.stat().st_mtime_ns
    Path(first[1]["label"]).unlink()  # as if stopped before the second image

    calls = []
    real = Predictor.predict_file
    monkeypatch.setattr(
        Predictor, "predict_file", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k)
    )
    again = labeller.label(cases, tmp_path)
    assert calls == [cases[1]["image"]] and again == first
    assert kept.stat().st_mtime_ns == written and Path(first[1]["label"]).is_file()

    other = PseudoLabeller(tiny_run["last"], labels)  # another checkpoint: its own masks
    assert other.predictor.sha256 != labeller.predictor.sha256
    calls.clear()
    theirs = other.label(cases, tmp_path)
    assert calls == [c["image"] for c in cases]
    assert {c["label"] for c in theirs}.isdisjoint(c["label"] for c in first)


def test_a_labelling_model_must_predict_the_dataset_s_classes(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match=r"train.pseudo_labels: .* predicts the classes 0:background, 1:"):
        PseudoLabeller(tiny_run["best"], {0: "background", 1: "heart"})
    with pytest.raises(ConfigError, match="train.pseudo_labels: .*nowhere"):
        PseudoLabeller(tmp_path / "nowhere", {0: "background"})


def test_the_command_line_self_trains_and_refuses_a_model_without_images(tiny_dataset, tiny_run, tmp_path):
    teacher = str(Path(tiny_run["best"]).parent)
    tiny = [x for o in TINY_OVERRIDES for x in ("--set", o)]
    args = ["train", "--data", str(tiny_dataset), *tiny, "--pseudo-labels-from", teacher]
    proc = run_cli(*args, "--output", str(tmp_path / "run"), "--unlabeled", str(tiny_dataset / "imagesTs"))
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "run" / FOLDER).glob("*/*.nii.gz"))) == 2
    proc = run_cli(*args, "--output", str(tmp_path / "run2"))
    assert proc.returncode == 2
    assert (
        "error: train.pseudo_labels: needs train.unlabeled (--unlabeled): the images to label" in proc.stderr
    )
    assert not (tmp_path / "run2").exists()  # refused before the run folder was made


def test_a_killed_self_training_run_resumes_exactly(tiny_dataset, tiny_run, tmp_path):
    teacher = Path(tiny_run["best"]).parent
    settings = [*EXACT, f"train.unlabeled={tiny_dataset / 'imagesTs'}", f"train.pseudo_labels={teacher}"]
    whole, again = whole_and_resumed(tiny_dataset, tmp_path, settings)
    assert again["step"] == whole["step"] == 8
    for key, tensor in whole["train_model"].items():
        torch.testing.assert_close(again["train_model"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
