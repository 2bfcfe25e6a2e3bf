"""Two-channel cases (nnU-Net's CASE_0000 + CASE_0001) from dataset to masks."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.config import load_config
from medseg.data.datasets import find_cases
from medseg.errors import InputError
from medseg.files import channel_groups
from medseg.inference.batch import predict_many
from medseg.inference.cases import ChannelFiles, discover
from medseg.inference.predictor import Predictor
from medseg.io import read_volume
from medseg.training.trainer import Trainer
from tests.conftest import TINY_OVERRIDES


def _second_contrast(image: sitk.Image) -> sitk.Image:
    """A made-up second sequence on the same grid: inverted contrast."""
    inverted = sitk.Cast(sitk.InvertIntensity(image, maximum=3000), sitk.sitkInt16)
    inverted.CopyInformation(image)
    return inverted


@pytest.fixture(scope="module")
def two_channel_dataset(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("mc") / "heart2"
    for split in ("Tr", "Ts"):
        (root / f"images{split}").mkdir(parents=True)
        (root / f"labels{split}").mkdir()
        for image_path in sorted((tiny_dataset / f"images{split}").iterdir()):
            cid = image_path.name.removesuffix(".nii.gz")
            image = sitk.ReadImage(str(image_path))
            sitk.WriteImage(image, str(root / f"images{split}" / f"{cid}_0000.nii.gz"))
            sitk.WriteImage(_second_contrast(image), str(root / f"images{split}" / f"{cid}_0001.nii.gz"))
            label = tiny_dataset / f"labels{split}" / image_path.name
            sitk.WriteImage(sitk.ReadImage(str(label)), str(root / f"labels{split}" / image_path.name))
    return root


def test_cases_group_channels(two_channel_dataset):
    case = find_cases(two_channel_dataset).training[0]
    assert case["id"] == "heart_000"
    assert [p.rsplit("/", 1)[1] for p in case["image"]] == ["heart_000_0000.nii.gz", "heart_000_0001.nii.gz"]
    inputs = discover(two_channel_dataset / "imagesTs")
    assert [c.mask for c in inputs] == ["heart_003.nii.gz", "heart_004.nii.gz"]
    assert all(isinstance(c.source, ChannelFiles) for c in inputs)
    (one,) = [
        c for c in discover(two_channel_dataset / "imagesTs", channels=1) if c.mask == "heart_003_0001.nii.gz"
    ]
    assert one.source.name == "heart_003_0001.nii.gz"  # a one-channel model groups nothing
    failed = discover(two_channel_dataset / "imagesTs", channels=3)
    assert [(c.status, c.reason) for c in failed][0] == (
        "failed",
        "heart_003: has 2 channel files (heart_003_0000, heart_003_0001); the model needs 3",
    )


def _groups(names, **kwargs):
    return {
        g.id: ([f.name for f in g.files], g.problem)
        for g in channel_groups([Path(n) for n in names], **kwargs)
    }


def test_one_rule_groups_only_contiguous_channels_from_0000():
    scans = ["amos_0001.nii.gz", "amos_0002.nii.gz", "amos_0003.nii.gz"]  # numbered scans, not channels
    assert _groups(scans) == {n.removesuffix(".nii.gz"): ([n], "") for n in scans}
    assert _groups(scans, channels=2) == _groups(scans)
    pair = ["b_0001.nii.gz", "b_0000.nii.gz"]
    assert _groups(pair) == {"b": (["b_0000.nii.gz", "b_0001.nii.gz"], "")}  # channel order, not listing
    assert _groups(pair, channels=1) == {"b_0000": (["b_0000.nii.gz"], ""), "b_0001": (["b_0001.nii.gz"], "")}
    assert _groups(["c_0000.nii.gz"], channels=1) == {"c": (["c_0000.nii.gz"], "")}
    ((files, problem),) = _groups(["d_0000.nii", "d_0001.nii", "d_0002.nii"], channels=2).values()
    assert problem == "has 3 channel files (d_0000, d_0001, d_0002); the model needs 2"
    # training: labels named like the files say they are scans; a label named CASE says channels
    assert set(_groups(["e_0000.mha", "e_0001.mha"], labelled={"e_0000", "e_0001"})) == {"e_0000", "e_0001"}
    ((files, problem),) = _groups(["f_0000.mha", "f_0002.mha"], labelled={"f"}).values()
    assert problem == "channels are not numbered _0000, _0001, ...: f_0000, f_0002"


def test_numbered_scans_are_separate_cases_in_training_and_prediction(tiny_dataset, tmp_path):
    root = tmp_path / "amos"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    images = sorted((tiny_dataset / "imagesTr").iterdir())[:3]
    for k, image in enumerate(images, start=1):
        for sub in ("imagesTr", "imagesTs"):
            (root / sub / f"amos_{k:04d}.nii.gz").write_bytes(image.read_bytes())
        (root / "labelsTr" / f"amos_{k:04d}.nii.gz").write_bytes(
            (tiny_dataset / "labelsTr" / image.name).read_bytes()
        )
    assert [c["id"] for c in find_cases(root).training] == ["amos_0001", "amos_0002", "amos_0003"]
    assert [c.mask for c in discover(root / "imagesTs", channels=2)] == [
        "amos_0001.nii.gz",
        "amos_0002.nii.gz",
        "amos_0003.nii.gz",
    ]


def test_two_channels_train_and_predict(two_channel_dataset, tmp_path):
    config = load_config(None, TINY_OVERRIDES)
    config.data.root, config.train.output_dir = str(two_channel_dataset), str(tmp_path / "run")
    trainer = Trainer(config)
    assert trainer.plan.channels == 2
    assert next(trainer.model.parameters()).shape[1] == 2  # the first conv takes both channels
    summary = trainer.fit()
    assert torch.load(summary["best"], weights_only=True)["plan"]["channels"] == 2

    predictor = Predictor(summary["best"], device="cpu")
    result = predict_many(predictor, two_channel_dataset / "imagesTs", tmp_path / "out")
    assert sorted(p.rsplit("/", 1)[1] for p in result.written) == ["heart_003.nii.gz", "heart_004.nii.gz"]
    mask = read_volume(tmp_path / "out" / "heart_003.nii.gz")
    image = read_volume(two_channel_dataset / "imagesTs" / "heart_003_0000.nii.gz")
    assert mask.GetSize() == image.GetSize()
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-6)

    # each channel reaches the network in its place: _0000 first
    (case, _) = discover(two_channel_dataset / "imagesTs", channels=2)
    read = predictor.load(case.source).channels
    for channel, path in zip(read, case.source.files):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(channel), sitk.GetArrayFromImage(read_volume(path))
        )
    assert [p.name for p in case.source.files] == ["heart_003_0000.nii.gz", "heart_003_0001.nii.gz"]

    single = two_channel_dataset / "imagesTs" / "heart_003_0000.nii.gz"
    with pytest.raises(InputError, match=r"has 1 channel\(s\); this model needs 2"):
        predictor.predict_file(single, tmp_path / "one.nii.gz")


def test_channels_off_grid_are_reported(two_channel_dataset, tmp_path):
    from medseg.data.datasets import check_cases

    cases = find_cases(two_channel_dataset).training
    moved = sitk.ReadImage(cases[0]["image"][1])
    moved.SetSpacing([s * 1.1 for s in moved.GetSpacing()])
    target = tmp_path / "moved_0001.nii.gz"
    sitk.WriteImage(moved, str(target))
    case = dict(cases[0], image=[cases[0]["image"][0], str(target)])
    ((path, problem),) = check_cases([case], {0: "bg", 1: "LV", 2: "myo", 3: "RV"})
    assert path == str(target)
    assert problem.startswith("spacing") and "of its image" in problem
