"""Metrics against values worked out by hand and against SimpleITK's filters; the empty-mask
policy; folder evaluation that names bad cases and carries on."""

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.evaluation import folders
from medseg.evaluation.folders import evaluate
from medseg.evaluation.metrics import (
    BOTH_EMPTY,
    MISSING,
    OK,
    PREDICTION_EMPTY,
    REFERENCE_EMPTY,
    class_metrics,
    dice,
    dice_per_class,
    evaluate_pair,
    surface_distances,
)
from medseg.io import to_array


def _cubes(shift=1, shape=(10, 10, 10)):
    """A 4x4x4 cube and the same cube moved ``shift`` voxels along the first axis."""
    ref = np.zeros(shape, bool)
    ref[2:6, 2:6, 2:6] = True
    return np.roll(ref, shift, axis=0), ref


def test_dice_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 voxels
    b[0, 1:] = True  # 3 voxels, 2 shared
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a), both_empty=math.nan))


def test_dice_per_class_by_hand():
    pred = np.array([0, 1, 1, 2, 2, 2])
    ref = np.array([0, 1, 2, 2, 2, 0])
    scores = dice_per_class(pred, ref, [1, 2])
    assert scores[1] == pytest.approx(2 * 1 / 3)
    assert scores[2] == pytest.approx(2 * 2 / 6)


def test_shifted_cube_by_hand():
    # Overlap 3x4x4 = 48 of 64 each. Of each cube's 56 surface voxels, the 16 of the face that
    # sticks out and the 4 inside the opposite face are 1 voxel from the other surface; the other
    # 36 lie on it. So 40 of the 112 distances are 1 and 72 are 0.
    pred, ref = _cubes()
    got = class_metrics(pred, ref, spacing=(1.0, 1.0, 1.0), tolerance=0.5)
    assert got["status"] == OK
    assert (got["tp"], got["fp"], got["fn"]) == (48, 16, 16)
    assert got["dice"] == pytest.approx(96 / 128)
    assert got["iou"] == pytest.approx(48 / 80)
    assert got["assd"] == pytest.approx(40 / 112)
    assert got["hd95"] == pytest.approx(1.0)
    assert got["nsd"] == pytest.approx(72 / 112)
    assert class_metrics(pred, ref, (1.0, 1.0, 1.0), tolerance=1.0)["nsd"] == pytest.approx(1.0)
    assert got["pred_ml"] == pytest.approx(64 / 1000)


def test_distances_use_the_spacing_of_each_axis():
    # 2 mm along the axis of the shift. The 16 voxels of the face that sticks out are now 2 mm
    # from the other surface; the 4 inside the opposite face are 1 mm from it sideways (1 mm
    # voxels across). Per direction: 36 x 0 + 4 x 1 + 16 x 2 mm.
    pred, ref = _cubes()
    along = class_metrics(pred, ref, spacing=(2.0, 1.0, 1.0), tolerance=1.0)
    assert along["assd"] == pytest.approx(72 / 112)
    assert along["hd95"] == pytest.approx(2.0)
    assert along["nsd"] == pytest.approx(80 / 112)
    assert along["pred_ml"] == pytest.approx(128 / 1000)
    # spacing across the shift leaves these distances as they were at 1 mm
    across = class_metrics(pred, ref, spacing=(1.0, 3.0, 3.0), tolerance=1.0)
    assert across["assd"] == pytest.approx(40 / 112)
    assert across["hd95"] == pytest.approx(1.0)


def test_image_spacing_follows_the_image_axes(tmp_path):
    # A SimpleITK image's spacing is (i, j, k); its array is (k, j, i). Shift along i at 2 mm.
    pred, ref = _cubes()
    images = []
    for array in (pred, ref):
        image = sitk.GetImageFromArray(array.transpose().astype(np.uint8))
        image.SetSpacing((2.0, 1.0, 1.0))
        images.append(image)
        sitk.WriteImage(image, str(tmp_path / f"{len(images)}.nii.gz"))
    for pair in (images, (tmp_path / "1.nii.gz", tmp_path / "2.nii.gz")):
        (row,) = evaluate_pair(*pair, labels={1: "LV"})
        assert row["class"] == "LV"
        assert row["hd95"] == pytest.approx(2.0)
        assert row["assd"] == pytest.approx(72 / 112)


