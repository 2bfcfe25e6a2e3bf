"""Prediction options: flip TTA, keep-largest-component, probabilities, uncertainty, ensembles."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from medseg.config import Config
from medseg.errors import ConfigError
from medseg.inference import grid
from medseg.inference.batch import predict_many
from medseg.inference.postprocess import keep_largest_component, keep_largest_labels
from medseg.inference.predictor import Predictor
from medseg.inference.tta import TTA_MIN_GAIN, ProbabilityMean, flip_passes, resolve_mirrors
from medseg.io import ras_affine, to_array
from tests.conftest import learned_phantom, mean_dice, run_cli

LABELS = {0: "background", 1: "LV", 2: "myocardium", 3: "RV"}


class Pointwise(nn.Module):
    """A 1x1x1 convolution: each voxel's classes depend on its own intensity only, so the
    network commutes with every mirror by construction. Bright -> 1, dark -> 2, else 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 3.0, -3.0, 0.0]).view(4, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))

    def forward(self, x):
        return self.conv(x)


def _config(**infer) -> Config:
    config = Config()
    config.train.precision = "fp32"  # exact comparisons between passes
    for key, value in infer.items():
        setattr(config.infer, key, value)
    return config


@pytest.fixture(scope="module")
def plan(learned_run):
    return Predictor(learned_run[1]["best"], device="cpu").plan


def _swapped(checkpoint, target):
    """A checkpoint that predicts RV where the original predicts LV and vice versa."""
    payload = torch.load(checkpoint, weights_only=True)
    for key in ("head.weight", "head.bias"):
        payload["model"][key] = payload["model"][key][[0, 3, 2, 1]].clone()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, target)
    return target


# -- TTA and uncertainty -------------------------------------------------------------------


def test_flip_passes_cover_every_mirror_once():
    assert flip_passes([]) == [()]
    assert flip_passes([2, 1]) == [(), (1,), (2,), (1, 2)]
    assert len(flip_passes([0, 1, 2])) == 8
    assert flip_passes([2, 0, 1], "single") == [(), (0,), (1,), (2,)]
    assert flip_passes([], "single") == [()]


def test_auto_mirrors_one_axis_at_a_time_for_three_axes_only():
    assert resolve_mirrors("auto", [0, 1, 2]) == "single"
    assert resolve_mirrors("auto", [0, 1]) == resolve_mirrors("auto", [2]) == "all"
    assert resolve_mirrors("all", [0, 1, 2]) == "all" and resolve_mirrors("single", [0, 1]) == "single"
    with pytest.raises(ConfigError, match="infer.tta_mirrors: must be auto, all, single, not 'some'"):
        resolve_mirrors("some", [0])


def test_flip_tta_of_a_mirror_equivariant_model_gives_the_same_mask(plan):
    image, _ = learned_phantom(7, "oblique")
    plain = Predictor.from_model(Pointwise(), plan, LABELS, config=_config(), device="cpu")
    a = plain.segment(plain.load(image), probabilities=True)
    assert set(np.unique(a.labels)) >= {0, 1, 2}  # a mask with something in it
    for mirrors, passes in (("all", 8), ("single", 4)):
        config = _config(tta_axes=[0, 1, 2], tta_mirrors=mirrors)
        mirrored = Predictor.from_model(Pointwise(), plan, LABELS, config=config, device="cpu", tta=True)
        assert mirrored.passes == passes
        b = mirrored.segment(mirrored.load(image), probabilities=True, uncertainty=True)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.probability_array(), b.probability_array(), atol=1e-5)
        # Every pass agrees everywhere, so the passes' disagreement is zero everywhere.
        assert sitk.GetArrayViewFromImage(b.uncertainty).max() < 1e-4


