import pytest
import torch

from medseg.device import autocast_dtype, resolve_device, use_channels_last, windows_per_forward
from medseg.errors import ConfigError
from medseg.models import build_model


def test_auto_device_on_this_machine():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda:0")


def test_precision_choices():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert autocast_dtype(cpu, "fp16") is torch.float16
    with pytest.raises(ConfigError, match="must be auto, fp32, bf16 or fp16"):
        autocast_dtype(cpu, "fp8")


def test_channels_last_where_it_pays():
    cpu = torch.device("cpu")
    batch_norm = build_model("unet", 3, 1, 2, channels=(4, 8))
    group_norm = build_model("residual_unet", 3, 1, 2, channels=(4, 8))
    assert use_channels_last(None, cpu, torch.bfloat16, batch_norm) is True
    assert use_channels_last(None, cpu, torch.bfloat16, group_norm) is False
    assert use_channels_last(None, cpu, None, batch_norm) is False
    assert use_channels_last(True, cpu, None, group_norm) is True
    gpu = torch.device("cuda")  # the rule only; no GPU is needed to ask it
    assert use_channels_last(None, gpu, torch.bfloat16, batch_norm) is True
    assert use_channels_last(None, gpu, torch.float16, group_norm) is False


def test_emulated_bf16_on_a_gpu_is_not_taken_for_native(monkeypatch):
    # A V100 or T4 runs bf16 only emulated, slower than fp16; torch counts it unless asked not to.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16


def test_windows_per_forward_follow_device_and_precision():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert windows_per_forward(None, cpu, torch.bfloat16) == 1
    assert windows_per_forward(None, cpu, None) == 2  # fp32: one window would hit torch's slow kernel
    assert windows_per_forward(None, gpu, torch.bfloat16) == 4
    assert windows_per_forward(3, cpu, None) == 3  # a set value wins
    with pytest.raises(ConfigError, match="infer.sw_batch_size"):
        windows_per_forward(0, cpu, None)
