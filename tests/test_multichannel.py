"""Two-channel cases (nnU-Net's CASE_0000 + CASE_0001) from dataset to masks."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.config import load_config
from medseg.data.datasets import find_cases
from medseg.errors import InputError
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