def test_uncertainty_is_zero_where_passes_agree_and_positive_where_they_differ():
    agree = torch.tensor([0.7, 0.2, 0.1])  # uncertain, but the same in every pass
    passes = [
        torch.stack([agree, torch.tensor([0.9, 0.05, 0.05])], dim=1),
        torch.stack([agree, torch.tensor([0.05, 0.9, 0.05])], dim=1),
    ]
    mean = ProbabilityMean(disagreement=True)
    for probs in passes:
        mean.add(probs.clone())
    probs = mean.mean()
    spread = mean.disagreement(probs)
    torch.testing.assert_close(probs[:, 1], torch.tensor([0.475, 0.475, 0.05]))
    assert spread[0] == pytest.approx(0.0, abs=1e-6)
    assert 0.2 < spread[1] <= 1.0


def test_tta_disagreement_of_a_lopsided_model_is_positive(plan):
    torch.manual_seed(0)
    lopsided = nn.Conv3d(1, 4, 3, padding=1)  # random kernels: mirrored inputs give other outputs
    predictor = Predictor.from_model(
        lopsided, plan, LABELS, config=_config(tta_axes=[0, 1]), device="cpu", tta=True
    )
    image, _ = learned_phantom(7)
    spread = sitk.GetArrayFromImage(predictor.segment(predictor.load(image), uncertainty=True).uncertainty)
    assert spread.min() >= 0 and spread.max() <= 1
    assert (spread > 1e-3).mean() > 0.1


def test_tta_is_on_by_default_for_a_model_trained_with_mirrors(learned_run, tmp_path):
    payload = torch.load(learned_run[1]["best"], weights_only=True)
    payload["config"]["augment"].update(flip_prob=0.5, flip_axes=[1, 2])
    torch.save(payload, tmp_path / "mirrored.pt")
    assert Predictor(tmp_path / "mirrored.pt", device="cpu").passes == 4
    assert Predictor(tmp_path / "mirrored.pt", device="cpu", tta=False).passes == 1
    assert Predictor(learned_run[1]["best"], device="cpu").passes == 1  # never mirrored: no TTA
    # Mirrored along all three axes: one axis at a time by default (4 passes), 8 when asked.
    payload["config"]["augment"].update(flip_axes=[0, 1, 2])
    torch.save(payload, tmp_path / "mirrored3.pt")
    assert Predictor(tmp_path / "mirrored3.pt", device="cpu").passes == 4
    assert Predictor(tmp_path / "mirrored3.pt", device="cpu", tta_mirrors="all").passes == 8
    assert Predictor(tmp_path / "mirrored3.pt", device="cpu").options["tta_mirrors"] == "single"
    assert "tta_mirrors" not in Predictor(tmp_path / "mirrored.pt", device="cpu").options  # as before


def test_tta_stays_off_where_training_found_it_gained_too_little(learned_run, tmp_path):
    payload = torch.load(learned_run[1]["best"], weights_only=True)
    payload["config"]["augment"].update(flip_prob=0.5, flip_axes=[1, 2])
    for gain, passes in ((None, 4), (TTA_MIN_GAIN, 4), (0.01, 4), (TTA_MIN_GAIN - 1e-4, 1), (-0.01, 1)):
        payload["tta_gain"] = gain  # what training's validation measured (None: not measured)
        torch.save(payload, tmp_path / "weighed.pt")
        assert Predictor(tmp_path / "weighed.pt", device="cpu").passes == passes, gain
    # told: --tta, or infer.tta set in the model's config, overrides the measurement
    assert Predictor(tmp_path / "weighed.pt", device="cpu", tta=True).passes == 4
    payload["config"]["infer"]["tta"] = True
    torch.save(payload, tmp_path / "told.pt")
    assert Predictor(tmp_path / "told.pt", device="cpu").passes == 4


def test_tta_is_refused_for_a_model_never_trained_on_mirrors(learned_run):
    with pytest.raises(ConfigError, match="trained without mirroring"):
        Predictor(learned_run[1]["best"], device="cpu", tta=True)


