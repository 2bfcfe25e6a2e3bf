"""Device and precision choices, shared by training and prediction."""

from __future__ import annotations

import torch
from torch import nn

from medseg.errors import ConfigError

__all__ = [
    "resolve_device",
    "autocast_dtype",
    "cpu_has_fast_bf16",
    "precision_name",
    "use_channels_last",
    "channels_last_format",
    "windows_per_forward",
    "patch_budget",
    "CPU_PATCH_VOXELS",
]

# A 3D patch two CPU cores train on in about 0.2 s a step with native bf16 (AVX512-BF16), about
# 0.6 s in fp32 on an AVX2-only CPU (docs/performance.md).
CPU_PATCH_VOXELS = 80 * 80 * 32
# Activations autograd keeps per patch voxel, per feature of the first level: the default unet keeps
# 483 bytes a voxel in fp32 and 248 in bf16 with 16 features, 1044 and 535 with 32 (summed with
# torch.autograd.graph.saved_tensors_hooks on the CPU; the tensors are the same on a GPU).
BYTES_PER_VOXEL_PER_FEATURE = {None: 33.0, torch.bfloat16: 17.0, torch.float16: 17.0}
GPU_MEMORY_SHARE = 0.5  # of the GPU's memory for activations; the rest for weights, optimiser, workspace


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("device", f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name} asked for, but this machine has no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("device", f"{name} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", "mps asked for, but it is not available here")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32.

    ``auto`` means bf16 on GPUs that support it (else fp16) and on CPUs with native bf16,
    fp32 elsewhere. ``fp16`` is honoured anywhere (the trainer scales its gradients), though
    on CPUs it is slower than bf16.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ConfigError("train.precision", f"must be auto, fp32, bf16 or fp16, not {precision!r}")
    if device.type == "cuda":
        # Emulated bf16 (V100, T4: before compute capability 8) runs, but slower than fp16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32``: how a run or a prediction computed, for its records."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")


def use_channels_last(
    setting: bool | None, device: torch.device, amp_dtype: torch.dtype | None, model: nn.Module
) -> bool:
    """Whether to run the model in channels-last memory layout.

    ``None`` (auto) says yes with mixed precision, on GPUs and CPUs alike, only for models
    without group or instance norm: convolutions gain from channels-last, but PyTorch's instance
    norm copies every channels-last input back to the standard layout on both devices (pytorch
    issue 59168, measured on nnU-Net), and on the CPU its group norm loses more than the
    convolutions gain (scripts/bench_models.py measures the CPU; the GPU is unmeasured).
    """
    if setting is not None:
        return setting
    if amp_dtype is None or device.type not in ("cpu", "cuda"):
        return False
    slow_norms = (nn.GroupNorm, nn.InstanceNorm2d, nn.InstanceNorm3d)
    return not any(isinstance(m, slow_norms) for m in model.modules())


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """The channels-last memory format for 2D or 3D tensors and models."""
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def patch_budget(
    device: torch.device,
    first_features: int,
    amp_dtype: torch.dtype | None,
    samples: int = 2,
    memory_bytes: int | None = None,
) -> int:
    """The voxels a training patch may hold on ``device`` (``data.max_patch_voxels: null``).

    On a GPU: half its memory (``memory_bytes``, default the device's) over the activations a
    voxel keeps for the backward pass, for ``samples`` patches a step. Elsewhere
    ``CPU_PATCH_VOXELS``, which is set by time, not memory. The planner never makes a patch
    larger than the median volume, so a large budget means whole volumes.

    Example:
        >>> patch_budget(torch.device("cuda"), 16, torch.bfloat16, memory_bytes=24 * 2**30)
        23685481
    """
    if device.type != "cuda":
        return CPU_PATCH_VOXELS
    if memory_bytes is None:
        memory_bytes = torch.cuda.get_device_properties(device).total_memory
    per_voxel = BYTES_PER_VOXEL_PER_FEATURE.get(amp_dtype, BYTES_PER_VOXEL_PER_FEATURE[None]) * first_features
    return max(CPU_PATCH_VOXELS, int(GPU_MEMORY_SHARE * memory_bytes / (per_voxel * samples)))


def windows_per_forward(setting: int | None, device: torch.device, amp_dtype: torch.dtype | None) -> int:
    """How many sliding windows go through the network in one forward pass.

    ``None`` (auto): 4 on GPUs. On CPUs, 1 under mixed precision and 2 in fp32, where torch
    sends single-sample 3D convolutions to a slow native kernel (docs/performance.md).
    """
    if setting is not None:
        if setting < 1:
            raise ConfigError("infer.sw_batch_size", f"must be at least 1, not {setting}")
        return setting
    if device.type == "cuda":
        return 4
    return 1 if amp_dtype is not None else 2
