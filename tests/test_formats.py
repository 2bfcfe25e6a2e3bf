"""Tasks in the other shapes hospitals and research data come in: 2D PNG/TIFF images, MSD-style
4D multi-modal NIfTI, and training straight from DICOM series."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.config import load_config
from medseg.data.datasets import find_cases
from medseg.errors import InputError
from medseg.evaluation.folders import evaluate
from medseg.inference.batch import predict_many
from medseg.inference.predictor import Predictor
from medseg.io import ras_affine, read_channels, read_volume, to_array
from medseg.training.trainer import Trainer
from tests.conftest import TINY_OVERRIDES, write_dicom_series

TINY_2D = [o for o in TINY_OVERRIDES if not o.startswith("data.patch_size")] + ["data.patch_size=[32, 32]"]


def _train(root, tmp_path, overrides=TINY_OVERRIDES):
    config = load_config(None, list(overrides))
    config.data.root, config.train.output_dir = str(root), str(tmp_path / "run")
    trainer = Trainer(config)
    return trainer, trainer.fit()


# -- 2D images ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def png_dataset(tiny_dataset, tmp_path_factory):
    """Mid slices of the tiny phantoms as 8-bit PNGs (RGB for the first two) with PNG labels."""
    root = tmp_path_factory.mktemp("png") / "slices"
    for folder in ("images", "labels", "test"):
        (root / folder).mkdir(parents=True)
    for k, path in enumerate(sorted((tiny_dataset / "imagesTr").iterdir())):
        image = to_array(read_volume(path))
        label = to_array(read_volume(tiny_dataset / "labelsTr" / path.name))
        z = image.shape[2] // 2
        pixels = (255 * image[:, :, z] / image.max()).astype(np.uint8)
        rgb = k < 2
        array = np.stack([pixels] * 3, axis=-1) if rgb else pixels
        # SimpleITK arrays are (row, column): the transpose puts i along the image's x axis.
        out = sitk.GetImageFromArray(np.ascontiguousarray(array.swapaxes(0, 1)), isVector=rgb)
        sitk.WriteImage(out, str(root / "images" / f"slice_{k}.png"))
        mask = sitk.GetImageFromArray(np.ascontiguousarray(label[:, :, z].T.astype(np.uint8)))
        sitk.WriteImage(mask, str(root / "labels" / f"slice_{k}.png"))
        if k == 2:  # a grey TIFF to predict, not square: a transposed mask cannot fit it
            tiff = sitk.GetImageFromArray(np.ascontiguousarray(pixels[:, 6:].T))
            tiff.SetSpacing((0.8, 1.5))
            sitk.WriteImage(tiff, str(root / "test" / "t.tif"))
    return root


def test_rgb_png_reads_as_three_channels(png_dataset):
    channels = read_channels(png_dataset / "images" / "slice_0.png", spatial_dims=2)
    assert len(channels) == 3 and channels[0].GetDimension() == 2
    assert np.array_equal(to_array(channels[0]), to_array(channels[2]))
    assert ras_affine(channels[0]).shape == (3, 3)


def test_2d_task_trains_and_predicts_on_the_input_grid(png_dataset, tmp_path):
    # RGB and grey cases do not mix: the first grey one is named.
    mixed = load_config(None, TINY_2D)
    mixed.data.root = str(png_dataset)
    with pytest.raises(InputError, match="has 1 channel.*slice_0.png has 3") as error:
        Trainer(mixed)
    assert error.value.where.endswith("slice_2.png")

    grey = tmp_path / "grey"
    for folder in ("images", "labels"):
        (grey / folder).mkdir(parents=True)
    for k in range(3):
        image = read_channels(png_dataset / "images" / f"slice_{k}.png")[0]
        sitk.WriteImage(image, str(grey / "images" / f"slice_{k}.png"))
        label = read_volume(png_dataset / "labels" / f"slice_{k}.png")
        sitk.WriteImage(label, str(grey / "labels" / f"slice_{k}.png"))
    trainer, summary = _train(grey, tmp_path, TINY_2D)
    assert trainer.plan.spatial_dims == 2 and trainer.plan.spacing == [1.0, 1.0]
    assert "2D images" in trainer.plan.describe()
    assert next(trainer.model.parameters()).ndim == 4  # Conv2d weights
    # One image per batch: batch norm's running statistics would fit no image, so 2D uses instance norm.
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in trainer.model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trainer.model.modules())

    predictor = Predictor(summary["best"], device="cpu")
    result = predict_many(predictor, png_dataset / "test", tmp_path / "out")
    assert result.failed == {} and len(result.written) == 1
    mask = read_volume(tmp_path / "out" / "t.tif")
    source = read_volume(png_dataset / "test" / "t.tif")
    assert mask.GetSize() == source.GetSize() == (40, 34) and mask.GetDimension() == 2
    assert set(np.unique(to_array(mask))) <= {0, 1, 2, 3}
    # areas in cm^2, under a column that says so, as evaluate and the QC report give them
    (row,) = csv.DictReader((tmp_path / "out" / "predictions.csv").open())
    pixel_cm2 = np.prod(source.GetSpacing()) / 100
    for index in (1, 2, 3):
        assert float(row[f"class_{index}_cm2"]) == pytest.approx((to_array(mask) == index).sum() * pixel_cm2)
    assert not any(key.endswith("_ml") for key in row)

    # A 3D volume given to the 2D model is refused by name.
    volume = tmp_path / "volume.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 4, sitk.sitkUInt8), str(volume))
    with pytest.raises(InputError, match=r"is 3D \(8x8x4\); this model needs 2D images"):
        predictor.predict_file(volume, tmp_path / "x.png")


def test_2d_masks_evaluate(png_dataset, tmp_path):
    ref = to_array(read_volume(png_dataset / "labels" / "slice_0.png"))
    shifted = np.roll(ref, 2, axis=0)
    (tmp_path / "pred").mkdir()
    sitk.WriteImage(
        sitk.GetImageFromArray(np.ascontiguousarray(shifted.T)), str(tmp_path / "pred" / "slice_0.png")
    )
    scores = evaluate(tmp_path / "pred", png_dataset / "labels", tmp_path / "scores")
    a, b = shifted == 1, ref == 1
    assert scores["cases"][0]["class_1"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert (tmp_path / "scores" / "metrics.csv").is_file()
    # a 2D image's "volume" is its area in cm^2, from the pixel spacing
    spacing = read_volume(png_dataset / "labels" / "slice_0.png").GetSpacing()
    row = scores["rows"][0]
    assert row["ref_ml"] == pytest.approx(b.sum() * spacing[0] * spacing[1] / 100)


# -- MSD 4D multi-modal NIfTI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def msd_4d_dataset(tiny_dataset, tmp_path_factory):
    """Task01-style: each image one 4D NIfTI holding two modalities, labels 3D."""
    root = tmp_path_factory.mktemp("msd4d") / "Task99"
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    meta["modality"] = {"0": "T1", "1": "T2"}
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    for entry in meta["training"] + meta["test"]:
        image = tiny_dataset / entry["image"]
        scan = nib.load(str(image))
        data = np.asarray(scan.dataobj, dtype=np.float32)
        four = np.stack([data, data.max() - data], axis=-1)
        nib.save(nib.Nifti1Image(four, scan.affine), str(root / entry["image"]))
        if "label" in entry:
            (root / entry["label"]).write_bytes((tiny_dataset / entry["label"]).read_bytes())
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_4d_nifti_splits_into_channels_on_the_3d_grid(msd_4d_dataset, tiny_dataset):
    case = find_cases(msd_4d_dataset).training[0]
    channels = read_channels(case["image"], spatial_dims=3)
    reference = read_volume(tiny_dataset / "imagesTr" / "heart_000.nii.gz")
    assert len(channels) == 2
    assert channels[0].GetSize() == reference.GetSize()
    assert np.allclose(ras_affine(channels[1]), ras_affine(reference), atol=1e-4)
    # each channel holds its own volume, voxel for voxel: the scan, then its inverse
    scan = to_array(reference).astype(np.float32)
    np.testing.assert_allclose(to_array(channels[0]), scan)
    np.testing.assert_allclose(to_array(channels[1]), scan.max() - scan)


def test_4d_task_trains_and_predicts(msd_4d_dataset, tiny_dataset, tmp_path):
    trainer, summary = _train(msd_4d_dataset, tmp_path)
    assert trainer.plan.channels == 2 and trainer.plan.spatial_dims == 3
    predictor = Predictor(summary["best"], device="cpu")
    test = sorted((msd_4d_dataset / "imagesTs").iterdir())[0]
    written = predictor.predict_file(test, tmp_path / "mask.nii.gz")
    mask, reference = read_volume(written), read_volume(tiny_dataset / "imagesTs" / test.name)
    assert mask.GetSize() == reference.GetSize()
    assert np.allclose(ras_affine(mask), ras_affine(reference), atol=1e-4)


# -- training from DICOM series -------------------------------------------------------------


def test_training_reads_dicom_series_folders(tiny_dataset, tmp_path):
    root = tmp_path / "dicom_task"
    (root / "labels").mkdir(parents=True)
    for k, image in enumerate(sorted((tiny_dataset / "imagesTr").iterdir())):
        cid = image.name.removesuffix(".nii.gz")
        volume = read_volume(image)
        write_dicom_series(volume, root / "images" / cid, uid=f"1.2.826.0.1.3680043.2.1125.{k + 7}")
        # The label is written on the grid the DICOM series reads back as.
        series = read_volume(root / "images" / cid)
        label = sitk.ReadImage(str(tiny_dataset / "labelsTr" / image.name))
        label.CopyInformation(series)
        sitk.WriteImage(label, str(root / "labels" / image.name))
    dataset = find_cases(root)
    assert [c["id"] for c in dataset.training] == ["heart_000", "heart_001", "heart_002"]
    manifest = root / "cases.csv"  # a CSV manifest may name series folders too
    manifest.write_text("image,label\n" + "".join(f"images/{c}/,labels/{c}.nii.gz\n" for c in ["heart_001"]))
    assert [c["id"] for c in find_cases(manifest).training] == ["heart_001"]
    trainer, summary = _train(
        root, tmp_path, TINY_OVERRIDES + ["data.cache=disk", f"data.cache_dir={tmp_path}/c"]
    )
    expected = np.median([read_volume(c["image"]).GetSpacing() for c in dataset.training], axis=0)
    # in axis order: a swapped axis must not pass (the phantoms' axes stay x, y, z under RAS)
    assert trainer.plan.spacing == pytest.approx(list(expected), abs=1e-3)
    assert summary["steps"] == 2