def test_uncertainty_needs_more_than_one_pass(learned_run):
    predictor = Predictor(learned_run[1]["best"], device="cpu")
    with pytest.raises(ConfigError, match="needs flip TTA or several models"):
        predictor.segment(predictor.load(learned_phantom(3)[0]), uncertainty=True)


# -- keep the largest connected piece -------------------------------------------------------


def test_keep_largest_removes_an_island_and_keeps_the_body():
    labels = np.zeros((40, 40, 20), dtype=np.uint8)
    labels[5:20, 5:20, 5:15] = 1  # body
    labels[30:33, 30:33, 2:4] = 1  # island
    labels[25:35, 5:15, 5:10] = 2  # another label, one piece
    labels[0:3, 30:33, 0:3] = 3  # two cubes touching at a corner: one piece
    labels[3:6, 33:36, 3:6] = 3
    before = labels.copy()
    only_two = keep_largest_component(labels.copy(), [2])
    np.testing.assert_array_equal(only_two, before)  # label 1's island is not its business
    out = keep_largest_component(labels, [1, 2, 3])
    assert out is labels  # in place
    assert (out[30:33, 30:33, 2:4] == 0).all()
    assert (out[5:20, 5:20, 5:15] == 1).all()
    assert (out == 1).sum() == 15 * 15 * 10
    assert (out == 2).sum() == (before == 2).sum()
    assert (out == 3).sum() == (before == 3).sum()


def test_keep_largest_setting_is_checked():
    assert keep_largest_labels("all", LABELS) == [1, 2, 3]
    assert keep_largest_labels("none", LABELS) == []
    assert keep_largest_labels([3, 1], LABELS) == [1, 3]
    assert keep_largest_labels("auto", LABELS, decided=[3, 1]) == [1, 3]
    assert keep_largest_labels("auto", LABELS, decided=None) == []  # no validation, no evidence
    with pytest.raises(ConfigError, match="'all', 'none', 'auto' or a list of foreground labels"):
        keep_largest_labels([0, 5], LABELS)


def test_predict_uses_the_checkpoints_decision_unless_told_otherwise(learned_run, tmp_path):
    payload = torch.load(learned_run[1]["best"], weights_only=True)
    payload["keep_largest"] = [1, 3]  # as if validation had found it helped LV and RV
    torch.save(payload, tmp_path / "decided.pt")
    assert Predictor(tmp_path / "decided.pt", device="cpu").keep_largest == [1, 3]
    assert Predictor(tmp_path / "decided.pt", device="cpu", keep_largest="none").keep_largest == []
    assert Predictor(tmp_path / "decided.pt", device="cpu", keep_largest=[2]).keep_largest == [2]


def _island_image():
    """Bright (label 1) body and island, a dark (label 2) slab, zero (label 0) around."""
    array = np.zeros((20, 40, 40), dtype=np.float32)  # (k, j, i)
    array[4:14, 5:25, 5:25] = 2.0
    array[2:4, 32:36, 32:36] = 2.0
    array[4:14, 28:38, 5:25] = 1.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.8, 2.8, 7.0))  # the network's spacing: no blurring on the way
    return image


