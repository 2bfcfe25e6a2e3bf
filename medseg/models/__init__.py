"""medseg's networks."""

from medseg.models.unet import MODELS, UNet, build_model

__all__ = ["MODELS", "UNet", "build_model"]
