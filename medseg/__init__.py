"""medseg: read scans, train U-Nets, write masks on the input's grid, score them."""

from medseg.config import Config, load_config, save_config
from medseg.data.datasets import find_cases
from medseg.data.plan import Plan, plan_for_config
from medseg.demo import run_demo
from medseg.errors import CheckpointError, ConfigError, InputError, MedsegError
from medseg.evaluation.metrics import dice, evaluate
from medseg.inference.batch import predict_many
from medseg.inference.predictor import Predictor
from medseg.io import read_volume, write_volume
from medseg.models import build_model
from medseg.training.trainer import Callback, Trainer

__version__ = "0.1.0"

__all__ = [
    "Config",
    "load_config",
    "save_config",
    "MedsegError",
    "InputError",
    "ConfigError",
    "CheckpointError",
    "dice",
    "evaluate",
    "predict_many",
    "Predictor",
    "read_volume",
    "write_volume",
    "build_model",
    "Trainer",
    "Callback",
    "find_cases",
    "Plan",
    "plan_for_config",
    "run_demo",
]