def test_batch_applies_keep_largest_and_records_it(plan, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(_island_image(), str(inputs / "case.nii.gz"))
    masks = {}
    for setting in ("none", "all"):
        predictor = Predictor.from_model(Pointwise(), plan, LABELS, config=_config(), keep_largest=setting)
        predict_many(predictor, inputs, tmp_path / setting)
        masks[setting] = to_array(sitk.ReadImage(str(tmp_path / setting / "case.nii.gz")))
        run = json.loads((tmp_path / setting / "run.json").read_text())
        assert run["identity"]["options"]["keep_largest"] == ([] if setting == "none" else [1, 2, 3])
    island = (slice(32, 36), slice(32, 36), slice(2, 4))  # (i, j, k)
    assert (masks["none"][island] == 1).all()
    assert (masks["all"][island] == 0).all()
    assert (masks["all"] == 1).sum() == (masks["none"] == 1).sum() - 4 * 4 * 2
    assert (masks["all"] == 2).sum() == (masks["none"] == 2).sum() > 0


# -- ensembles -------------------------------------------------------------------------------


def test_ensemble_averages_the_members_probabilities(learned_run, tmp_path):
    best = learned_run[1]["best"]
    swapped = _swapped(best, tmp_path / "swapped.pt")
    image, label = learned_phantom(5)
    one, other = Predictor(best, device="cpu"), Predictor(swapped, device="cpu")
    ensemble = Predictor([best, swapped], device="cpu")
    labels_one, probs_one = one.predict(image, probabilities=True)
    labels_other, probs_other = other.predict(image, probabilities=True)
    assert mean_dice(labels_one, label) > 0.7
    assert ((labels_one == 1) & (labels_other == 3)).sum() > 100  # they disagree on the ventricles
    labels, probs = ensemble.predict(image, probabilities=True)
    np.testing.assert_allclose(probs, (probs_one + probs_other) / 2, atol=1e-5)
    np.testing.assert_array_equal(labels, np.argmax(probs, axis=0))
    result = ensemble.segment(ensemble.load(image), uncertainty=True)
    spread = to_array(result.uncertainty)
    disputed = (labels_one == 1) & (labels_other == 3)
    settled = (labels_one == 0) & (labels_other == 0)
    assert spread[disputed].mean() > 20 * spread[settled].mean()
    assert ensemble.passes == 2 and ensemble.sha256 not in (one.sha256, other.sha256)


def test_cross_validation_folder_is_an_ensemble_of_its_folds(learned_run, tmp_path):
    best = learned_run[1]["best"]
    cv = tmp_path / "cv"
    (cv / "fold_0").mkdir(parents=True)
    shutil.copy(best, cv / "fold_0" / "best.pt")
    _swapped(best, cv / "fold_1" / "best.pt")
    by_folder = Predictor(cv, device="cpu")
    assert by_folder.checkpoints == [str(cv / "fold_0" / "best.pt"), str(cv / "fold_1" / "best.pt")]
    assert by_folder.sha256 == Predictor([cv / "fold_0", cv / "fold_1"], device="cpu").sha256
    (cv / "fold_2").mkdir()
    with pytest.raises(Exception, match="fold_2.*has no best.pt"):
        Predictor(cv, device="cpu")


# -- the maps on disk, from the command line --------------------------------------------------


def test_cli_writes_probabilities_and_uncertainty_on_the_input_grid(learned_run, tmp_path):
    best = learned_run[1]["best"]
    swapped = _swapped(best, tmp_path / "swapped.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = learned_phantom(6, "oblique")
    sitk.WriteImage(image, str(inputs / "heart.nii.gz"))
    out = tmp_path / "out"

    refused = run_cli("predict", "-m", str(best), "-i", str(inputs), "-o", str(out), "--uncertainty")
    assert refused.returncode == 2
    assert "needs flip TTA or several models" in refused.stderr
    refused = run_cli("predict", "-m", str(best), "-i", str(inputs), "-o", str(out), "--tta")
    assert refused.returncode == 2 and "trained without mirroring" in refused.stderr

    args = ["predict", "-m", str(best), "-m", str(swapped), "-i", str(inputs), "-o", str(out)]
    done = run_cli(*args, "--save-probabilities", "--uncertainty")
    assert done.returncode == 0, done.stderr
    mask = sitk.ReadImage(str(out / "heart.nii.gz"))
    probs = sitk.ReadImage(str(out / "heart_probabilities.nii.gz"))
    spread = sitk.ReadImage(str(out / "heart_uncertainty.nii.gz"))
    for result in (mask, probs, spread):
        assert result.GetSize() == image.GetSize()
        np.testing.assert_allclose(result.GetSpacing(), image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(result.GetDirection(), image.GetDirection(), atol=1e-6)
    values = sitk.GetArrayFromImage(probs)  # (k, j, i, classes)
    assert values.shape[-1] == 4
    np.testing.assert_allclose(values.sum(-1), 1.0, atol=1e-4)
    assert values.min() >= 0
    np.testing.assert_array_equal(np.argmax(values, -1), sitk.GetArrayFromImage(mask))
    disagreement = sitk.GetArrayFromImage(spread)
    assert 0 <= disagreement.min() and disagreement.max() <= 1 and disagreement.max() > 0.1
    with open(out / "predictions.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert 0 < float(row["uncertainty"]) <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["options"]["probabilities"] and run["identity"]["options"]["uncertainty"]

    again = run_cli(*args, "--save-probabilities", "--uncertainty")
    assert again.returncode == 0 and "0 written, 1 skipped" in again.stdout
    changed = run_cli(*args)  # the same masks without the maps: another run's business
    assert changed.returncode == 2
    assert "made with other options" in changed.stderr and "probabilities True -> False" in changed.stderr


def test_maps_may_not_overwrite_another_case(learned_run, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = learned_phantom(1)
    sitk.WriteImage(image, str(inputs / "a.nii.gz"))
    sitk.WriteImage(image, str(inputs / "a_probabilities.nii.gz"))
    done = run_cli(
        "predict",
        "-m",
        str(learned_run[1]["best"]),
        "-i",
        str(inputs),
        "-o",
        str(tmp_path / "o"),
        "--save-probabilities",
    )
    assert done.returncode == 2
    assert "would write the same file a_probabilities.nii.gz" in done.stderr


# -- memory: the label map is made a slab at a time --------------------------------------------


def _random_probabilities(classes: int, seed: int):
    """Random class probabilities on a grid 2.2x coarser than an oblique phantom's, from the same
    corner over the same field of view: (the phantom's grid, probs (C, *spatial), their affine,
    probs linearly resampled onto the phantom's grid in one go, (k, j, i, C))."""
    image, _ = learned_phantom(2, "oblique")
    reference = sitk.Image(image)
    rng = np.random.default_rng(seed)
    probs = torch.from_numpy(rng.dirichlet(np.ones(classes), size=(30, 26, 9)).astype(np.float32))
    probs = probs.permute(3, 0, 1, 2)
    affine = ras_affine(reference)
    affine[:3, :3] *= 2.2
    whole = sitk.GetArrayFromImage(grid.resample_onto(probs, affine, reference))
    return reference, probs, affine, whole


def test_slab_by_slab_labels_equal_the_whole_volume_at_once(monkeypatch):
    reference, probs, affine, whole = _random_probabilities(4, seed=0)
    monkeypatch.setattr(grid, "SLAB_VOXELS", 64 * 56 * 4)  # a slice per slab
    labels, kept = grid.to_input_grid(probs, affine, reference, probabilities=True)
    assert len(np.unique(labels)) == 4
    np.testing.assert_array_equal(labels, np.argmax(whole, axis=-1).transpose())
    np.testing.assert_allclose(kept, whole.transpose(2, 1, 0, 3), atol=1e-6)  # slab origins round
    np.testing.assert_array_equal(grid.to_input_grid(probs, affine, reference), labels)


def test_a_binary_label_map_from_its_one_resampled_class_equals_the_argmax_of_both():
    reference, probs, affine, whole = _random_probabilities(2, seed=1)
    labels = grid.to_input_grid(probs, affine, reference)  # resamples class 1 alone
    expected = np.argmax(whole, axis=-1).transpose()
    near_tie = np.abs(whole[..., 1] - whole[..., 0]).transpose() < 1e-6  # float rounding decides
    assert 0.3 < labels.mean() < 0.7  # both labels, in the oblique grid's every corner
    np.testing.assert_array_equal(labels[~near_tie], expected[~near_tie])
    assert near_tie.mean() < 1e-3
