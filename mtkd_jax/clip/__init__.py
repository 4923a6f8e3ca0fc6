"""CLIP in Keras: the model, its configuration, and loaders for the checkpoints users have."""

from mtkd_jax.clip.config import PRESETS, CLIPConfig, image_encoder_flops
from mtkd_jax.clip.model import CLIP

__all__ = ["CLIP", "CLIPConfig", "PRESETS", "image_encoder_flops"]
