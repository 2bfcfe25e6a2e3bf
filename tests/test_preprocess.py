"""Prediction's own preprocessing and sliding window give what training's MONAI ones give."""

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai import transforms as mt
from monai.inferers import sliding_window_inference

from medseg.data.plan import Plan
from medseg.data.transforms import _preprocess
from medseg.inference.preprocess import network_input
from medseg.inference.sliding import blend_windows


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


DIRECTIONS = {
    "lps": np.eye(3),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "permuted": np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]),
    "permuted and flipped": np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]]),
    "oblique": _rotation(0.3) @ np.diag([1.0, -1.0, 1.0]),
}


def _image(direction: np.ndarray, spacing, seed: int = 0, zeros: bool = True) -> sitk.Image:
    array = np.random.default_rng(seed).normal(100.0, 30.0, size=(23, 31, 37)).astype(np.float32)
    if zeros:
        array[:3] = 0  # a masked-out rim: z-scoring leaves it at zero
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin((3.0, -7.0, 11.0))
    return image


def _monai(channels: list[sitk.Image], plan: Plan):
    out = mt.Compose(_preprocess(plan, ["image"]))({"image": channels})["image"]
    return out.as_tensor(), out.affine.numpy()


def _assert_same(channels: list[sitk.Image], plan: Plan) -> None:
    expected, expected_affine = _monai(channels, plan)
    values, affine = network_input(channels, plan)
    assert values.shape == expected.shape
    assert values.dtype == torch.float32
    np.testing.assert_allclose(affine, expected_affine, atol=1e-9)
    torch.testing.assert_close(values, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(
    "spacing, target",
    [
        ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),  # no resampling
        ((0.7, 0.9, 2.5), (1.25, 1.25, 1.25)),
        ((0.5, 1.0, 2.0), (1.0, 0.5, 2.0)),  # every other voxel taken (no blend), one between each
        # 30 voxels of 0.6 mm are 22.5 of 0.8: a rounding tie that must fall as MONAI's does
        ((1.5, 0.6, 3.3), (0.8, 1.1, 2.0)),
    ],
)
def test_network_input_matches_training_pipeline(direction, spacing, target):
    plan = Plan(spacing=list(target), patch_size=[16, 16, 16], strides=[[2, 2, 2]])
    _assert_same([_image(DIRECTIONS[direction], spacing)], plan)


def test_network_input_matches_for_two_channels_and_ct():
    # Two channels z-scored each on its own, one of them all zero (left as it is).
    first = _image(DIRECTIONS["oblique"], (0.8, 1.3, 2.2), seed=1)
    empty = sitk.Image(first)
    empty *= 0
    zscore = Plan(spacing=[1.0, 1.0, 1.5], patch_size=[16, 16, 16], strides=[[2, 2, 2]], channels=2)
    _assert_same([first, empty], zscore)
    ct = Plan(
        spacing=[1.0, 1.0, 1.5],
        patch_size=[16, 16, 16],
        strides=[[2, 2, 2]],
        normalization="ct",
        clip=[60.0, 140.0],
        mean=95.0,
        std=20.0,
        modality="CT",
    )
    _assert_same([_image(DIRECTIONS["lps"], (0.8, 1.3, 2.2), zeros=False)], ct)


def test_network_input_matches_for_2d_images():
    image = sitk.GetImageFromArray(np.random.default_rng(2).normal(size=(45, 61)).astype(np.float32))
    image.SetSpacing((0.7, 1.1))
    image.SetOrigin((4.0, -2.0))
    plan = Plan(spacing=[1.0, 0.9], patch_size=[32, 32], strides=[[2, 2]])
    _assert_same([image], plan)


@pytest.mark.parametrize(
    "shape, roi, overlap",
    [
        ((40, 33, 20), (16, 16, 16), 0.5),
        ((10, 50, 20), (16, 16, 16), 0.5),  # smaller than a window along one axis: padded
        ((16, 16, 16), (16, 16, 16), 0.5),  # one window
        ((37, 29, 41), (24, 20, 12), 0.25),
    ],
)
def test_sliding_window_matches_monai(shape, roi, overlap):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    image = torch.randn(1, *shape)
    with torch.no_grad():
        expected = sliding_window_inference(image[None], roi, 2, net, overlap=overlap, mode="gaussian")[0]
        found = blend_windows(image, roi, net, overlap, 2, "cpu")
    torch.testing.assert_close(found, torch.as_tensor(expected), atol=1e-5, rtol=0)


def test_prediction_does_not_import_monai(learned_run, tmp_path):
    """MONAI imports all its submodules, 2.3 s of a process's start: prediction stays off it."""
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.Image(48, 48, 16, sitk.sitkFloat32) + 1.0, str(tmp_path / "in" / "image.nii.gz"))
    checkpoint, inputs, outputs = learned_run[1]["best"], tmp_path / "in", tmp_path / "out"
    code = (
        "import sys\n"
        "from medseg.inference.batch import predict_many\n"
        "from medseg.inference.predictor import Predictor\n"
        f"predict_many(Predictor({str(checkpoint)!r}), {str(inputs)!r}, {str(outputs)!r})\n"
        "assert 'monai' not in sys.modules, 'prediction imported MONAI'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (outputs / "image.nii.gz").is_file()
