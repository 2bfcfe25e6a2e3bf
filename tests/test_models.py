import pytest
import torch

from medseg.models import MODELS, build_model
from medseg.models.blocks import timestep_embedding

ALL = [(name, dims) for name in MODELS for dims in (2, 3)]
SMALL = {"channels": (8, 16, 32)}


def _input(dims, batch=2, size=16):
    return torch.randn(batch, 2, *([size] * dims))


def _scramble(net):
    """Give every weight a random value, so that zero-initialised layers play a part too."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


@pytest.mark.parametrize(("name", "dims"), ALL)
def test_output_shape(name, dims):
    net = build_model(name, dims, 2, 4, **SMALL)
    assert net(_input(dims)).shape == (2, 4, *([16] * dims))


@pytest.mark.parametrize(("name", "dims"), ALL)
def test_gradient_reaches_every_parameter(name, dims):
    """Zero-initialised layers (last conv of a residual branch, FiLM, attention output) hold
    gradients back for a step or two by design; by the third step every parameter must learn."""
    net = build_model(name, dims, 2, 4, deep_supervision=True, time_conditioning=True, **SMALL)
    optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
    x, t = _input(dims), torch.tensor([3, 700])
    for _ in range(3):
        optimiser.zero_grad()
        sum(out.square().mean() for out in net(x, t)).backward()
        optimiser.step()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


@pytest.mark.parametrize(("name", "dims"), ALL)
def test_timestep_matters_only_with_time_conditioning(name, dims):
    x = _input(dims)
    for conditioned in (True, False):
        net = _scramble(build_model(name, dims, 2, 3, time_conditioning=conditioned, **SMALL)).eval()
        with torch.no_grad():
            early, late = net(x, torch.tensor([1, 1])), net(x, torch.tensor([900, 900]))
        assert (early - late).abs().max().item() > 1e-3 if conditioned else torch.equal(early, late)
        with torch.no_grad():
            assert torch.equal(net(x), net(x, None))


@pytest.mark.parametrize(("name", "dims"), ALL)
def test_deep_supervision_heads(name, dims):
    net = build_model(name, dims, 2, 4, channels=(8, 16, 32, 64), deep_supervision=True)
    outputs = net(_input(dims))
    assert [tuple(o.shape[2:]) for o in outputs] == [(16,) * dims, (8,) * dims, (4,) * dims]
    assert all(o.shape[:2] == (2, 4) for o in outputs)
    net.eval()
    assert net(_input(dims)).shape == (2, 4, *([16] * dims))  # one output at inference


@pytest.mark.parametrize("name", list(MODELS))
def test_anisotropic_strides(name):
    net = build_model(name, 3, 1, 3, channels=(4, 8, 16), strides=[(2, 2, 1), 2])
    assert net.size_factor == (4, 4, 2)
    assert net(torch.randn(1, 1, 12, 12, 6)).shape == (1, 3, 12, 12, 6)


@pytest.mark.parametrize(("name", "dims"), ALL)
def test_state_dict_round_trip(name, dims):
    a = _scramble(build_model(name, dims, 2, 2, **SMALL)).eval()
    b = build_model(name, dims, 2, 2, **SMALL).eval()
    b.load_state_dict(a.state_dict())
    x = _input(dims, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_size_error_names_a_size_that_fits(name):
    net = build_model(name, 3, 1, 2, channels=(4, 8, 16))
    with pytest.raises(ValueError, match=r"multiple of \(4, 4, 4\); pad to \(20, 16, 8\)"):
        net(torch.randn(1, 1, 18, 16, 8))


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_every_norm(norm):
    for name in MODELS:
        assert build_model(name, 2, 1, 2, channels=(8, 16), norm=norm)(torch.randn(2, 1, 8, 8)).shape == (
            2,
            2,
            8,
            8,
        )


def test_attention_only_at_low_resolution():
    net = build_model("attention_unet", 3, 1, 2, channels=(8, 16, 32))
    assert net.attention_levels == (2,)
    with pytest.raises(ValueError, match="full resolution"):
        build_model("attention_unet", 3, 1, 2, channels=(8, 16, 32), attention_levels=[0, 2])


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown model 'vnet'"):
        build_model("vnet", 3, 1, 2)
    with pytest.raises(ValueError, match="unet takes no option heads"):
        build_model("unet", 3, 1, 2, heads=2)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(emb[1, 0], torch.sin(torch.tensor(1.0)))


@pytest.mark.parametrize(("name", "dims"), ALL)
def test_strided_stem(name, dims):
    stem = (2, 2, 1) if dims == 3 else 2
    net = build_model(name, dims, 2, 4, channels=(8, 16), strides=[2], stem_stride=stem)
    assert net.size_factor == ((4, 4, 2) if dims == 3 else (4, 4))
    x = _input(dims, size=8)
    assert net(x).shape == (2, 4, *([8] * dims))
    # No level runs at full resolution: the stem is the only conv the image meets there, before
    # the refinement at the end, which sees the image itself beside the up-sampled features.
    stem_conv = net.stem.conv if name == "unet" else net.stem
    refine_conv = net.refine.conv if name == "unet" else net.refine
    assert stem_conv.stride == ((2, 2, 1) if dims == 3 else (2, 2))
    assert refine_conv.in_channels == 8 + 2
    # The refinement sees the image itself, voxel for voxel, beside the up-sampled features.
    seen = []
    net.refine.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    net(x)
    assert torch.equal(seen[0][:, -2:], x)
    with pytest.raises(ValueError, match="multiple of"):
        net(_input(dims, size=6))


@pytest.mark.parametrize(
    "name,norm",
    [("unet", "batch"), ("unet", "instance"), ("residual_unet", "group"), ("attention_unet", "group")],
)
def test_folding_the_time_embedding_keeps_the_outputs(name, norm):
    torch.manual_seed(0)
    model = build_model(name, 3, 1, 4, channels=(8, 16, 32), time_conditioning=True, norm=norm)
    with torch.no_grad():  # as after training: FiLM, norms and zero-initialised convs all moved
        for module in model.modules():
            if (
                isinstance(module, torch.nn.Linear)
                or getattr(module, "weight", None) is not None
                and (module.weight.abs().sum() == 0)
            ):
                torch.nn.init.normal_(module.weight, std=0.05)
                torch.nn.init.normal_(module.bias, std=0.05)
            if isinstance(module, (torch.nn.BatchNorm3d, torch.nn.GroupNorm, torch.nn.InstanceNorm3d)):
                module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    model.eval()
    model.timestep = 100  # as after a fixed-noise pretraining: segmentation runs at t = 100
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        before = model(x)
        assert torch.equal(before, model(x, torch.tensor([100, 100])))
        assert not torch.allclose(before, model(x, torch.tensor([0, 0])), atol=1e-3)
        model.fold_time()
        after = model(x)
    assert model.time_embed is None
    assert not any(getattr(m, "film", None) is not None for m in model.modules())
    assert (before - before.mean()).abs().max() > 1e-2  # the FiLM layers did something to fold
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
