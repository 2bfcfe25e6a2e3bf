import numpy as np
import pytest

from medseg.config import load_config
from medseg.data.datasets import find_cases
from medseg.data.plan import Fingerprint, fingerprint, load_plan, make_plan, plan_for_config
from medseg.errors import ConfigError


def _fp(spacings, shapes, **kw):
    return Fingerprint(np.asarray(spacings, float), np.asarray(shapes, float), **kw)


def test_isotropic_data():
    plan = make_plan(_fp([[1.0, 1.0, 1.0]] * 5, [[56, 56, 56]] * 5))
    assert plan.spacing == [1.0, 1.0, 1.0]  # the budget holds the whole median volume
    assert plan.slice_axis is None and plan.network_dims == 3
    assert plan.strides == [[2, 2, 2]] * 3
    assert plan.patch_size == [56, 56, 56]  # the whole volume, in units of the pooling (8)


def test_the_patch_is_whole_pooling_units_so_long_axes_pool_at_every_level():
    # a strided stem and three levels pool 4 times: a unit is 16 voxels
    plan = make_plan(_fp([[1.0] * 3] * 3, [[70, 60, 50]] * 3), stem=True)
    assert plan.median_shape == [70, 60, 50]
    # 60 rounds to 64, not down to 48 (shrinking the median to the budget, then flooring to 16)
    assert plan.patch_size == [64, 64, 48]
    assert plan.stem_stride == [2, 2, 2] and plan.strides == [[2, 2, 2], [2, 2, 2], [2, 2, 1]]


def test_anisotropic_data_takes_a_finer_coarse_axis_and_pools_it_later():
    spacings = [[0.7, 0.7, 5.0]] * 4 + [[0.7, 0.7, 2.0]]
    plan = make_plan(_fp(spacings, [[512, 512, 40]] * 5), dims=3)
    # median 5.0 is > 3x 0.7, so the coarse axis takes the 10th percentile of (2, 5, 5, 5, 5)
    assert plan.spacing == pytest.approx([0.7, 0.7, 3.2])
    # z (3.2 mm) is not pooled until in-plane spacing reaches half of it: 0.7 -> 1.4 -> 2.8
    assert plan.strides == [[2, 2, 1], [2, 2, 1], [2, 2, 2]]
    assert plan.patch_size[2] % 2 == 0 and plan.patch_size[0] % 8 == 0


def test_mild_anisotropy_keeps_the_median():
    plan = make_plan(_fp([[1.8, 1.8, 4.4], [1.8, 1.8, 4.6], [1.9, 1.9, 4.5]], [[80, 80, 24]] * 3))
    assert plan.spacing == pytest.approx([1.8, 1.8, 4.5])
    assert plan.strides[0] == [2, 2, 1]


def test_tiny_volumes_never_pool_below_four_voxels():
    plan = make_plan(_fp([[1.0, 1.0, 1.0]] * 3, [[12, 10, 6]] * 3))
    assert plan.patch_size == [12, 10, 6]
    assert plan.strides == [[2, 2, 1], [1, 1, 1], [1, 1, 1]]


def test_ct_normalisation_from_foreground():
    foreground = np.concatenate([np.full(990, 40.0), np.full(5, -1000.0), np.full(5, 3000.0)])
    plan = make_plan(_fp([[1.0] * 3] * 2, [[64] * 3] * 2, modality="CT", foreground=foreground))
    assert plan.normalization == "ct"
    assert plan.clip[0] > -1000 and plan.clip[1] < 3000  # outliers clipped
    assert plan.mean == pytest.approx(40.0, abs=30)
    assert "CT: clip to" in plan.describe()


def test_sample_data_plan_and_round_trip(tiny_dataset, tmp_path):
    fp = fingerprint(find_cases(tiny_dataset))
    np.testing.assert_allclose(fp.spacings, [[4.4, 4.4, 10.0]] * 3, atol=1e-4)  # RAS order, any grid
    plan = make_plan(fp)
    plan.save(tmp_path / "plan.yaml")
    assert load_plan(tmp_path / "plan.yaml") == plan
    assert "target spacing    4.4 x 4.4 x 10 mm" in plan.describe()


