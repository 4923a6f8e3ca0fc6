"""Hugging Face CLIP → our CLIP: a `CLIPModel` directory (`config.json` with `model_type` "clip",
`model.safetensors` or `pytorch_model.bin`, tokenizer files), or `hf:<repo_id>` fetched with
`huggingface_hub`.

`.safetensors` files are read by `mtkd_jax.clip.safetensors_io` (memory-mapped, every header
check done), `.bin` files by the restricted pickle reader `mtkd_jax.clip.torch_io`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from mtkd_jax.clip import safetensors_io
from mtkd_jax.clip.config import CLIPConfig
from mtkd_jax.clip.porting import (
    BaseCheckpoint,
    Table,
    TableBuilder,
    heads_bias,
    heads_in,
    heads_out,
    read_state_dict,
    transpose,
)
from mtkd_jax.errors import InputError


def hf_config(values: Mapping[str, Any], path: str) -> CLIPConfig:
    """Architecture of a Hugging Face `CLIPModel` `config.json`."""
    if values.get("model_type") != "clip":
        raise InputError(
            f"Expected a Hugging Face CLIPModel config (model_type 'clip'). "
            f"Received: model_type={values.get('model_type')!r} in {path!r}"
        )
    vision, text = values.get("vision_config", {}), values.get("text_config", {})
    epsilons = {vision.get("layer_norm_eps", 1e-5), text.get("layer_norm_eps", 1e-5)}
    if len(epsilons) != 1:
        raise InputError(
            f"Both towers must use the same LayerNorm epsilon. Received: vision "
            f"{vision.get('layer_norm_eps')}, text {text.get('layer_norm_eps')} in {path!r}"
        )
    activations = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(activations) != 1:
        raise InputError(
            f"Both towers must use the same activation. Received: {activations} in {path!r}"
        )
    return CLIPConfig(
        embed_dim=values.get("projection_dim", 512),
        image_size=vision.get("image_size", 224),
        patch_size=vision.get("patch_size", 32),
        vision_width=vision.get("hidden_size", 768),
        vision_layers=vision.get("num_hidden_layers", 12),
        vision_heads=vision.get("num_attention_heads", 12),
        text_width=text.get("hidden_size", 512),
        text_layers=text.get("num_hidden_layers", 12),
        text_heads=text.get("num_attention_heads", 8),
        vocab_size=text.get("vocab_size", 49408),
        context_length=text.get("max_position_embeddings", 77),
        activation=activations.pop(),
        vision_mlp_dim=vision.get("intermediate_size", 3072),
        text_mlp_dim=text.get("intermediate_size", 2048),
        layer_norm_eps=float(epsilons.pop()),
    )


def read_hf_directory(path: str) -> BaseCheckpoint:
    """A Hugging Face `CLIPModel` directory; its tokenizer files come with it."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as file:
        config = hf_config(json.load(file), path)
    safetensors = os.path.join(path, "model.safetensors")
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(safetensors):
        tensors = safetensors_io.read(safetensors)
    elif os.path.isfile(binary):
        tensors = read_state_dict(binary)
    else:
        raise InputError(
            "A Hugging Face CLIP directory needs `model.safetensors` or `pytorch_model.bin` "
            f"(sharded checkpoints are not supported). Received: {path!r} with "
            f"{sorted(os.listdir(path))}"
        )
    return BaseCheckpoint(
        config=config,
        tensors=tensors,
        table=hf_table,
        ignored=lambda name: name.endswith(".position_ids"),
        description=path,
    )


def download_hf(repo_id: str) -> str:
    """`hf:<repo_id>` → a local directory (the files `read_hf_directory` needs), or one error."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id,
            allow_patterns=["config.json", "model.safetensors", "vocab.json", "merges.txt"],
        )
    except Exception as error:  # noqa: BLE001 - offline, missing repo, no auth: all explained below
        raise InputError(
            f"Could not fetch the Hugging Face repository {repo_id!r} ({type(error).__name__}: "
            f"{error}). On a machine without network, download it elsewhere and pass the "
            "local directory instead of 'hf:<repo_id>'."
        ) from error


# --------------------------------------------------------------------------- mapping table


def _hf_block(builder: TableBuilder, prefix: str, block, width: int, heads: int) -> None:
    attention = block.attention
    for letter, projection in zip(
        "qkv", (attention._query_dense, attention._key_dense, attention._value_dense), strict=True
    ):
        builder.add(
            f"{prefix}.self_attn.{letter}_proj.weight", projection.kernel, heads_in(width, heads)
        )
        builder.add(
            f"{prefix}.self_attn.{letter}_proj.bias", projection.bias, heads_bias(width, heads)
        )
    builder.add(
        f"{prefix}.self_attn.out_proj.weight",
        attention._output_dense.kernel,
        heads_out(width, heads),
    )
    builder.add(f"{prefix}.self_attn.out_proj.bias", attention._output_dense.bias)
    builder.layer_norm(f"{prefix}.layer_norm1", block.layer_norm_1)
    builder.layer_norm(f"{prefix}.layer_norm2", block.layer_norm_2)
    builder.add(f"{prefix}.mlp.fc1.weight", block.dense_1.kernel, transpose)
    builder.add(f"{prefix}.mlp.fc1.bias", block.dense_1.bias)
    builder.add(f"{prefix}.mlp.fc2.weight", block.dense_2.kernel, transpose)
    builder.add(f"{prefix}.mlp.fc2.bias", block.dense_2.bias)


def hf_table(model) -> Table:
    """Hugging Face `CLIPModel` names → our variables (prompts excluded)."""
    config, builder = model.config, TableBuilder()
    visual, text = model.visual, model.text
    builder.add(
        "vision_model.embeddings.patch_embedding.weight",
        visual.embedding.patch_conv.kernel,
        lambda a: a.transpose(2, 3, 1, 0),
    )
    builder.add("vision_model.embeddings.class_embedding", visual.embedding.class_embedding)
    builder.add(
        "vision_model.embeddings.position_embedding.weight", visual.embedding.position_embedding
    )
    builder.layer_norm("vision_model.pre_layrnorm", visual.ln_pre)
    for i, block in enumerate(visual.blocks):
        _hf_block(
            builder,
            f"vision_model.encoder.layers.{i}",
            block,
            config.vision_width,
            config.vision_heads,
        )
    builder.layer_norm("vision_model.post_layernorm", visual.ln_post)
    builder.add("visual_projection.weight", visual.projection.kernel, transpose)
    builder.add(
        "text_model.embeddings.token_embedding.weight", text.embedding.token_embedding.embeddings
    )
    builder.add(
        "text_model.embeddings.position_embedding.weight", text.embedding.position_embedding
    )
    for i, block in enumerate(text.blocks):
        _hf_block(
            builder, f"text_model.encoder.layers.{i}", block, config.text_width, config.text_heads
        )
    builder.layer_norm("text_model.final_layer_norm", text.ln_final)
    builder.add("text_projection.weight", text.projection.kernel, transpose)
    builder.add("logit_scale", model.logit_scale)
    return builder.table
