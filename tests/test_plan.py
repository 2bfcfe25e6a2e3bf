import numpy as np
import pytest

from medseg.config import load_config
from medseg.data.datasets import find_cases
from medseg.data.plan import Fingerprint, fingerprint, load_plan, make_plan, plan_for_config
from medseg.errors import ConfigError


def _fp(spacings, shapes, **kw):
    return Fingerprint(np.asarray(spacings, float), np.asarray(shapes, float), **kw)


def test_isotropic_data():
    plan = make_plan(_fp([[1.0, 1.0, 1.0]] * 5, [[200, 200, 200]] * 5))
    assert plan.spacing == [1.0, 1.0, 1.0]
    assert plan.strides == [[2, 2, 2]] * 3
    assert np.prod(plan.patch_size) <= 80 * 80 * 32
    assert all(p % 8 == 0 for p in plan.patch_size)
    assert max(plan.patch_size) - min(plan.patch_size) <= 8  # cube-like for cube-like data


def test_anisotropic_data_takes_a_finer_coarse_axis_and_pools_it_later():
    spacings = [[0.7, 0.7, 5.0]] * 4 + [[0.7, 0.7, 2.0]]
    plan = make_plan(_fp(spacings, [[512, 512, 40]] * 5))
    # median 5.0 is > 3x 0.7, so the coarse axis takes the 10th percentile of (2, 5, 5, 5, 5)
    assert plan.spacing == pytest.approx([0.7, 0.7, 3.2])
    # z (3.2 mm) is not pooled until in-plane spacing reaches half of it: 0.7 -> 1.4 -> 2.8
    assert plan.strides == [[2, 2, 1], [2, 2, 1], [2, 2, 2]]
    assert plan.patch_size[2] % 2 == 0 and plan.patch_size[0] % 8 == 0


def test_mild_anisotropy_keeps_the_median():
    plan = make_plan(_fp([[1.8, 1.8, 4.4], [1.8, 1.8, 4.6], [1.9, 1.9, 4.5]], [[96, 96, 28]] * 3))
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
        plan = make_plan(_fp(spacings, [[200, 200, 20]] * 10))
    assert plan.spacing == pytest.approx([1.0, 1.0, 4.0])
    assert "would resample the median case" in caplog.text


def test_the_coarse_axis_never_goes_finer_than_the_others():
    spacings = [[1.0, 6.0, 8.0]] * 4 + [[1.0, 6.0, 2.0]]
    plan = make_plan(_fp(spacings, [[100, 20, 20]] * 5))
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
