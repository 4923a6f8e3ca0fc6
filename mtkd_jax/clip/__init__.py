"""CLIP in Keras: the model, its configuration, and loaders for the checkpoints users have.

The Keras model (`CLIP`, `class_token_ids`) is imported on first use, so `import mtkd_jax.clip`,
its config, tokenizer and loader functions load no Keras: the CLI and the loaders can reason about
a checkpoint's architecture before any model is built.
"""

import importlib

from mtkd_jax.clip.config import PRESETS, CLIPConfig, image_encoder_flops
from mtkd_jax.clip.load import load, load_tokenizer
from mtkd_jax.clip.native import save
from mtkd_jax.clip.porting import CheckpointMismatchError

_IN_MODEL = ("CLIP", "class_token_ids")

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


def __getattr__(name: str):
    if name not in _IN_MODEL:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("mtkd_jax.clip.model"), name)
    globals()[name] = value  # later look-ups skip this function
    return value
