"""An exported network (ONNX) run by OpenVINO or ONNX Runtime, behind the ``nn.Module`` face the
sliding window calls, so an exported model predicts through the same code as a checkpoint.

OpenVINO is the default where it is installed: on a CPU it runs the demo's windows at about twice
the speed of torch with bf16 autocast, ONNX Runtime at under half (docs/deploy.md). Each takes
torch's thread count, so ``--threads`` holds for both.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.errors import ConfigError

__all__ = ["RUNTIMES", "RuntimeNetwork", "runtime_of", "is_runtime_network", "available_runtime"]

RUNTIMES = ("auto", "openvino", "onnxruntime")
_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}

log = logging.getLogger(__name__)


def available_runtime(name: str = "auto") -> str:
    """The runtime ``name`` asks for, checked to be installed: ``auto`` is OpenVINO where it
    is installed, else ONNX Runtime.

    Raises:
        ConfigError: an unknown name, or the runtime is not installed.
    """
    if name not in RUNTIMES:
        raise ConfigError("--runtime", f"must be {', '.join(RUNTIMES)}, not {name!r}")
    wanted = ["openvino", "onnxruntime"] if name == "auto" else [name]
    for runtime in wanted:
        try:
            __import__(_PACKAGES[runtime])
            return runtime
        except ImportError:
            continue
    raise ConfigError(
        "--runtime",
        f'{" or ".join(wanted)} is not installed; an exported model needs one: pip install "medseg[deploy]"',
    )


class RuntimeNetwork(nn.Module):
    """Logits of an ONNX network for a batch of windows, computed by OpenVINO or ONNX Runtime.

    Call ``prepare`` once with the precision the predictor resolved before the first forward.

    Args:
        path: the ``.onnx`` file, or an int8 network's OpenVINO IR ``.xml`` (OpenVINO only);
            its input: ``(N, C, *window)``, N free.
        runtime: ``auto``, ``openvino`` or ``onnxruntime``.
    """

    def __init__(self, path: str | Path, runtime: str = "auto"):
        super().__init__()
        self.path = Path(path)
        self.int8 = self.path.suffix == ".xml"
        if self.int8 and runtime == "onnxruntime":
            raise ConfigError("--runtime", "an int8 model (OpenVINO IR) runs in OpenVINO, not ONNX Runtime")
        self.runtime = available_runtime("openvino" if self.int8 else runtime)
        self.precision = "fp32"
        self.seen: list | None = None  # a list to collect the windows fed (int8 calibration)
        # Where the sliding window looks for the device; the network itself is not torch's.
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        self._run = None

    def fold_time(self, t: float | None = None) -> None:
        """Nothing to do: the timestep was folded into the weights before export."""

    def prepare(self, amp_dtype: torch.dtype | None) -> str:
        """Compile for the CPU: bf16 where the predictor would autocast to it (OpenVINO only),
        else fp32. Returns the precision it runs in."""
        threads = torch.get_num_threads()
        if "OMP_WAIT_POLICY" not in os.environ:  # medseg predict sets it; a Python caller may not
            log.info(
                "torch's OpenMP threads spin between the windows and slow the exported network "
                "(medseg predict took 0.88x the time with them asleep): set OMP_WAIT_POLICY=PASSIVE "
                "before importing torch"
            )
        if self.runtime == "openvino":
            self.precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
            self._run = _openvino(self.path, self.precision, threads)
            if self.int8:
                self.precision = f"int8+{self.precision}"  # what int8 leaves out runs in that
        else:
            self.precision = "fp32"  # ONNX Runtime's CPU kernels have no bf16 convolutions
            self._run = _onnxruntime(self.path, threads)
        return self.precision

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if self._run is None:
            self.prepare(None)
        window = np.ascontiguousarray(x.detach().float().cpu().numpy())
        if self.seen is not None:
            self.seen.append(window.copy())
        return torch.from_numpy(self._run(window))


def runtime_of(model: nn.Module) -> RuntimeNetwork | None:
    """A predictor network's exported part (itself, or inside a ``SliceWise``), or None."""
    for candidate in (model, getattr(model, "net", None)):
        if isinstance(candidate, RuntimeNetwork):
            return candidate
    return None


def is_runtime_network(model: nn.Module) -> bool:
    """Whether a predictor's network is an exported one."""
    return runtime_of(model) is not None


def _openvino(path: Path, precision: str, threads: int):
    import openvino as ov  # its runtime alone: the converter, which holds the (opt-in) telemetry, is not used

    hints = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    compiled = ov.Core().compile_model(str(path), "CPU", {**hints, "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(window: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: window})[output], dtype=np.float32)

    return run


def _onnxruntime(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(window: np.ndarray) -> np.ndarray:
        return session.run(None, {name: window})[0].astype(np.float32, copy=False)

    return run
