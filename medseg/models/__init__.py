"""medseg's networks: the U-Net family behind ``build_model``."""

from medseg.models.unet import MODELS, AttentionUNet, ResidualUNet, UNet, build_model, model_options

__all__ = ["MODELS", "UNet", "ResidualUNet", "AttentionUNet", "build_model", "model_options"]
