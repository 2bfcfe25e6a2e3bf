import pytest
import torch

from medseg.models import build_model


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_shapes_and_gradients(dims):
    net = build_model("unet", spatial_dims=dims, in_channels=2, out_channels=4, channels=(4, 8, 16))
    x = torch.randn(2, 2, *([16] * dims))
    y = net(x)
    assert y.shape == (2, 4, *([16] * dims))
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_anisotropic_strides():
    net = build_model("unet", 3, 1, 3, channels=(4, 8, 16), strides=[(2, 2, 1), 2])
    assert net.size_factor == (4, 4, 2)
    assert net(torch.randn(1, 1, 12, 12, 6)).shape == (1, 3, 12, 12, 6)


def test_size_error_names_a_size_that_fits():
    net = build_model("unet", 3, 1, 2, channels=(4, 8, 16))
    with pytest.raises(ValueError, match=r"multiple of \(4, 4, 4\); pad to \(20, 16, 8\)"):
        net(torch.randn(1, 1, 18, 16, 8))


def test_state_dict_round_trip():
    a = build_model("unet", 3, 1, 2, channels=(4, 8))
    b = build_model("unet", 3, 1, 2, channels=(4, 8))
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x))


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vnet'"):
        build_model("vnet", 3, 1, 2)