def _sphere(shape, centre, radius, spacing):
    k, j, i = np.indices(shape)
    d2 = sum(((idx - c) * s) ** 2 for idx, c, s in zip((i, j, k), centre, spacing))
    image = sitk.GetImageFromArray((d2 <= radius**2).astype(np.uint8))
    image.SetSpacing(spacing)
    return image


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.1, 2.5)])
def test_agrees_with_simpleitk(spacing):
    pred = _sphere((30, 50, 50), (24, 25, 15), 12, spacing)
    ref = _sphere((30, 50, 50), (27, 23, 14), 10, spacing)
    (row,) = evaluate_pair(pred, ref)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(ref, pred)
    assert row["dice"] == pytest.approx(overlap.GetDiceCoefficient(), abs=1e-9)
    assert row["iou"] == pytest.approx(overlap.GetJaccardCoefficient(), abs=1e-9)
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(pred, ref)
    to_ref, to_pred = surface_distances(to_array(pred), to_array(ref), pred.GetSpacing())
    assert max(to_ref.max(), to_pred.max()) == pytest.approx(hausdorff.GetHausdorffDistance(), rel=1e-5)
    assert 0 < row["hd95"] <= hausdorff.GetHausdorffDistance() + 1e-6


def test_empty_masks_follow_the_policy():
    empty = np.zeros((6, 6, 6), bool)
    full = empty.copy()
    full[1:4, 1:4, 1:4] = True
    both = class_metrics(empty, empty, (1, 1, 1))
    assert both["status"] == BOTH_EMPTY
    assert (both["dice"], both["iou"], both["hd95"], both["assd"], both["nsd"]) == (1, 1, 0, 0, 1)
    for pred, ref, status in ((empty, full, PREDICTION_EMPTY), (full, empty, REFERENCE_EMPTY)):
        one = class_metrics(pred, ref, (1, 2, 3))
        assert one["status"] == status
        assert (one["dice"], one["iou"], one["nsd"]) == (0, 0, 0)
        # the worst case: the diagonal of the 6 x 6 x 6 grid at 1 x 2 x 3 mm, corner to corner
        assert one["hd95"] == one["assd"] == pytest.approx(math.sqrt(5**2 + 10**2 + 15**2))
    assert class_metrics(full, empty, (1, 1, 1))["fp"] == 27
    assert class_metrics(empty, full, (1, 1, 1))["fn"] == 27


def test_arrays_on_other_grids_are_refused():
    with pytest.raises(InputError, match=r"shape \(4, 4\) differs"):
        evaluate_pair(np.zeros((4, 4)), np.zeros((4, 5)))
    a, b = sitk.Image(4, 4, 4, sitk.sitkUInt8), sitk.Image(4, 4, 4, sitk.sitkUInt8)
    b.SetOrigin((0, 0, 5))
    with pytest.raises(InputError, match="origin"):
        evaluate_pair(a, b)


# -- folders ------------------------------------------------------------------------------------


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _folders(tmp_path):
    """a: a perfect LV plus an RV false positive; b: LV half found; c: no prediction;
    d: on another grid; e: a prediction with no reference."""
    ref = np.zeros((6, 6, 6))
    ref[1:3, 1:3, 1:3] = 1  # 8 voxels of LV, no RV
    half = np.zeros((6, 6, 6))
    half[1:3, 1:3, 1:2] = 1  # 4 voxels, all inside
    with_fp = ref.copy()
    with_fp[4, 4, 4] = 2
    for case, pred in (("a", with_fp), ("b", half), ("d", ref), ("e", ref)):
        _write(tmp_path / "pred" / f"{case}.nii.gz", pred, (2.0, 1.0, 1.0) if case == "d" else (1, 1, 1))
    for case in "abcd":
        _write(tmp_path / "ref" / f"{case}.nii.gz", ref)
    return tmp_path / "pred", tmp_path / "ref"


