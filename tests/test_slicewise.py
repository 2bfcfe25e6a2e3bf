"""2D networks on the slices of volumes: the wrapper, the plan that asks for one, and a run from
training to a mask on the input grid."""

import numpy as np
import pytest
import torch

from medseg.config import load_config
from medseg.data.plan import Plan
from medseg.models.factory import model_for_plan
from medseg.models.slicewise import SliceWise
from medseg.models.unet import UNet
from tests.conftest import TINY_OVERRIDES


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_slice_is_segmented_on_its_own(axis):
    torch.manual_seed(0)
    net = UNet(2, 1, 3, channels=(4, 8)).eval()
    wrapped = SliceWise(net, axis).eval()
    x = torch.randn(2, 1, 8, 16, 24)
    out = wrapped(x)
    assert out.shape == (2, 3, 8, 16, 24)
    for k in (0, x.shape[axis + 2] - 1):
        expected = net(x.select(axis + 2, k))
        torch.testing.assert_close(out.select(axis + 2, k), expected, atol=1e-5, rtol=1e-4)
    # a one-slice patch (training's) takes the same network, unfolded
    one = x.narrow(axis + 2, 3, 1)
    torch.testing.assert_close(wrapped(one), net(one.squeeze(axis + 2)).unsqueeze(axis + 2))
    torch.testing.assert_close(
        wrapped(one).select(axis + 2, 0), out.select(axis + 2, 3), atol=1e-5, rtol=1e-4
    )
    # a slice's logits do not depend on its neighbours
    changed = x.clone()
    changed.select(axis + 2, 1).normal_()
    torch.testing.assert_close(wrapped(changed).select(axis + 2, 0), out.select(axis + 2, 0))


def test_a_plan_with_a_slice_axis_builds_a_2d_network_that_never_pools_across_slices():
    plan = Plan(
        spacing=[1.5, 1.5, 10.0],
        patch_size=[32, 48, 1],
        strides=[[2, 2, 1], [2, 2, 1]],
        stem_stride=[2, 2, 1],
        slice_axis=2,
    )
    config = load_config(None, ["model.channels=[8, 16, 32]", "model.deep_supervision=true"])
    model = model_for_plan(config, plan, classes=4)
    assert isinstance(model, SliceWise) and model.net.spatial_dims == 2
    assert model.net.strides == [(2, 2), (2, 2)] and model.net.stem_stride == (2, 2)
    assert all(m.weight.ndim == 4 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    model.train()
    outputs = model(torch.randn(2, 1, 32, 48, 3))  # a slab of three slices: three 2D samples each
    # full resolution, and the coarse head one level below the stem (a quarter in-plane)
    assert [tuple(o.shape) for o in outputs] == [(2, 4, 32, 48, 3), (2, 4, 8, 12, 3)]


def test_a_2d_network_on_slices_trains_and_predicts_on_the_input_grid(tiny_dataset, tmp_path):
    from medseg.data.datasets import find_cases
    from medseg.inference.predictor import Predictor
    from medseg.io import read_volume, to_array
    from medseg.training.trainer import Trainer

    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.patch_size")]
    config = load_config(None, [*overrides, "model.dims=2", "train.iters_per_epoch=3"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "run")
    trainer = Trainer(config)
    assert trainer.plan.slice_axis == 2 and trainer.plan.patch_size[2] == 1
    summary = trainer.fit()
    predictor = Predictor(summary["last"])
    assert isinstance(predictor.model, SliceWise)
    case = find_cases(tiny_dataset).test[0]
    predictor.predict_file(case["image"], tmp_path / "mask.nii.gz")
    mask, image = read_volume(tmp_path / "mask.nii.gz"), read_volume(case["image"])
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == pytest.approx(image.GetSpacing())
    assert mask.GetDirection() == pytest.approx(image.GetDirection())
    assert set(np.unique(to_array(mask))) <= {0, 1, 2, 3}


def test_the_unet_on_slices_takes_batch_norm_unless_told_otherwise():
    plan = Plan(spacing=[1.5, 1.5, 10.0], patch_size=[32, 32, 1], strides=[[2, 2, 1]], slice_axis=2)

    def norms(model):
        return {
            type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
        }

    assert norms(model_for_plan(load_config(None, ["model.channels=[8, 16]"]), plan, 4)) == {"BatchNorm2d"}
    asked = load_config(None, ["model.channels=[8, 16]", "model.norm=instance"])
    assert norms(model_for_plan(asked, plan, 4)) == {"InstanceNorm2d"}
    # 2D images keep the 2D unet's instance norm: there a patch is most of one image
    flat = Plan(spacing=[1.0, 1.0], patch_size=[32, 32], strides=[[2, 2]])
    assert norms(model_for_plan(load_config(None, ["model.channels=[8, 16]"]), flat, 4)) == {"InstanceNorm2d"}