def test_config_values_win_and_are_checked(tiny_dataset):
    dataset = find_cases(tiny_dataset)
    config = load_config(None, ["data.patch_size=[32, 32, 8]", "model.channels=[8, 16, 32]"])
    plan = plan_for_config(config, dataset)
    assert plan.patch_size == [32, 32, 8]
    assert config.model.strides is None  # the config keeps what was asked; the plan resolves it
    # The pooling includes the strided stem (2, 2, 1).
    with pytest.raises(ConfigError, match=r"not divisible by the pooling \(8, 8, 2\); try \[32, 32, 8\]"):
        plan_for_config(
            load_config(None, ["data.patch_size=[33, 32, 9]", "model.channels=[8, 16, 32]"]), dataset
        )


def test_a_minority_of_thin_slices_does_not_upsample_every_case(caplog):
    # Two 1 mm cases among eight 8 mm ones: the 10th percentile (1 mm) would resample the median
    # case 8x finer; the plan stops at half the median and says so.
    spacings = [[1.0, 1.0, 8.0]] * 8 + [[1.0, 1.0, 1.0]] * 2
    with caplog.at_level("WARNING", logger="medseg.data.plan"):
        plan = make_plan(_fp(spacings, [[200, 200, 20]] * 10), dims=3)
    assert plan.spacing == pytest.approx([1.0, 1.0, 4.0])
    assert "would resample the median case" in caplog.text


def test_the_coarse_axis_never_goes_finer_than_the_others():
    spacings = [[1.0, 6.0, 8.0]] * 4 + [[1.0, 6.0, 2.0]]
    plan = make_plan(_fp(spacings, [[100, 20, 20]] * 5), dims=3)
    assert plan.spacing == pytest.approx([1.0, 6.0, 6.0])


def test_a_tiny_patch_budget_is_a_config_error_not_an_endless_loop():
    with pytest.raises(ConfigError, match="max_patch_voxels: 10 is too small"):
        make_plan(_fp([[1.0] * 3] * 2, [[64] * 3] * 2), max_patch_voxels=10)


def test_the_stem_is_planned_as_the_first_down_sampling():
    fp = _fp([[1.8, 1.8, 4.5]] * 3, [[96, 96, 28]] * 3)
    plan = make_plan(fp, levels=4, stem=True)
    assert plan.stem_stride == [2, 2, 1]  # 4.5 mm slices are not pooled at first
    assert len(plan.strides) == 3
    assert plan.size_factor == [16, 16, 4]
    assert all(p % f == 0 for p, f in zip(plan.patch_size, plan.size_factor))
    assert "after a stem of 2x2x1" in plan.describe()
    assert make_plan(fp, levels=4).stem_stride is None


def test_every_model_plans_a_stem_unless_asked_for_full(tiny_dataset):
    dataset = find_cases(tiny_dataset)
    for name in ("unet", "residual_unet", "attention_unet"):
        assert plan_for_config(load_config(None, [f"model.name={name}"]), dataset).stem_stride == [2, 2, 1]
        full = load_config(None, [f"model.name={name}", "model.stem=full"])
        assert plan_for_config(full, dataset).stem_stride is None
    with pytest.raises(ConfigError, match="model.stem"):
        plan_for_config(load_config(None, ["model.stem=wide"]), dataset)


def test_strides_as_written_in_the_docs_are_accepted(tiny_dataset):
    config = load_config(None, ["model.strides=[[2, 2, 1], 2]", "model.channels=[8, 16, 32]"])
    assert config.model.strides == [[2, 2, 1], 2]
    plan = plan_for_config(config, find_cases(tiny_dataset))
    assert plan.strides == [[2, 2, 1], [2, 2, 2]]
    with pytest.raises(ConfigError, match="model.strides"):
        load_config(None, ["model.strides=[[2, 2, 1], two]"])


