"""Networks from what describes them: a config (``model.*``) and a plan, or a checkpoint."""

from __future__ import annotations

import dataclasses

from torch import nn

from medseg.checkpoint import Checkpoint
from medseg.config import Config
from medseg.data.plan import Plan
from medseg.errors import CheckpointError, ConfigError
from medseg.models.slicewise import SliceWise
from medseg.models.unet import build_model, model_options

__all__ = ["model_from_config", "model_for_plan", "model_from_checkpoint", "checkpoint_of", "describes"]


def model_from_config(
    config: Config,
    out_channels: int,
    in_channels: int = 1,
    spatial_dims: int = 3,
    stem_stride=None,
    strides=None,
) -> nn.Module:
    """The network a config describes, for ``in_channels`` image channels, ``out_channels``
    classes and 2D or 3D images; ``stem_stride`` and ``strides`` come from the plan (which
    owns the geometry; ``model.strides`` is what the user asked the planner for).

    Raises:
        ConfigError: an unknown model name, or options the model cannot take.
    """
    settings = config.to_dict()["model"]
    name = settings.pop("name")
    try:
        wanted = model_options(name)
    except ValueError as exc:
        raise ConfigError("model.name", str(exc)) from None
    settings["stem_stride"] = stem_stride
    if strides is not None:
        settings["strides"] = strides
    options = {k: v for k, v in settings.items() if k in wanted and v is not None}
    try:
        model = build_model(
            name, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **options
        )
    except ValueError as exc:
        raise ConfigError("model", str(exc)) from None
    model.timestep = config.model.timestep
    return model


def model_for_plan(config: Config, plan: Plan, classes: int) -> nn.Module:
    """The network of ``config`` for a plan's images (channels, dimensions) and pooling: a 2D
    network wrapped to run slice by slice (``SliceWise``) when the plan has a ``slice_axis``."""
    axis = plan.slice_axis
    if axis is None:
        return model_from_config(
            config,
            classes,
            plan.channels,
            plan.spatial_dims,
            plan.stem_stride,
            [list(s) for s in plan.strides],
        )
    in_plane = lambda stride: [s for a, s in enumerate(stride) if a != axis]  # noqa: E731
    if config.model.name == "unet" and config.model.norm is None:
        # Batch norm, not the 2D unet's instance norm: a step's 13 slices give it statistics, and
        # on ACDC it reached 0.807 mean Dice at 1,000 steps against 0.752 (docs/performance.md).
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, norm="batch"))
    net = model_from_config(
        config,
        classes,
        plan.channels,
        2,
        in_plane(plan.stem_stride) if plan.stem_stride else None,
        [in_plane(s) for s in plan.strides],
    )
    return SliceWise(net, axis)


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """Rebuild the network a checkpoint was trained with and load its weights (eval mode).

    Raises:
        CheckpointError: a pretraining checkpoint, or a custom model's (only its code can
            rebuild it: build it, then ``load_state_dict(checkpoint.weights)``).
    """
    checkpoint.check_segments()
    if checkpoint.custom_model:
        raise CheckpointError(
            checkpoint.source,
            "was trained with a custom model: build it yourself and load Checkpoint.load(path).weights",
        )
    model = model_for_plan(checkpoint.settings(), checkpoint.preprocessing(), len(checkpoint.labels))
    model.load_state_dict(checkpoint.weights)
    return model.eval()


def checkpoint_of(model: nn.Module, plan: Plan, labels: dict, config: Config | None = None) -> Checkpoint:
    """A checkpoint of a network made in Python, to ``save`` and predict with like a trained one.

    ``config.model`` must describe the network (as for one from ``build_model`` with those
    settings) for ``Predictor`` to rebuild it from the file; otherwise the file is marked a
    custom model, and only your own code can rebuild it.

    Example:
        >>> net = build_model("unet", 3, 1, 4, channels=(16, 32, 64, 128))  # ...then train it
        >>> checkpoint_of(net, plan, labels, config).save("mine.pt")  # Predictor("mine.pt")
    """
    config = config or Config()
    return Checkpoint(
        weights={k: v.detach().cpu() for k, v in model.state_dict().items()},
        config=config.to_dict(),
        labels={int(k): v for k, v in labels.items()},
        plan=plan.to_dict(),
        custom_model=not describes(config, model, plan, len(labels)),
    )


def describes(config: Config, model: nn.Module, plan: Plan, classes: int) -> bool:
    """Whether ``config`` rebuilds ``model``: the same class with the same weight names and shapes."""
    try:
        built = model_for_plan(config, plan, classes)
    except ConfigError:
        return False
    ours, theirs = built.state_dict(), model.state_dict()
    return type(built) is type(model) and {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in theirs.items()
    }
