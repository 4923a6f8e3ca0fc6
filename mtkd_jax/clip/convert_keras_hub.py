"""keras-hub CLIP presets → our CLIP: `keras_hub:<preset name or local preset directory>`.

The preset is built as keras-hub's `CLIPBackbone`, its variables copied out under names that do
not depend on the encoders' own layer names (`keras_hub_variables`), and the backbone freed.
keras-hub's transformer blocks are the layer class ours are built from, so block variables map
one to one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtkd_jax.clip.config import CLIPConfig
from mtkd_jax.clip.porting import BaseCheckpoint, CheckpointMismatchError, Table, TableBuilder
from mtkd_jax.errors import InputError


def read_keras_hub_preset(preset: str) -> BaseCheckpoint:
    """A keras-hub CLIP preset (name or local directory), copied out of its `CLIPBackbone`."""
    import keras_hub

    try:
        backbone = keras_hub.models.CLIPBackbone.from_preset(preset)
    except Exception as error:  # noqa: BLE001 - keras-hub raises many kinds; re-raise with context
        raise InputError(
            f"Could not load the keras-hub CLIP preset {preset!r} ({type(error).__name__}: "
            f"{error}). Use a local preset directory or a preset name such as "
            "'clip_vit_base_patch16' on a machine that can download it."
        ) from error
    vision, text = backbone.vision_encoder, backbone.text_encoder
    named = keras_hub_variables(backbone)
    unnamed = {id(v) for v in backbone.weights} - {id(v) for v in named.values()}
    if unnamed:
        raise CheckpointMismatchError(
            f"Unexpected variables in the keras-hub preset {preset!r}: "
            f"{[v.path for v in backbone.weights if id(v) in unnamed]}"
        )
    tensors = {name: np.asarray(variable) for name, variable in named.items()}
    positions = tensors["vision/position_ids"].reshape(-1)
    if not np.array_equal(positions, np.arange(positions.size)):
        raise InputError(
            "keras-hub's vision embedding looks positions up through its stored `position_ids`; "
            "CLIP (and this model) uses 0, 1, 2, …, which released presets store. Received "
            f"position_ids starting {positions[:8].tolist()} in preset {preset!r}"
        )
    projection_dim = backbone.projection_dim
    del backbone, named  # the tensors are copies: free the keras-hub model
    if vision.intermediate_activation != text.intermediate_activation:
        raise InputError(f"Both towers must use the same activation. Received preset {preset!r}")
    config = CLIPConfig(
        embed_dim=projection_dim,
        image_size=vision.image_shape[0],
        patch_size=vision.patch_size,
        vision_width=vision.hidden_dim,
        vision_layers=vision.num_layers,
        vision_heads=vision.num_heads,
        text_width=text.hidden_dim,
        text_layers=text.num_layers,
        text_heads=text.num_heads,
        vocab_size=text.vocabulary_size,
        context_length=text.max_sequence_length,
        activation=vision.intermediate_activation,
        vision_mlp_dim=vision.intermediate_dim,
        text_mlp_dim=text.intermediate_dim,
    )
    return BaseCheckpoint(
        config=config,
        tensors=tensors,
        table=keras_hub_table,
        ignored=lambda name: name == "vision/position_ids",
        description=f"keras_hub:{preset}",
    )


# --------------------------------------------------------------------------- mapping table


def _block_variables(block) -> dict[str, Any]:
    """A transformer block's variables by their path inside the block (`attention/query/kernel`)."""
    return {v.path.split(f"{block.name}/", 1)[1]: v for v in block.weights}


def keras_hub_variables(backbone) -> dict[str, Any]:
    """keras-hub `CLIPBackbone` variables under names independent of the encoders' own names
    (keras-hub prefixes sub-layer names with the encoder's name)."""
    vision, text = backbone.vision_encoder, backbone.text_encoder
    named = {
        "vision/patch_embedding": vision.embedding.patch_embedding.kernel,
        "vision/class_embedding": vision.embedding.class_embedding,
        "vision/position_embedding": vision.embedding.position_embedding.embeddings,
        "vision/position_ids": vision.embedding.position_ids,
        "vision/ln_pre/gamma": vision.pre_layer_norm.gamma,
        "vision/ln_pre/beta": vision.pre_layer_norm.beta,
        "vision/ln_post/gamma": vision.layer_norm.gamma,
        "vision/ln_post/beta": vision.layer_norm.beta,
        "vision/projection": backbone.vision_projection.kernel,
        "text/token_embedding": text.embedding.token_embedding.embeddings,
        "text/position_embedding": text.embedding.position_embedding.position_embeddings,
        "text/ln_final/gamma": text.layer_norm.gamma,
        "text/ln_final/beta": text.layer_norm.beta,
        "text/projection": backbone.text_projection.kernel,
        "logit_scale": backbone.clip_head.logit_scale,
    }
    for tower, encoder in (("vision", vision), ("text", text)):
        for i, block in enumerate(encoder.encoder_layers):
            for inner, variable in _block_variables(block).items():
                named[f"{tower}/block_{i}/{inner}"] = variable
    return named


def keras_hub_table(model) -> Table:
    """`keras_hub_variables` names → our variables (prompts excluded). keras-hub's blocks are
    the same layer class as ours, so block variables map one to one."""
    builder = TableBuilder()
    visual, text = model.visual, model.text
    builder.add("vision/patch_embedding", visual.embedding.patch_conv.kernel)
    builder.add("vision/class_embedding", visual.embedding.class_embedding)
    builder.add("vision/position_embedding", visual.embedding.position_embedding)
    builder.add("vision/ln_pre/gamma", visual.ln_pre.gamma)
    builder.add("vision/ln_pre/beta", visual.ln_pre.beta)
    builder.add("vision/ln_post/gamma", visual.ln_post.gamma)
    builder.add("vision/ln_post/beta", visual.ln_post.beta)
    builder.add("vision/projection", visual.projection.kernel)
    builder.add("text/token_embedding", text.embedding.token_embedding.embeddings)
    builder.add("text/position_embedding", text.embedding.position_embedding)
    builder.add("text/ln_final/gamma", text.ln_final.gamma)
    builder.add("text/ln_final/beta", text.ln_final.beta)
    builder.add("text/projection", text.projection.kernel)
    builder.add("logit_scale", model.logit_scale)
    for tower, ours in (("vision", visual), ("text", text)):
        for i, block in enumerate(ours.blocks):
            for inner, variable in _block_variables(block).items():
                builder.add(f"{tower}/block_{i}/{inner}", variable)
    return builder.table