def test_acdc_like_thick_slices_get_a_2d_network_on_slices():
    # cine MRI as ACDC: 1.5 mm in-plane, 10 mm between 6-18 slices
    spacings = [[1.5, 1.5, 10.0]] * 6
    shapes = [[216, 256, 9], [154, 154, 6], [428, 512, 18], [232, 256, 10], [216, 256, 8], [224, 224, 9]]
    plan = make_plan(_fp(spacings, shapes), stem=True)
    assert plan.slice_axis == 2 and plan.network_dims == 2
    assert plan.spacing == [1.5, 1.5, 10.0]  # slices are not interpolated for a 2D network
    # one median slice (216 x 256), rounded to the nearest 16 (what four poolings by 2 divide)
    assert plan.patch_size == [224, 256, 1]
    assert all(s[2] == 1 for s in [*plan.strides, plan.stem_stride])  # never pooled across slices
    # two 3D patches' worth of slices a step, one from each of 12 cases: 2 * 204800 / (0.6 * 224 * 256)
    assert (plan.batch_size, plan.samples_per_volume) == (12, 1)
    assert "2D, on slices across axis 2" in plan.describe()
    assert plan.in_plane_axes == [0, 1]
    # a CPU training in fp32 pays twice as much per pixel: half the slices, twice the steps
    assert make_plan(_fp(spacings, shapes), stem=True, slice_cost=1.2).patches_per_step == 6


def test_the_slice_count_follows_the_precision_the_run_trains_in(tmp_path):
    import SimpleITK as sitk

    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    for k, shape in enumerate([(216, 256, 9), (232, 256, 10), (224, 224, 9)]):
        image = sitk.Image(list(shape), sitk.sitkInt16)
        image.SetSpacing((1.5, 1.5, 10.0))
        for sub in ("images", "labels"):
            sitk.WriteImage(image, str(tmp_path / sub / f"c{k}.nii.gz"))
    dataset = find_cases(tmp_path)
    slices = {
        precision: plan_for_config(
            load_config(None, ["data.modality=MRI", "train.device=cpu", f"train.precision={precision}"]),
            dataset,
        ).patches_per_step
        for precision in ("fp32", "bf16")
    }
    assert slices == {"fp32": 6, "bf16": 12}


def test_a_3d_network_can_be_asked_for_on_thick_slices():
    plan = make_plan(_fp([[1.5, 1.5, 10.0]] * 3, [[216, 256, 9]] * 3), dims=3)
    assert plan.slice_axis is None and plan.spacing == [1.5, 1.5, 10.0]
    assert plan.in_plane_axes == [0, 1]  # augmentation still stays within the slices
    assert plan.strides[0] == [2, 2, 1]  # in-plane pooling first


def test_la_like_volumes_are_coarsened_until_a_patch_sees_the_median_volume():
    # 3D LGE MRI as the LA challenge: 0.625 mm isotropic, about 192 x 142 x 88 voxels
    shapes = [[192, 142, 88], [148, 132, 88], [244, 160, 88], [200, 150, 88], [180, 140, 88]]
    plan = make_plan(_fp([[0.625] * 3] * 5, shapes))
    assert plan.slice_axis is None
    # covering 192 x 142 x 88 in 204,800 voxels needs 0.625 x 2.4 mm: the 2x limit holds it at 1.25 mm
    assert plan.spacing == [1.25, 1.25, 1.25]
    assert plan.median_shape == [96, 71, 44]
    assert plan.patch_size == [64, 64, 48] and np.prod(plan.patch_size) <= 80 * 80 * 32
    # a volume the budget nearly holds is coarsened only as far as it must be
    small = make_plan(_fp([[0.625] * 3] * 3, [[120, 100, 60]] * 3))
    assert small.spacing == pytest.approx([0.625 * (120 * 100 * 60 / 204800) ** (1 / 3)] * 3, abs=1e-4)


def test_model_dims_must_be_2_or_3():
    with pytest.raises(ConfigError, match="model.dims"):
        make_plan(_fp([[1.0] * 3] * 2, [[64] * 3] * 2), dims=4)


def test_on_a_gpu_the_patch_budget_follows_its_memory():
    import torch

    from medseg.device import CPU_PATCH_VOXELS, patch_budget

    cuda = torch.device("cuda")
    assert patch_budget(torch.device("cpu"), 16, torch.bfloat16) == CPU_PATCH_VOXELS
    # half of 24 GiB over 17 bytes x 16 features a voxel, for 2 patches
    assert patch_budget(cuda, 16, torch.bfloat16, memory_bytes=24 * 2**30) == 23685481
    # fp32 keeps twice the bytes; twice the features, twice again; more patches, less each
    small = patch_budget(cuda, 32, None, samples=4, memory_bytes=8 * 2**30)
    assert small == int(0.5 * 8 * 2**30 / (33 * 32 * 4))
    assert patch_budget(cuda, 16, None, memory_bytes=2**28) == CPU_PATCH_VOXELS  # never below the CPU's
    # the LA-like volumes fit whole in a 24 GiB budget: no coarsening, the median volume as patch
    shapes = [[192, 142, 88], [148, 132, 88], [244, 160, 88]]
    plan = make_plan(_fp([[0.625] * 3] * 3, shapes), max_patch_voxels=23685481)
    assert plan.spacing == [0.625] * 3 and plan.patch_size == [192, 144, 88]


