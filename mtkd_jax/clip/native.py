"""Our own CLIP format: a directory with `clip_config.json` (format name, version, `CLIPConfig`),
`model.weights.h5` (Keras weights) and the tokenizer's `vocab.json` + `merges.txt`.

Written by `save` (and `python -m mtkd_jax.convert`), read by `read_native` with no torch.
"""

from __future__ import annotations

import json
import os

from mtkd_jax.clip.config import CLIPConfig
from mtkd_jax.clip.porting import CheckpointMismatchError, build_uninitialised, forget_pending
from mtkd_jax.errors import InputError

FORMAT_NAME = "mtkd_jax.clip"
FORMAT_VERSION = 1
CONFIG_FILE = "clip_config.json"
WEIGHTS_FILE = "model.weights.h5"


def is_native(path: str) -> bool:
    """True when `path` is a directory in our own format."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save(model, directory: str | os.PathLike, tokenizer=None) -> None:
    """Write `model` in our own format: `clip_config.json`, `model.weights.h5`, and the tokenizer
    files (`vocab.json`, `merges.txt`; the standard vocabulary when `tokenizer` is None).
    `directory` is created; existing files with these names are replaced."""
    from mtkd_jax.clip.tokenizer import CLIPTokenizer

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as file:
        json.dump(
            {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": model.config.to_dict()},
            file,
            indent=2,
        )
    model.save_weights(os.path.join(directory, WEIGHTS_FILE))
    (tokenizer or CLIPTokenizer()).save_assets(directory)


def read_native(directory: str | os.PathLike, *, dtype: str = "float32"):
    """Read our own format (no torch needed)."""
    from mtkd_jax.clip.model import CLIP

    directory = os.fspath(directory)
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as file:
        values = json.load(file)
    if values.get("format") != FORMAT_NAME or values.get("version") != FORMAT_VERSION:
        raise InputError(
            f"Expected format {FORMAT_NAME!r} version {FORMAT_VERSION}. Received: "
            f"format={values.get('format')!r}, version={values.get('version')!r} in {directory!r}"
        )
    config = CLIPConfig.from_dict(values["config"])
    model = build_uninitialised(lambda: CLIP(config, dtype=dtype))
    try:
        model.load_weights(os.path.join(directory, WEIGHTS_FILE))
    finally:
        forget_pending(model)
    unset = [v.path for v in model.weights if v._value is None]
    if unset:
        raise CheckpointMismatchError(f"{directory!r} left these variables unset: {unset}")
    return model
