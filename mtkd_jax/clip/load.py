"""Load CLIP from the checkpoints users have, safely and strictly.

`load(source, prompts=None, dtype="float32")` reads

- a Hugging Face CLIP directory (`config.json` + `model.safetensors` or `pytorch_model.bin`,
  tokenizer files), or `hf:<repo_id>` fetched with `huggingface_hub` (`convert_hf`);
- an OpenAI CLIP `.pt` file (TorchScript archive as distributed, or a plain state dict with
  OpenAI's names, e.g. open_clip's ViT checkpoints); the architecture is inferred from the
  tensor shapes, as OpenAI's `build_model` does (`convert_openai`);
- a keras-hub preset: `keras_hub:<preset name or local preset directory>` (`convert_keras_hub`);
- our own format (a directory written by `save` / `python -m mtkd_jax.convert`), with no torch
  (`native`);

and, with `prompts=`, a PromptKD / PromptSRC teacher checkpoint (`model-best.pth.tar`) or the
MTKD reference code's prompt names, whose prompt length and depth are read from the file
(`convert_promptkd`), or fresh prompt settings.

Each foreign format is one converter module holding its reader and its mapping table (source
name → model variable + transform); this module only picks the converter (`read_base`) and
applies the tables with the shared porting helper (`mtkd_jax.clip.porting.port`). Loading is
strict: if a source tensor is neither mapped nor explicitly ignored, a model variable is left
unfilled, or a shape disagrees, one `CheckpointMismatchError` lists every such name. PyTorch
pickles are only ever read by the restricted reader in `mtkd_jax.clip.torch_io` (never
`pickle.load`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mtkd_jax.clip.convert_hf import download_hf, read_hf_directory
from mtkd_jax.clip.convert_keras_hub import read_keras_hub_preset
from mtkd_jax.clip.convert_openai import read_openai_file
from mtkd_jax.clip.convert_promptkd import (
    ignored_in_prompts,
    prompt_settings,
    prompt_table,
    read_prompts,
)
from mtkd_jax.clip.native import CONFIG_FILE, is_native, read_native
from mtkd_jax.clip.porting import (
    BaseCheckpoint,
    Source,
    build_uninitialised,
    forget_pending,
    port,
    same,
)
from mtkd_jax.errors import InputError

TEXT_PROMPT_INIT = "a photo of a"


def read_base(source: str | os.PathLike) -> BaseCheckpoint:
    """Read a base CLIP checkpoint (any supported foreign format) without building a model."""
    source = os.fspath(source)
    if source.startswith("hf:"):
        return read_hf_directory(download_hf(source[3:]))
    if source.startswith("keras_hub:"):
        return read_keras_hub_preset(source[len("keras_hub:") :])
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "config.json")):
            with open(os.path.join(source, "config.json"), encoding="utf-8") as file:
                values = json.load(file)
            if values.get("model_type") == "clip":
                return read_hf_directory(source)
        if os.path.isfile(os.path.join(source, "metadata.json")):
            return read_keras_hub_preset(source)
        raise InputError(
            "Unrecognised CLIP directory: expected a Hugging Face CLIP directory (config.json "
            "with model_type 'clip'), a keras-hub preset (metadata.json) or our own format "
            f"({CONFIG_FILE}). Received: {source!r} with {sorted(os.listdir(source))}"
        )
    if os.path.isfile(source):
        return read_openai_file(source)
    raise InputError(
        "CLIP source not found. Pass a local directory or file, 'hf:<repo_id>' or "
        f"'keras_hub:<preset>'. Received: source={source!r}"
    )


def load_tokenizer(source: str | os.PathLike | None = None):
    """The tokenizer that belongs to `source` (its own files when it has them), else the standard
    CLIP vocabulary shipped with the package."""
    from mtkd_jax.clip.tokenizer import CLIPTokenizer

    if source is not None:
        source = os.fspath(source)
        directory = source if os.path.isdir(source) else None
        if source.startswith("keras_hub:") and os.path.isdir(source[len("keras_hub:") :]):
            directory = source[len("keras_hub:") :]
        if directory is not None:
            for candidate in (directory, os.path.join(directory, "assets", "tokenizer")):
                try:
                    return CLIPTokenizer.from_directory(candidate)
                except (ValueError, FileNotFoundError):
                    continue
    return CLIPTokenizer()


def _prompt_config(prompts: Any) -> dict[str, int]:
    keys = (
        "vision_prompt_length",
        "vision_prompt_depth",
        "text_prompt_length",
        "text_prompt_depth",
    )
    unknown = sorted(set(prompts) - set(keys))
    if unknown:
        raise InputError(
            f"Unknown prompt settings {unknown}. Valid keys: {list(keys)}. Received: {prompts!r}"
        )
    return {key: int(prompts.get(key, 0)) for key in keys}


def load(source: str | os.PathLike, prompts: Any = None, *, dtype: str = "float32"):
    """Load a CLIP model (see the module docstring for the formats).

    Args:
        source: HF directory, `hf:<repo_id>`, OpenAI `.pt`/state-dict file,
            `keras_hub:<preset>`, or a directory in our own format.
        prompts: `None` (keep the source's prompts: none for foreign formats), a path to a
            PromptKD/PromptSRC checkpoint (prompt length/depth read from it), or a dict of
            fresh prompt settings such as `{"vision_prompt_length": 4, "vision_prompt_depth": 9,
            "text_prompt_length": 4, "text_prompt_depth": 9}` (vision prompts random N(0, 0.02²);
            the first text prompt initialised from the token embeddings of "a photo of a" when
            it has 4 tokens, else random).
        dtype: the Keras dtype policy of the returned model (`"float32"`, `"bfloat16"`, …).

    Returns:
        A built `CLIP` whose weights all come from the checkpoint(s).

    Raises:
        CheckpointMismatchError: listing every missing, unexpected and mis-shaped name.
        mtkd_jax.clip.torch_io.UnsafeCheckpointError: a pickle that would run code.
    """
    from mtkd_jax.clip.model import CLIP

    source = os.fspath(source)
    if is_native(source):
        model = read_native(source, dtype=dtype)
        if isinstance(prompts, Mapping) and not model.prompt_variables():
            return _with_fresh_prompts(model, _prompt_config(prompts), source, dtype)
        if prompts is not None:
            raise InputError(
                "A converted checkpoint takes only fresh prompt settings (a dict), and only when "
                "it has no prompts yet; pass a prompt checkpoint when converting instead "
                f"(python -m mtkd_jax.convert SRC DST --prompts CKPT). Received: source={source!r}"
                f", prompts={prompts!r}"
            )
        return model
    base = read_base(source)
    sources_extra, settings, fresh = [], {}, False
    if isinstance(prompts, (str, os.PathLike)):
        tensors = read_prompts(prompts)
        settings = prompt_settings(tensors)
        sources_extra.append((os.fspath(prompts), tensors))
    elif isinstance(prompts, Mapping):
        settings, fresh = _prompt_config(prompts), True
    elif prompts is not None:
        raise InputError(
            "prompts must be None, a checkpoint path, or a dict of prompt settings. "
            f"Received: prompts={prompts!r}"
        )
    config = base.config.replace(**settings)
    model = build_uninitialised(lambda: CLIP(config, dtype=dtype))
    try:
        sources = [Source(base.description, base.tensors, base.table(model), base.ignored)]
        for description, tensors in sources_extra:
            sources.append(Source(description, tensors, prompt_table(model), ignored_in_prompts))
        if fresh:
            # Fresh prompts take their initializers' values: no checkpoint has to fill them.
            sources.append(_fresh_prompt_source(model))
        port(model, sources)
    finally:
        forget_pending(model)
    if fresh and config.text_prompt_depth:
        ids = load_tokenizer(source).encode(TEXT_PROMPT_INIT)
        if len(ids) == config.text_prompt_length:
            model.init_text_prompts(ids)
    return model


def _with_fresh_prompts(plain, settings: Mapping[str, int], source: str, dtype):
    """`plain` (a CLIP without prompts) rebuilt with fresh deep prompts, weights carried over."""
    from mtkd_jax.clip.model import CLIP

    model = CLIP(plain.config.replace(**settings), dtype=dtype, name=plain.name)
    values = {variable.path: variable.value for variable in plain.weights}
    prompts = {id(variable) for variable in model.prompt_variables()}
    for variable in model.weights:
        if id(variable) not in prompts:
            variable.assign(values[variable.path])
    if model.config.text_prompt_depth:
        ids = load_tokenizer(source).encode(TEXT_PROMPT_INIT)
        if len(ids) == model.config.text_prompt_length:
            model.init_text_prompts(ids)
    return model


def _fresh_prompt_source(model) -> Source:
    """A source that 'fills' the prompt variables with their own initial values."""
    table, tensors = {}, {}
    for variable in model.prompt_variables():
        table[variable.path] = [(variable, same)]
        tensors[variable.path] = np.asarray(variable)
    return Source("fresh prompts", tensors, table)
