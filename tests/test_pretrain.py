"""Diffusion-denoising pretraining: the schedule math, the objective, weight transfer, the CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from medseg.checkpoint import PRETRAIN, Checkpoint
from medseg.config import load_config
from medseg.data.datasets import find_cases
from medseg.errors import CheckpointError, ConfigError
from medseg.models import build_model
from medseg.models.factory import model_from_config
from medseg.models.slicewise import SliceWise
from medseg.training.pretrain import (
    Pretrainer,
    denoising_loss,
    noise_scheduler,
    sample_timesteps,
)
from medseg.training.transfer import load_matching, network_of
from tests.conftest import TINY_OVERRIDES, run_cli


def test_linear_schedule_matches_its_closed_form():
    abar = noise_scheduler(1000, "linear").alphas_cumprod
    betas = [1e-4 + (0.02 - 1e-4) * k / 999 for k in range(1000)]  # DDPM's linear betas
    assert torch.all(abar[1:] < abar[:-1]) and 0 < abar[-1] < 1e-4 < abar[0] < 1
    for t in (0, 499, 999):
        assert abar[t].item() == pytest.approx(math.prod(1 - b for b in betas[: t + 1]), rel=1e-4)


def test_cosine_schedule_matches_its_closed_form():
    abar = noise_scheduler(1000, "cosine").alphas_cumprod
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert torch.all(abar[1:] <= abar[:-1])


def test_an_unknown_schedule_is_named():
    with pytest.raises(ConfigError, match="pretrain.schedule.*must be linear or cosine, not 'sigmoid'"):
        noise_scheduler(1000, "sigmoid")


def test_noising_has_the_mean_and_variance_of_q():
    scheduler = noise_scheduler(1000, "linear")
    abar = scheduler.alphas_cumprod
    x0 = torch.full((20000, 1), 1.5)
    for step in (10, 250, 900):
        t = torch.full((20000,), step)
        xt = scheduler.add_noise(x0, torch.randn_like(x0), t)
        assert xt.mean().item() == pytest.approx(abar[step].sqrt().item() * 1.5, abs=0.03)
        assert xt.var().item() == pytest.approx(1 - abar[step].item(), abs=0.03)


def test_timestep_sampling():
    generator = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, 1000, "uniform", generator)
    low = sample_timesteps(20000, 1000, "low", generator)
    assert 0 <= uniform.min() and uniform.max() <= 999 and low.max() <= 999
    assert uniform.float().median().item() == pytest.approx(500, abs=25)
    assert low.float().median().item() == pytest.approx(250, abs=25)
    assert sample_timesteps(5, 1000, "fixed", fixed=100).tolist() == [100] * 5
    with pytest.raises(ConfigError, match=r"must lie in 0\.\.999"):
        sample_timesteps(5, 1000, "fixed", fixed=1000)
    with pytest.raises(ConfigError, match="must be uniform, low or fixed, not 'high'"):
        sample_timesteps(5, 1000, "high")


@pytest.mark.parametrize("name", ["unet", "residual_unet", "attention_unet"])
def test_one_step_lowers_the_denoising_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build_model(name, 3, 1, 1, channels=(8, 16), time_conditioning=True, norm="group")
    scheduler = noise_scheduler(1000, "linear")
    x0 = torch.randn(2, 1, 16, 16, 8)
    noise, t = torch.randn_like(x0), torch.tensor([100, 300])
    before = denoising_loss(model, x0, t, scheduler, noise)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = denoising_loss(model, x0, t, scheduler, noise)
    assert after.item() < before.item() - 1e-3


def _checkpoint(tmp_path, model, name="unet"):
    config = load_config(
        None, [f"model.name={name}", "model.channels=[8, 16]", "model.time_conditioning=true"]
    )
    plan = {"spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 8], "strides": [[2, 2, 2]], "channels": 1}
    checkpoint = Checkpoint(model.state_dict(), config.to_dict(), {0: "bg"}, plan, kind=PRETRAIN)
    return checkpoint.save(tmp_path / "pre.pt")


def test_transfer_loads_matching_weights_and_skips_the_head(tmp_path):
    torch.manual_seed(0)
    pretrained = build_model("unet", 3, 1, 1, channels=(8, 16), time_conditioning=True, stem_stride=[2, 2, 1])
    path = _checkpoint(tmp_path, pretrained)
    segmenter = build_model("unet", 3, 1, 4, channels=(8, 16), time_conditioning=True, stem_stride=[2, 2, 1])
    head_before = segmenter.head.weight.clone()
    result = load_matching(segmenter, path, "all")
    state, source = segmenter.state_dict(), pretrained.state_dict()
    heads = {k for k in state if k.startswith("head.")}
    assert heads and set(result.skipped) == heads
    assert set(result.loaded) == set(state) - heads
    for key in result.loaded:
        assert torch.equal(state[key], source[key]), key
    assert torch.equal(segmenter.head.weight, head_before)
    assert result.summary() == f"loaded {len(result.loaded)} tensors; kept {len(heads)} output head"

    encoder_only = build_model(
        "unet", 3, 1, 4, channels=(8, 16), time_conditioning=True, stem_stride=[2, 2, 1]
    )
    part = load_matching(encoder_only, path, "encoder")
    assert any(k.startswith("encoders.") for k in part.loaded)
    assert not any(k.startswith(("decoders.", "ups.")) for k in part.loaded)
    assert part.skipped["decoders.0.first.conv.weight"] == "not in the encoder"

    other = build_model("residual_unet", 3, 1, 4, channels=(32, 64))
    with pytest.raises(CheckpointError, match="holds no weights that fit this network"):
        load_matching(other, path)


def test_a_2d_network_on_slices_takes_its_pretrained_encoder(tmp_path):
    # ACDC's thick slices plan a 2D U-Net on slices: pretrained the same way, its encoder moves
    torch.manual_seed(0)
    pretrained = SliceWise(build_model("unet", 2, 1, 1, channels=(8, 16), time_conditioning=True), axis=2)
    path = _checkpoint(tmp_path, pretrained)
    segmenter = SliceWise(build_model("unet", 2, 1, 4, channels=(8, 16), time_conditioning=True), axis=2)
    part = load_matching(segmenter, path, "encoder")
    state, source = segmenter.state_dict(), pretrained.state_dict()
    assert any(k.startswith("net.encoders.") for k in part.loaded)
    assert not any(k.startswith(("net.decoders.", "net.head.")) for k in part.loaded)
    assert part.skipped["net.head.weight"] == "output head"
    for key in part.loaded:
        assert torch.equal(state[key], source[key]), key


def test_a_fixed_noise_level_is_where_segmentation_runs(tiny_dataset, tmp_path):
    """DDeP-style pretraining at one timestep: the checkpoint records it, fine-tuning takes it,
    and the segmenting network runs at it when given no timestep."""
    config = load_config(None, [*TINY_OVERRIDES, "pretrain.timesteps=fixed", "model.timestep=150"])
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "pre")
    Pretrainer(config).fit()
    saved = Checkpoint.load(tmp_path / "pre" / "last.pt")
    assert saved.config["model"]["timestep"] == 150
    resolved, _ = network_of(tmp_path / "pre" / "last.pt", load_config(None, TINY_OVERRIDES))
    assert resolved.model.timestep == 150 and resolved.model.time_conditioning is True
    assert model_from_config(resolved, 4).timestep == 150

    drawn = load_config(None, [*TINY_OVERRIDES, "model.timestep=150"])  # low: t varies, segment at 0
    drawn.data.root, drawn.train.output_dir = str(tiny_dataset), str(tmp_path / "low")
    Pretrainer(drawn).fit()
    assert Checkpoint.load(tmp_path / "low" / "last.pt").config["model"]["timestep"] == 0


def test_unlabelled_images_are_found(tiny_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    (root / "imagesUn").mkdir()
    shutil.copy(root / "imagesTs" / "heart_003.nii.gz", root / "imagesUn" / "extra.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["unlabeled"] = ["./imagesTs/heart_004.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    dataset = find_cases(root, need_labels=False)
    assert [c["id"] for c in dataset.unlabeled] == ["heart_004", "extra"]
    assert len(dataset.all_images) == len(dataset.training) + len(dataset.test) + 2


def test_pretraining_resumes(tiny_dataset, tmp_path):
    config = load_config(None, TINY_OVERRIDES)
    config.data.root, config.train.output_dir = str(tiny_dataset), str(tmp_path / "pre")
    first = Pretrainer(config).fit()
    assert first["steps"] == 2
    assert (tmp_path / "pre" / "denoising.png").stat().st_size > 5000
    again = Pretrainer.resume(tmp_path / "pre", ["train.epochs=2"]).fit()
    assert again["steps"] == 4 and again["epochs"] == 2
    payload = torch.load(tmp_path / "pre" / "last.pt", weights_only=True)
    assert payload["kind"] == "pretrain" and payload["config"]["model"]["time_conditioning"] is True
    assert payload["model"]["head.weight"].shape[0] == 1  # one noise channel per image channel


def test_pretrain_then_train_init_then_predict_from_the_cli(tiny_dataset, tmp_path):
    overrides = [arg for o in TINY_OVERRIDES for arg in ("--set", o.replace(" ", ""))]
    pre = tmp_path / "pre"
    proc = run_cli("pretrain", "--data", str(tiny_dataset), "--output", str(pre), *overrides)
    assert proc.returncode == 0, proc.stderr
    assert f"fine-tune with: medseg train --init {pre / 'last.pt'}" in proc.stdout
    assert (pre / "denoising.png").is_file()

    seg = tmp_path / "seg"
    proc = run_cli(
        "train", "--data", str(tiny_dataset), "--output", str(seg), "--init", str(pre / "last.pt"), *overrides
    )
    assert proc.returncode == 0, proc.stderr
    assert "started from" in proc.stdout + proc.stderr and "2 output head" in proc.stdout + proc.stderr
    saved = torch.load(seg / "best.pt", weights_only=True)
    assert saved["config"]["model"]["time_conditioning"] is True and saved["kind"] == "segmentation"
    assert saved["config"]["train"]["init"] == str(pre / "last.pt")

    masks = tmp_path / "masks"
    proc = run_cli(
        "predict", "-m", str(seg / "best.pt"), "-i", str(tiny_dataset / "imagesTs"), "-o", str(masks)
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in masks.glob("*.nii.gz")) == ["heart_003.nii.gz", "heart_004.nii.gz"]

    proc = run_cli(
        "predict", "-m", str(pre / "last.pt"), "-i", str(tiny_dataset / "imagesTs"), "-o", str(tmp_path / "x")
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {pre / 'last.pt'}: is a pretraining checkpoint (it predicts noise, not labels): "
        "fine-tune it first with medseg train --init"
    )