def test_evaluate_scores_flags_and_carries_on(tmp_path):
    pred, ref = _folders(tmp_path)
    result = evaluate(pred, ref, out=tmp_path / "out", labels={0: "bg", 1: "LV", 2: "RV"})
    assert result["missing_predictions"] == ["c"]
    assert result["no_reference"] == ["e"]
    assert list(result["errors"]) == ["d"]
    assert "spacing (2.0, 1.0, 1.0) differs" in result["errors"]["d"]
    dice_of = {c["id"]: (c["LV"], c["RV"]) for c in result["cases"]}
    assert dice_of == {"a": (1.0, 0.0), "b": (pytest.approx(8 / 12), 1.0), "c": (0.0, 0.0), "d": (0.0, 0.0)}
    # the missing case, the case on another grid and the false positive all count
    assert result["mean"]["LV"] == pytest.approx((1 + 8 / 12 + 0 + 0) / 4)
    assert result["mean"]["RV"] == pytest.approx((0 + 1 + 0 + 0) / 4)
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    assert [(r["case"], r["class"], r["status"]) for r in rows] == [
        ("a", "LV", OK),
        ("a", "RV", REFERENCE_EMPTY),
        ("b", "LV", OK),
        ("b", "RV", BOTH_EMPTY),
        ("c", "LV", MISSING),
        ("c", "RV", MISSING),
        ("d", "LV", "error"),
        ("d", "RV", "error"),
    ]
    worst = f"{math.sqrt(3 * 5**2):.3f}"  # the 6 x 6 x 6 grid's diagonal at 1 mm
    assert rows[1]["fp"] == "1" and rows[1]["hd95"] == worst  # a false positive: the worst distance
    assert rows[4]["fn"] == "8" and rows[4]["dice"] == "0.0000" and rows[4]["hd95"] == worst
    assert rows[6]["dice"] == "0.0000" and "differs" in rows[6]["reason"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["classes"]["LV"]["dice"]["median"] == pytest.approx(1 / 3)  # of 0, 0, 2/3, 1
    assert summary["classes"]["RV"]["hd95"] == {
        "mean": pytest.approx(3 * math.sqrt(75) / 4),
        "std": pytest.approx(math.sqrt(75) * math.sqrt(3) / 4),
        "median": pytest.approx(math.sqrt(75)),
        "n": 4,
        "undefined": 0,
    }
    assert summary["classes"]["RV"]["statuses"] == {BOTH_EMPTY: 1, "error": 1, MISSING: 1, REFERENCE_EMPTY: 1}
    assert summary["classes"]["RV"]["worst_case"] == 3 and summary["classes"]["LV"]["worst_case"] == 2
    assert summary["errors"] == result["errors"] and summary["cases_scored"] == 4
    assert summary["cases_not_scored"] == [] and "worst case" in summary["empty_mask_policy"]


def test_a_missed_structure_never_improves_the_mean_distance(tmp_path):
    ref = np.zeros((20, 20, 20))
    ref[5:10, 5:10, 5:10] = 1
    rough = np.roll(ref, 3, axis=0)  # found, 3 mm off
    for case in "ab":
        _write(tmp_path / "ref" / f"{case}.nii.gz", ref)
        _write(tmp_path / "finds" / f"{case}.nii.gz", rough)
        _write(tmp_path / "misses" / f"{case}.nii.gz", rough if case == "a" else ref * 0)
    finds = evaluate(tmp_path / "finds", tmp_path / "ref")["summary"]["classes"]["class_1"]
    misses = evaluate(tmp_path / "misses", tmp_path / "ref")["summary"]["classes"]["class_1"]
    assert finds["hd95"]["mean"] == pytest.approx(3.0)
    assert misses["hd95"]["mean"] > finds["hd95"]["mean"] and misses["hd95"]["n"] == 2


def test_a_case_empty_in_both_masks_scores_and_does_not_crash(tmp_path):
    # classes found from the masks, and the first case holds none: a healthy scan
    lesion = np.zeros((6, 6, 6))
    lesion[2:4, 2:4, 2:4] = 1
    for folder in ("pred", "ref"):
        _write(tmp_path / folder / "a_healthy.nii.gz", lesion * 0)
        _write(tmp_path / folder / "b_lesion.nii.gz", lesion)
    result = evaluate(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "out")
    assert [(r["case"], r["status"], r["dice"]) for r in result["rows"]] == [
        ("a_healthy", BOTH_EMPTY, 1.0),
        ("b_lesion", OK, 1.0),
    ]
    assert result["summary"]["cases_scored"] == 2 and result["mean"]["class_1"] == 1.0
    # no class anywhere: every case is still counted, each as one classless row
    for folder in ("pred2", "ref2"):
        _write(tmp_path / folder / "a.nii.gz", lesion * 0)
    empty = evaluate(tmp_path / "pred2", tmp_path / "ref2", out=tmp_path / "out2")
    assert empty["summary"]["cases_scored"] == 1 and empty["mean"] == {}


def test_an_unreadable_reference_is_left_out_and_named(tmp_path):
    pred, ref = _folders(tmp_path)
    (ref / "b.nii.gz").write_bytes(b"not a volume")
    result = evaluate(pred, ref, labels={1: "LV", 2: "RV"})
    assert result["summary"]["cases_not_scored"] == ["b"] and "b" in result["errors"]
    assert [c["id"] for c in result["cases"]] == ["a", "c", "d"]


def test_evaluate_reads_one_case_at_a_time(tmp_path, monkeypatch):
    from medseg.evaluation import metrics

    pred, ref = _folders(tmp_path)
    reads, reads_when_scored = [], []
    real_read, real_score = metrics.read_volume, folders.evaluate_pair

    def read(path, *args, **kwargs):
        reads.append(path)
        return real_read(path, *args, **kwargs)

    def score(*args, **kwargs):
        reads_when_scored.append(len(reads))
        return real_score(*args, **kwargs)

    for module in (metrics, folders):
        monkeypatch.setattr(module, "read_volume", read)
    monkeypatch.setattr(folders, "evaluate_pair", score)
    evaluate(pred, ref, labels={1: "LV", 2: "RV"})
    assert reads_when_scored == [2, 4]  # a, then b: each pair is read just before it is scored


def test_classes_found_late_are_filled_in(tmp_path):
    first, second = np.zeros((4, 4, 4)), np.zeros((4, 4, 4))
    first[1, 1, 1] = 1
    second[2, 2, 2] = 3
    for folder in ("pred", "ref"):
        _write(tmp_path / folder / "a.nii.gz", first)
        _write(tmp_path / folder / "b.nii.gz", second)
    result = evaluate(tmp_path / "pred", tmp_path / "ref")
    assert [(r["case"], r["class"], r["status"]) for r in result["rows"]] == [
        ("a", "class_1", OK),
        ("a", "class_3", BOTH_EMPTY),
        ("b", "class_1", BOTH_EMPTY),
        ("b", "class_3", OK),
    ]


def test_masks_in_sub_folders_pair_with_flat_references(tmp_path):
    ref = np.zeros((4, 4, 4))
    ref[1:3, 1:3, 1:3] = 1
    _write(tmp_path / "ref" / "a.nii.gz", ref)
    _write(tmp_path / "pred" / "site1" / "a.nii.gz", ref)
    _write(tmp_path / "pred" / "site1" / "a_uncertainty.nii.gz", ref * 0)  # not a mask
    _write(tmp_path / "pred" / "previews" / "a.png", ref[0])  # not a mask either
    _write(tmp_path / "pred" / "qc" / "cases" / "a.png", ref[0])  # nor a QC report's picture
    (tmp_path / "pred" / "qc" / "index.html").write_text("<html></html>")
    result = evaluate(tmp_path / "pred", tmp_path / "ref")
    assert [c["id"] for c in result["cases"]] == ["site1/a"]
    assert result["mean"]["class_1"] == 1.0 and result["no_reference"] == []


def test_evaluate_does_not_overwrite_unless_asked(tmp_path):
    pred, ref = _folders(tmp_path)
    evaluate(pred, ref, out=tmp_path / "out")
    with pytest.raises(InputError, match="metrics.csv: already exists; pass --overwrite"):
        evaluate(pred, ref, out=tmp_path / "out")
    evaluate(pred, ref, out=tmp_path / "out", overwrite=True)


def test_no_pairs_at_all_is_an_error(tmp_path):
    _write(tmp_path / "pred" / "a.nii.gz", np.zeros((4, 4, 4)))
    _write(tmp_path / "ref" / "b.nii.gz", np.zeros((4, 4, 4)))
    with pytest.raises(InputError, match="no mask here has a namesake"):
        evaluate(tmp_path / "pred", tmp_path / "ref")


def test_agrees_with_monai_metrics():
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    spacing = (0.8, 1.1, 2.5)
    pred, ref = (
        to_array(_sphere((30, 50, 50), centre, radius, spacing)).astype(bool)
        for centre, radius in (((24, 25, 15), 12), ((27, 23, 14), 10))
    )
    got = class_metrics(pred, ref, spacing, tolerance=2.0)
    p, r = (torch.tensor(a, dtype=torch.float32)[None, None] for a in (pred, ref))
    kw = {"include_background": True, "spacing": list(spacing)}
    assert got["dice"] == pytest.approx(compute_dice(p, r).item(), rel=1e-5)
    assert got["hd95"] == pytest.approx(
        compute_hausdorff_distance(p, r, percentile=95, **kw).item(), rel=1e-5
    )
    assert got["assd"] == pytest.approx(
        compute_average_surface_distance(p, r, symmetric=True, **kw).item(), rel=1e-5
    )
    assert got["nsd"] == pytest.approx(
        compute_surface_dice(p, r, class_thresholds=[2.0], **kw).item(), rel=1e-5
    )


def test_masks_that_are_not_label_maps_fail_by_name_and_count_in_the_means(tmp_path, capsys):
    from medseg.cli import main

    ref = np.zeros((6, 6, 6))
    ref[1:3, 1:3, 1:3] = 1
    for name in ("nan", "half", "seven", "good"):
        _write(tmp_path / "ref" / f"{name}.nii.gz", ref)
    masks = {"nan": np.full((6, 6, 6), np.nan), "half": ref * 0.5 + ref, "seven": ref * 7, "good": ref}
    for name, array in masks.items():
        image = sitk.GetImageFromArray(np.asarray(array, np.float32))
        (tmp_path / "pred").mkdir(exist_ok=True)
        sitk.WriteImage(image, str(tmp_path / "pred" / f"{name}.nii.gz"))
    labels = tmp_path / "labels.json"
    labels.write_text('{"0": "background", "1": "LV"}')
    for command in (["evaluate", "--out", str(tmp_path / "ev")], ["report", "--out", str(tmp_path / "rep")]):
        code = main(
            [
                *command,
                "--pred",
                str(tmp_path / "pred"),
                "--ref",
                str(tmp_path / "ref"),
                "--labels",
                str(labels),
            ]
        )
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        lines = err.splitlines()
        for case, problem in (
            ("nan", "holds NaN or infinite values: not a label map"),
            ("half", "holds values that are not whole numbers (1.5): not a label map"),
            ("seven", "holds label [7] that the label map (0, 1) does not name"),
        ):
            assert sum(line.startswith(f"scored 0: {case}: ") and problem in line for line in lines) == 1, err
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["classes"]["LV"]["dice"]["n"] == 4  # the three failures count, as Dice 0
    assert summary["classes"]["LV"]["dice"]["mean"] == pytest.approx(0.25)
    assert (tmp_path / "rep" / "index.html").is_file()