def _ct_like(folder, name):
    """A phantom shifted into Hounsfield-like values: air at offset - 1000 around the body."""
    import SimpleITK as sitk

    from medseg.data.phantom import make_phantom

    image, label = make_phantom(0, shape=(24, 24, 8))
    array = sitk.GetArrayFromImage(image).astype(np.int16)
    body = array > np.percentile(array, 40)
    ct = sitk.GetImageFromArray(np.where(body, array // 10, -1000).astype(np.int16))
    ct.CopyInformation(image)
    for sub, volume in (("images", ct), ("labels", label)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume, str(folder / sub / f"{name}.nii.gz"))


def test_ct_without_metadata_is_found_and_said(tiny_dataset, tmp_path, caplog):
    from medseg.data.plan import resolve_modality

    _ct_like(tmp_path / "ct", "a")  # plain images/ + labels/: no dataset.json to say CT
    dataset = find_cases(tmp_path / "ct")
    assert dataset.modality is None
    assert resolve_modality(None, dataset) == "CT"
    assert "holds values down to -1000, as CT's Hounsfield units do" in caplog.text
    assert "normalised as CT; pass --modality if that is wrong" in caplog.text
    plan = plan_for_config(load_config(None, []), dataset)
    assert plan.normalization == "ct" and plan.modality == "CT"
    caplog.clear()
    assert resolve_modality("mri", dataset) == "MRI" and caplog.text == ""  # what the user says wins
    # an MRI folder without a modality is taken for MRI, and the log says so
    (tmp_path / "mr").mkdir()
    for sub in ("images", "labels"):
        (tmp_path / "mr" / sub).mkdir()
        for f in sorted((tiny_dataset / f"{sub}Tr").iterdir()):
            (tmp_path / "mr" / sub / f.name).write_bytes(f.read_bytes())
    assert resolve_modality(None, find_cases(tmp_path / "mr")) == "MRI"
    assert "none of the first 3 images holds values below -500" in caplog.text


def test_a_dicom_series_says_its_modality(tiny_dataset, tmp_path, caplog):
    import SimpleITK as sitk

    from medseg.data.datasets import Cases
    from medseg.data.plan import resolve_modality
    from tests.conftest import write_dicom_series

    # values an MRI could hold, but the header says CT: the header wins
    image = sitk.ReadImage(str(sorted((tiny_dataset / "imagesTr").iterdir())[0]))
    series = write_dicom_series(image, tmp_path / "s", modality="CT")
    assert resolve_modality(None, Cases([{"image": str(series), "label": None}])) == "CT"
    assert "is a DICOM CT series" in caplog.text


@pytest.mark.parametrize(("key", "value"), [("data.spacing", "[1, 1]"), ("data.patch_size", "[32, 32]")])
def test_a_fixed_spacing_or_patch_needs_one_value_per_axis(tiny_dataset, key, value):
    from medseg.errors import ConfigError

    config = load_config(None, [f"{key}={value}", "data.modality=MRI"])
    with pytest.raises(ConfigError, match=f"{key}: has 2 values; the images have 3 axes"):
        plan_for_config(config, find_cases(tiny_dataset))


def test_a_modality_medseg_does_not_know_is_named_in_a_warning(tiny_dataset, caplog):
    from medseg.data.plan import resolve_modality

    cases = find_cases(tiny_dataset)
    assert resolve_modality("cineMRI", cases) == "MRI" and resolve_modality("ct", cases) == "CT"
    assert not caplog.records
    assert resolve_modality("pet", cases) == "PET"
    assert "'pet' is neither CT nor MRI" in caplog.text
