import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.data.phantom import make_phantom
from medseg.data.plan import Plan
from medseg.errors import CheckpointError, ConfigError, InputError
from medseg.evaluation.metrics import dice
from medseg.inference.batch import predict_many
from medseg.inference.grid import to_input_grid
from medseg.inference.predictor import Predictor
from medseg.inference.preprocess import network_input
from medseg.io import image_from_ras, read_volume, to_array
from tests.conftest import learned_phantom, mean_dice, write_dicom_series


@pytest.fixture(scope="module")
def learned(learned_run):
    """A predictor whose masks are worth checking (see ``learned_run``)."""
    return Predictor(learned_run[1]["best"], device="cpu")


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("orientation", ["ras", "lps", "oblique"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_mask_is_written_on_the_input_grid(learned, tmp_path, orientation, suffix):
    image, label = learned_phantom(11, orientation)
    source = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(source))
    out = learned.predict_file(source, tmp_path / "out" / f"scan{suffix}")
    mask = read_volume(out)
    _same_grid(mask, image)
    assert set(np.unique(to_array(mask))) <= {0, 1, 2, 3}
    assert mean_dice(mask, label) > 0.7  # the right labels on the right voxels, not just a grid


@pytest.mark.parametrize("orientation", ["ras", "lps", "oblique"])
def test_results_map_back_to_the_right_voxels(tmp_path, orientation):
    """One-hot probabilities of the true label, made on the network's grid (RAS, other spacing),
    must land back on the true label on the input grid. A flipped grid must not."""
    image, label = make_phantom(4, shape=(72, 72, 18), spacing=(2.4, 2.4, 6.0), orientation=orientation)
    # The network grid as prediction makes it; the true label put on it by SimpleITK (nearest).
    plan = Plan(spacing=[2.0, 2.0, 5.0], patch_size=[32, 32, 8], strides=[[2, 2, 1]])
    network, affine = network_input([image], plan)
    grid = image_from_ras(np.zeros(network.shape[1:], np.uint8), affine)
    on_grid = sitk.Resample(label, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    resampled = torch.as_tensor(to_array(on_grid).astype(np.int64))[None]
    assert resampled.shape[1:] != label.GetSize()  # the grids really differ
    probs = torch.nn.functional.one_hot(resampled[0].long(), 4).permute(3, 0, 1, 2).float()
    truth = to_array(label)

    back = to_input_grid(probs, affine, label)
    for c in (1, 2, 3):
        assert dice(back == c, truth == c) > 0.85, f"class {c}"
    flipped = to_input_grid(probs.flip(1), affine, label)
    assert dice(flipped == 1, truth == 1) < 0.5


def test_batch_keeps_going_past_bad_files(learned, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, label = learned_phantom(3)
    sitk.WriteImage(image, str(inputs / "good.nii.gz"))
    (inputs / "empty.nii.gz").write_bytes(b"")
    (inputs / "notes.nii").write_text("not an image")
    flat = sitk.Image(32, 32, sitk.sitkInt16)
    sitk.WriteImage(flat, str(inputs / "flat.nii.gz"))
    predictor = learned

    result = predict_many(predictor, inputs, tmp_path / "out")
    assert result.written == [str(tmp_path / "out" / "good.nii.gz")]
    assert mean_dice(read_volume(result.written[0]), label) > 0.7
    assert result.failed == {
        str(inputs / "empty.nii.gz"): "file is empty",
        str(inputs / "flat.nii.gz"): "is 2D (32x32); this model needs 3D images",
        str(
            inputs / "notes.nii"
        ): "cannot read: not an image in a format its name promises (wrong format or corrupt)",
    }
    assert json.loads((tmp_path / "out" / "labels.json").read_text())["2"] == "myocardium"
    again = predict_many(predictor, inputs, tmp_path / "out")  # resumes: nothing redone
    assert again.written == [] and again.skipped == [str(tmp_path / "out" / "good.nii.gz")]


def test_bad_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Predictor(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a medseg checkpoint .*: cannot load it"):
        Predictor(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a medseg checkpoint"):
        Predictor(tmp_path / "other.pt")


def test_missing_input(tiny_run, tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        predict_many(Predictor(tiny_run["best"], device="cpu"), tmp_path / "nope", tmp_path / "out")


@pytest.mark.parametrize("orientation", ["ras", "lps", "oblique"])
def test_dicom_series_mask_on_the_series_grid(learned, tmp_path, orientation):
    image, label = learned_phantom(12, orientation)
    write_dicom_series(image, tmp_path / "patient" / "study", uid="1.2.840.99.7", description="SAX cine")
    result = predict_many(learned, tmp_path / "patient", tmp_path / "out")
    assert result.failed == {}
    # The series' folder under the input is mirrored under the output: the mask leads back to it.
    assert result.written == [str(tmp_path / "out" / "study" / "SAX_cine_1.2.840.99.7.nii.gz")]
    _same_grid(read_volume(result.written[0]), read_volume(tmp_path / "patient" / "study"))
    # Slices in the right order: a mask of a series read upside down would miss its labels.
    assert mean_dice(read_volume(result.written[0]), label) > 0.7


def test_mixed_folder_reports_each_bad_case(learned, tmp_path):
    inputs = tmp_path / "in"
    image, label = learned_phantom(5)
    inputs.mkdir()
    sitk.WriteImage(image, str(inputs / "good.nii.gz"))
    whole = (inputs / "good.nii.gz").read_bytes()
    (inputs / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    (inputs / "empty.nii.gz").write_bytes(b"")
    (inputs / "notes.nii").write_text("not an image")
    write_dicom_series(image, inputs / "dicom_ok", uid="1.2.3.100", description="ok")
    write_dicom_series(image, inputs / "dicom_gap", uid="1.2.3.200", description="gap", skip=(6,))
    result = predict_many(learned, inputs, tmp_path / "out")
    assert sorted(Path(p).name for p in result.written) == ["good.nii.gz", "ok_1.2.3.100.nii.gz"]
    for mask in result.written:  # the file and the series hold the same scan
        assert mean_dice(read_volume(mask), label) > 0.7, mask
    assert sorted(result.failed) == sorted(
        [
            str(inputs / "cut.nii.gz"),
            str(inputs / "empty.nii.gz"),
            str(inputs / "notes.nii"),
            f"{inputs / 'dicom_gap'} [series 1.2.3.200]",
        ]
    )
    assert "file is truncated" in result.failed[str(inputs / "cut.nii.gz")]
    assert result.failed[str(inputs / "empty.nii.gz")] == "file is empty"
    assert "not an image" in result.failed[str(inputs / "notes.nii")]
    assert result.failed[f"{inputs / 'dicom_gap'} [series 1.2.3.200]"].startswith(
        "series 1.2.3.200 misses 1 slice(s)"
    )


def test_output_formats(learned, tmp_path):
    pytest.importorskip("highdicom")
    image, label = learned_phantom(12, "oblique")
    write_dicom_series(image, tmp_path / "in" / "series", uid="1.2.840.99.8", description="SAX")
    sitk.WriteImage(image, str(tmp_path / "in" / "scan.nii.gz"))
    predictor = learned

    nrrd = predict_many(predictor, tmp_path / "in", tmp_path / "nrrd", fmt="nrrd")
    assert sorted(Path(p).name for p in nrrd.written) == ["SAX_1.2.840.99.8.nrrd", "scan.nrrd"]
    _same_grid(read_volume(tmp_path / "nrrd" / "scan.nrrd"), image)
    assert mean_dice(read_volume(tmp_path / "nrrd" / "scan.nrrd"), label) > 0.7

    seg = predict_many(predictor, tmp_path / "in", tmp_path / "seg", fmt="dicom-seg")
    assert seg.written == [str(tmp_path / "seg" / "series" / "SAX_1.2.840.99.8.dcm")]
    assert seg.failed == {
        str(tmp_path / "in" / "scan.nii.gz"): "DICOM-SEG output needs a DICOM series as input"
    }
    with pytest.raises(ConfigError, match="unknown output format 'png'"):
        predict_many(predictor, tmp_path / "in", tmp_path / "png", fmt="png")


def test_a_network_made_in_python_is_saved_and_predicted_with(learned, tmp_path):
    from medseg.checkpoint import Checkpoint
    from medseg.models.factory import checkpoint_of, model_from_checkpoint

    trained = Checkpoint.load(learned.checkpoint)
    net, plan, config = model_from_checkpoint(trained), trained.preprocessing(), trained.settings()
    saved = checkpoint_of(net, plan, trained.labels, config).save(tmp_path / "mine.pt")
    image, _ = learned_phantom(7)
    ours = Predictor(saved, device="cpu").predict(image)
    np.testing.assert_array_equal(ours, learned.predict(image))

    class Custom(torch.nn.Module):  # no config describes it
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 4, 1)

        def forward(self, x):
            return self.conv(x)

    custom = checkpoint_of(Custom(), plan, trained.labels, config)
    assert custom.custom_model
    with pytest.raises(CheckpointError, match="was trained with a custom model"):
        Predictor(custom.save(tmp_path / "custom.pt"), device="cpu")


def test_stitching_moves_to_the_cpu_when_the_gpu_is_full(caplog):
    from medseg.inference.sliding import stitch_with_fallback

    tried = []

    def stitch(where):
        tried.append(str(where))
        if where != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.ones(2)

    assert stitch_with_fallback(stitch, torch.device("cuda")).tolist() == [1.0, 1.0]
    assert tried == ["cuda", "cpu"]
    assert "stitching them on the CPU" in caplog.text
    tried.clear()
    stitch_with_fallback(stitch, torch.device("cpu"))
    assert tried == ["cpu"]
