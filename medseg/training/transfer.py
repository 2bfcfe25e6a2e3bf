"""Start a network from another run's weights (``train.init``): from diffusion pretraining, or
from a segmentation run on other data. Weights move by name and shape; output heads never do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from medseg.checkpoint import Checkpoint
from medseg.config import Config
from medseg.errors import CheckpointError, ConfigError
from medseg.models.slicewise import SliceWise

__all__ = ["PARTS", "Transfer", "network_of", "load_matching"]

log = logging.getLogger(__name__)

# Top-level module names of the U-Nets, by the part of the network they belong to. The time
# embedding feeds both halves; output heads (``head``, ``ds_heads``) belong to neither.
_ENCODER = {"stem", "encoders", "downs", "encoder_attention", "time_embed"}
_DECODER = {"decoders", "ups", "gates", "stem_up", "refine", "out_norm", "time_embed"}
_HEADS = {"head", "ds_heads"}
PARTS = {"all": _ENCODER | _DECODER, "encoder": _ENCODER, "decoder": _DECODER}
# Model settings that shape the weights: taken from the checkpoint so that they match.
_SHAPING = ("name", "channels", "stem", "norm", "blocks_per_level", "attention_levels", "heads")


@dataclass
class Transfer:
    """What ``load_matching`` did: tensors loaded, and those left as initialised, with why."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for why in self.skipped.values():
            reasons[why] = reasons.get(why, 0) + 1
        kept = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        return f"loaded {len(self.loaded)} tensors" + (f"; kept {kept}" if kept else "")


def network_of(path: str | Path, config: Config) -> tuple[Config, dict]:
    """The config with the network settings of the checkpoint at ``path``, and its plan.

    The network (model name, widths, stem, norm, blocks) and the plan (spacing, patch, pooling,
    normalisation) come from the checkpoint, so that its weights fit and its features mean the
    same; time conditioning is kept when the checkpoint has it, with the timestep segmentation
    runs at (``model.timestep``: 0, or the fixed noise level the pretraining used).

    Raises:
        CheckpointError: not a medseg checkpoint.
        ConfigError: the config fixes a plan of its own (``data.plan``).
    """
    checkpoint = Checkpoint.load(path)
    if config.data.plan:
        raise ConfigError("data.plan", f"train.init takes the plan of {path}; leave data.plan unset")
    theirs = checkpoint.config["model"]
    resolved = Config.from_dict(config.to_dict())
    changed = []
    defaults = {"timestep": 0}  # checkpoints from before model.timestep ran at t = 0
    for key in (*_SHAPING, "time_conditioning", "timestep"):
        value = theirs.get(key, defaults.get(key))
        if getattr(resolved.model, key) != value:
            changed.append(f"model.{key}={value!r}")
            setattr(resolved.model, key, value)
    if changed:
        log.info("train.init: the network of %s: %s", path, ", ".join(changed))
    return resolved, checkpoint.plan


def load_matching(model: nn.Module, path: str | Path, parts: str = "encoder") -> Transfer:
    """Copy into ``model`` every tensor of the checkpoint whose name and shape match and whose
    part is wanted; output heads are always left alone.

    Raises:
        ConfigError: an unknown ``parts``.
        CheckpointError: not one tensor could be loaded (another kind of network).
    """
    if parts not in PARTS:
        raise ConfigError("train.init_parts", f"must be one of {', '.join(PARTS)}, not {parts!r}")
    source = Checkpoint.load(path).weights
    own = model.state_dict()
    result = Transfer()
    wrapped = isinstance(model, SliceWise)  # a 2D network on slices: its U-Net's names follow "net."
    for name, tensor in own.items():
        top = name.split(".")[1 if wrapped else 0]
        if top in _HEADS:
            result.skipped[name] = "output head"
        elif top not in PARTS[parts]:
            result.skipped[name] = f"not in the {parts}"
        elif name not in source:
            result.skipped[name] = "missing from the checkpoint"
        elif source[name].shape != tensor.shape:
            result.skipped[name] = "of another shape"
        else:
            own[name] = source[name]
            result.loaded.append(name)
    if not result.loaded:
        raise CheckpointError(path, "holds no weights that fit this network (another model or plan?)")
    model.load_state_dict(own)
    return result
