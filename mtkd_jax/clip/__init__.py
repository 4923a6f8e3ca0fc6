"""CLIP in Keras: the model, its configuration, and loaders for the checkpoints users have."""

from mtkd_jax.clip.config import PRESETS, CLIPConfig, image_encoder_flops
from mtkd_jax.clip.load import CheckpointMismatchError, load, load_tokenizer, save
from mtkd_jax.clip.model import CLIP, class_token_ids

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CheckpointMismatchError",
    "PRESETS",
    "class_token_ids",
    "image_encoder_flops",
    "load",
    "load_tokenizer",
    "save",
]
