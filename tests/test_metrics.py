import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.evaluation.metrics import dice, dice_per_class, evaluate


def test_dice_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 voxels
    b[0, 1:] = True  # 3 voxels, 2 shared
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a)))


def test_dice_per_class_by_hand():
    pred = np.array([0, 1, 1, 2, 2, 2])
    ref = np.array([0, 1, 2, 2, 2, 0])
    scores = dice_per_class(pred, ref, [1, 2])
    assert scores[1] == pytest.approx(2 * 1 / 3)
    assert scores[2] == pytest.approx(2 * 2 / 6)


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_evaluate_folders(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    ref = np.zeros((4, 4, 4))
    ref[1:3, 1:3, 1:3] = 1  # 8 voxels
    pred = np.zeros((4, 4, 4))
    pred[1:3, 1:3, 1:2] = 1  # 4 voxels, all inside
    _write(tmp_path / "ref" / "a.nii.gz", ref)
    _write(tmp_path / "pred" / "a.nii.gz", pred)
    _write(tmp_path / "ref" / "b.nii.gz", ref)
    result = evaluate(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "m.csv", labels={0: "bg", 1: "LV"})
    assert result["cases"] == [{"id": "a", "LV": pytest.approx(2 * 4 / 12)}]
    assert result["missing_predictions"] == ["b"]
    assert (tmp_path / "m.csv").read_text().splitlines() == ["id,LV", "a,0.6667", "mean,0.6667"]
    assert json.loads((tmp_path / "m.json").read_text())["mean"]["LV"] == pytest.approx(2 / 3)


def test_evaluate_rejects_a_grid_mismatch(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    _write(tmp_path / "ref" / "a.nii.gz", np.zeros((4, 4, 4)))
    _write(tmp_path / "pred" / "a.nii.gz", np.zeros((4, 4, 4)), spacing=(2.0, 1.0, 1.0))
    with pytest.raises(
        InputError, match=r"spacing \(2.0, 1.0, 1.0\) differs from the spacing \(1.0, 1.0, 1.0\)"
    ):
        evaluate(tmp_path / "pred", tmp_path / "ref")


def test_undefined_dice_is_blank_in_csv_and_null_in_json(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    empty = np.zeros((4, 4, 4))
    _write(tmp_path / "ref" / "a.nii.gz", empty)
    _write(tmp_path / "pred" / "a.nii.gz", empty)
    evaluate(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "m.csv", labels={1: "LV"})
    assert (tmp_path / "m.csv").read_text().splitlines()[1] == "a,"
    assert json.loads((tmp_path / "m.json").read_text())["mean_foreground"] is None
