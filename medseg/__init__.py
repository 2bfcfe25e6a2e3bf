"""medseg: read scans, train U-Nets, write masks on the input's grid, score them.

The public names load on first use (PEP 562), so ``import medseg`` and ``medseg --help`` do
not pay for importing torch and MONAI until something needs them.
"""

from __future__ import annotations

import importlib

from medseg._version import __version__  # noqa: F401  (medseg.__version__)

# public name -> the module that defines it
_WHERE = {
    "Config": "medseg.config",
    "load_config": "medseg.config",
    "save_config": "medseg.config",
    "MedsegError": "medseg.errors",
    "InputError": "medseg.errors",
    "ConfigError": "medseg.errors",
    "CheckpointError": "medseg.errors",
    "dice": "medseg.evaluation.metrics",
    "evaluate": "medseg.evaluation.folders",
    "evaluate_pair": "medseg.evaluation.metrics",
    "qc_report": "medseg.evaluation.report",
    "predict_many": "medseg.inference.batch",
    "export_model": "medseg.inference.export",
    "Predictor": "medseg.inference.predictor",
    "Segmentation": "medseg.inference.predictor",
    "keep_largest_component": "medseg.inference.postprocess",
    "read_volume": "medseg.io",
    "write_volume": "medseg.io",
    "build_model": "medseg.models",
    "Checkpoint": "medseg.checkpoint",
    "checkpoint_of": "medseg.models.factory",
    "Trainer": "medseg.training.trainer",
    "Callback": "medseg.training.trainer",
    "Pretrainer": "medseg.training.pretrain",
    "find_cases": "medseg.data.datasets",
    "Plan": "medseg.data.plan",
    "plan_for_config": "medseg.data.plan",
    "run_demo": "medseg.demo",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'medseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
