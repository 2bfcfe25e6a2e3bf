"""Augmentation keeps image and label together, keeps labels integer, and never moves voxels
across thick slices."""

import numpy as np
import pytest
import torch
from monai import transforms as mt

from medseg.config import AugmentConfig, load_config
from medseg.data.augment import RandLowResolutiond, crop_size, intensity_steps, spatial_steps
from medseg.data.plan import Plan
from medseg.data.transforms import train_transforms
from medseg.errors import ConfigError

EVERY_SPATIAL_STEP = AugmentConfig(spatial_prob=1.0, flip_prob=0.5)


def _blocks(shape, classes=4):
    """A label of axis-aligned blocks and an image whose intensity is 100 x the class."""
    label = torch.zeros((1, *shape), dtype=torch.int64)
    x, y = shape[0], shape[1]
    label[:, x // 4 : x // 2, y // 4 : 3 * y // 4] = 1
    label[:, x // 2 : 3 * x // 4, y // 4 : y // 2] = 2
    label[:, x // 2 : 3 * x // 4, y // 2 : 3 * y // 4] = 3
    return {"image": 100.0 * label.float(), "label": label}


def _random_steps(aug: AugmentConfig, plan: Plan) -> mt.Compose:
    keys = ["image", "label"]
    flips = [mt.RandFlipd(keys, prob=aug.flip_prob, spatial_axis=a) for a in range(plan.spatial_dims)]
    return mt.Compose([*spatial_steps(aug, plan, keys), *flips])


@pytest.mark.parametrize(
    "plan",
    [
        Plan(
            spacing=[1.0, 1.0, 1.0], patch_size=[32, 32, 16], strides=[[2, 2, 2]]
        ),  # 3D, rotated about all axes
        Plan(spacing=[1.5, 1.5, 10.0], patch_size=[48, 48, 4], strides=[[2, 2, 1]]),  # thick slices
        Plan(spacing=[1.0, 1.0], patch_size=[64, 64], strides=[[2, 2]]),  # 2D images
    ],
    ids=["3d", "thick", "2d"],
)
def test_spatial_augmentation_keeps_each_label_on_its_intensities(plan):
    region = crop_size(EVERY_SPATIAL_STEP, plan)
    sample = _blocks(region)
    steps = _random_steps(EVERY_SPATIAL_STEP, plan)
    steps.set_random_state(seed=0)
    moved = 0
    for _ in range(8):
        out = steps(sample)
        image, label = np.asarray(out["image"][0]), np.asarray(out["label"][0])
        assert image.shape == tuple(plan.patch_size)
        assert set(np.unique(label)) <= {0, 1, 2, 3}  # nearest-neighbour: no label between classes
        assert np.array_equal(label, np.round(label))
        for c in (1, 2, 3):
            inside = image[label == c]
            if inside.size < 20:
                continue
            # bilinear image against nearest label: only boundary voxels may disagree
            assert np.mean(np.abs(inside - 100 * c) < 30) > 0.85, c
        moved += not np.array_equal(label, np.asarray(sample["label"][0])[: label.shape[0], : label.shape[1]])
    assert moved > 0  # the patches did move


@pytest.mark.parametrize("slice_axis", [None, 2], ids=["3d-network", "2d-network"])
def test_thick_slices_never_rotate_out_of_their_plane(slice_axis):
    plan = Plan(spacing=[1.5, 1.5, 10.0], patch_size=[24, 24, 6], strides=[[2, 2, 1]], slice_axis=slice_axis)
    assert plan.in_plane_axes == [0, 1]
    aug = AugmentConfig(spatial_prob=1.0, rotate_degrees=45, blur_prob=1.0, lowres_prob=1.0)
    shape = crop_size(aug, plan)
    assert shape[2] == 6  # no room taken along the thick axis: nothing moves along it
    # every slice one value, all different: any mixing of slices shows
    values = 10.0 * (1 + torch.arange(shape[2], dtype=torch.float32))
    image = values.expand(1, *shape).clone()
    steps = mt.Compose([*spatial_steps(aug, plan, ["image"]), *intensity_steps(aug, plan)[3:]])
    steps.set_random_state(seed=1)
    for _ in range(5):
        out = np.asarray(steps({"image": image})["image"][0])
        for k, value in enumerate(values.tolist()):
            piece = out[:, :, k]
            assert piece.max() <= value + 0.05  # nothing from the brighter slices above
            assert np.median(piece) == pytest.approx(
                value, abs=0.5
            )  # nor from the darker ones (blur spreads the padding a little)


def test_rotation_is_about_the_thick_axis():
    plan = Plan(spacing=[1.5, 1.5, 10.0], patch_size=[24, 24, 4], strides=[[2, 2, 1]])
    (affine,) = spatial_steps(AugmentConfig(spatial_prob=1.0), plan, ["image", "label"])
    ranges = affine.rand_affine.rand_affine_grid
    assert ranges.rotate_range[:2] == ((0.0, 0.0), (0.0, 0.0)) or ranges.rotate_range[:2] == (0.0, 0.0)
    assert ranges.rotate_range[2] == pytest.approx(np.pi)  # 180 degrees in the slice plane
    assert ranges.scale_range[2] == (0.0, 0.0)


def test_low_resolution_coarsens_only_the_axes_asked():
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.normal(size=(1, 16, 16, 8)), dtype=torch.float32)
    step = RandLowResolutiond("image", axes=[0], prob=1.0, zoom_range=(0.5, 0.5))
    out = step({"image": image})["image"]
    assert out.shape == image.shape
    # along axis 0 (tensor dim 1), pairs of neighbours became one value: a smoother signal
    assert torch.diff(out, dim=1).abs().mean() < 0.8 * torch.diff(image, dim=1).abs().mean()
    # ...and exactly what coarsening axis 0 alone gives: the other axes keep their voxels
    coarse = torch.nn.functional.interpolate(image[None], size=(8, 16, 8), mode="nearest-exact")
    restored = torch.nn.functional.interpolate(coarse, size=(16, 16, 8), mode="trilinear")[0]
    torch.testing.assert_close(out, restored)


def test_elastic_deformation_is_refused_on_thick_slices():
    plan = Plan(spacing=[1.5, 1.5, 10.0], patch_size=[24, 24, 4], strides=[[2, 2, 1]])
    with pytest.raises(ConfigError, match="elastic"):
        spatial_steps(AugmentConfig(elastic_prob=0.2), plan, ["image", "label"])


def test_training_pipeline_with_every_augmentation_gives_patches_of_the_plan(tiny_dataset):
    from medseg.data.datasets import find_cases

    plan = Plan(spacing=[4.4, 4.4, 10.0], patch_size=[16, 16, 4], strides=[[2, 2, 1]], samples_per_volume=3)
    overrides = [
        "augment.spatial_prob=1",
        "augment.gamma_prob=1",
        "augment.blur_prob=1",
        "augment.contrast_prob=1",
        "augment.lowres_prob=1",
        "augment.flip_prob=0.5",
        "augment.flip_axes=[0]",
    ]
    pipeline = train_transforms(load_config(None, overrides), plan, num_classes=4)
    samples = pipeline(find_cases(tiny_dataset).training[0])
    assert len(samples) == 3
    for sample in samples:
        assert tuple(sample["image"].shape) == (1, 16, 16, 4)
        assert sample["label"].dtype in (torch.int64, torch.float32)
        assert set(torch.unique(sample["label"]).tolist()) <= {0, 1, 2, 3}
        assert torch.isfinite(sample["image"]).all()


@pytest.mark.parametrize("spacing", [[1.0, 1.0, 1.0], [1.0, 1.0]], ids=["3d", "2d"])
def test_elastic_deformation_moves_label_and_image_together(spacing):
    dims = len(spacing)
    plan = Plan(spacing=spacing, patch_size=[48] * dims, strides=[[2] * dims])
    steps = mt.Compose(
        spatial_steps(AugmentConfig(elastic_prob=1.0, spatial_prob=0.0), plan, ["image", "label"])
    )
    steps.set_random_state(seed=0)
    sample = _blocks(plan.patch_size)
    out = steps(sample)
    image, label = np.asarray(out["image"][0]), np.asarray(out["label"][0])
    assert set(np.unique(label)) <= {0, 1, 2, 3} and not np.array_equal(label, np.asarray(sample["label"][0]))
    for c in (1, 2, 3):
        assert np.mean(np.abs(image[label == c] - 100 * c) < 30) > 0.85


def _write_case(folder, image: np.ndarray, label: np.ndarray) -> dict:
    import SimpleITK as sitk

    case = {"id": "case"}
    for key, array in (("image", image.astype(np.float32)), ("label", label.astype(np.uint8))):
        path = folder / f"{key}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array.transpose())), str(path))
        case[key] = str(path)
    return case


def _patches(case: dict, plan: Plan, overrides: list[str], draws: int) -> list[dict]:
    """``draws`` training patches of one case, each drawn with its own seed, as SeededSamples does."""
    config = load_config(
        None, ["augment.flip_prob=0", "augment.intensity_prob=0", "augment.noise_prob=0", *overrides]
    )
    pipeline = train_transforms(config, plan, num_classes=2)
    patches = []
    for seed in range(draws):
        pipeline.set_random_state(seed=seed)
        patches += pipeline(case)
    return patches


def test_patches_move_over_a_volume_smaller_than_the_region_cut_for_rotation(tmp_path):
    # The left atrium's fault: a preprocessed volume between the patch and the enlarged region
    # was cut whole every time, and rotation took its centre: the same box again and again.
    rng = np.random.default_rng(0)
    image = rng.uniform(1.0, 2.0, size=(20, 20, 10))  # noise: every box looks different
    label = np.zeros((20, 20, 10))
    label[8:12, 8:12, 4:6] = 1
    case = _write_case(tmp_path, image, label)
    plan = Plan(spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 8], strides=[[2, 2, 2]], samples_per_volume=1)
    assert all(c > s for c, s in zip(crop_size(AugmentConfig(spatial_prob=0.5), plan), image.shape))
    # No rotation nor scaling, so a patch is the box the crop chose, resampled or not.
    patches = _patches(
        case, plan, ["augment.spatial_prob=0.5", "augment.rotate_degrees=0", "augment.scale_range=[1,1]"], 30
    )
    assert all(tuple(p["image"].shape) == (1, 16, 16, 8) for p in patches)
    distinct = {np.asarray(p["image"]).round(3).tobytes() for p in patches}
    assert len(distinct) >= 10


def test_a_share_of_patches_holds_foreground_over_many_draws(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.uniform(1.0, 2.0, size=(64, 64, 24))
    label = np.zeros((64, 64, 24))
    label[50:54, 6:10, 18:21] = 1  # 48 voxels in a corner: a random box rarely holds them
    case = _write_case(tmp_path, image, label)
    plan = Plan(spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 8], strides=[[2, 2, 2]], samples_per_volume=1)
    patches = _patches(case, plan, ["augment.spatial_prob=0.35"], 60)
    with_foreground = np.mean([bool((p["label"] == 1).any()) for p in patches])
    assert with_foreground >= 0.35  # class-balanced: half are centred on the foreground


def test_a_2d_plan_mirrors_only_within_the_slice():
    from medseg.data.transforms import flipped_axes

    plan = Plan(spacing=[1.5, 1.5, 10.0], patch_size=[32, 32, 1], strides=[[2, 2, 1]], slice_axis=2)
    assert flipped_axes(AugmentConfig(flip_prob=0.5), plan) == [0, 1]
    plan3d = Plan(spacing=[1.5, 1.5, 10.0], patch_size=[32, 32, 4], strides=[[2, 2, 1]])
    assert flipped_axes(AugmentConfig(flip_prob=0.5), plan3d) == [0, 1, 2]
