"""OpenAI CLIP checkpoints → our CLIP: the TorchScript archive OpenAI distributes (`ViT-L-14.pt`)
or a plain state dict with OpenAI's names (e.g. open_clip's ViT checkpoints).

The architecture is inferred from the tensor shapes, as OpenAI's `build_model` does; ResNet CLIP
models are refused by name. The file is read by the restricted pickle reader
(`mtkd_jax.clip.torch_io`), never `pickle.load`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from mtkd_jax.clip.config import CLIPConfig
from mtkd_jax.clip.porting import (
    BaseCheckpoint,
    Table,
    TableBuilder,
    Transform,
    heads_bias,
    heads_in,
    heads_out,
    read_state_dict,
    transpose,
)
from mtkd_jax.errors import InputError

OPENAI_BUFFERS = ("input_resolution", "context_length", "vocab_size")


def openai_config(tensors: Mapping[str, np.ndarray]) -> CLIPConfig:
    """Architecture of an OpenAI-layout state dict, inferred from its shapes."""
    required = (
        "visual.proj",
        "visual.conv1.weight",
        "visual.positional_embedding",
        "text_projection",
        "positional_embedding",
        "token_embedding.weight",
        "ln_final.weight",
    )
    absent = [name for name in required if name not in tensors]
    if absent:
        hint = (
            " (ResNet CLIP models are not supported)"
            if "visual.attnpool.c_proj.weight" in tensors
            else ""
        )
        raise InputError(
            f"Not an OpenAI CLIP ViT state dict{hint}: missing {absent}. "
            f"Received names such as {sorted(tensors)[:5]}"
        )
    vision_width, _, patch_size, _ = tensors["visual.conv1.weight"].shape
    grid = round((tensors["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = tensors["ln_final.weight"].shape[0]

    def count(prefix):
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for name in tensors if (m := pattern.match(name))})

    def mlp_dim(name):  # 0 (4 × width) when absent: the strict port then lists what is missing
        return int(tensors[name].shape[0]) if name in tensors else 0

    return CLIPConfig(
        embed_dim=int(tensors["text_projection"].shape[1]),
        image_size=int(patch_size * grid),
        patch_size=int(patch_size),
        vision_width=int(vision_width),
        vision_layers=count("visual.transformer.resblocks."),
        vision_heads=int(vision_width) // 64,
        text_width=int(text_width),
        text_layers=count("transformer.resblocks."),
        text_heads=int(text_width) // 64,
        vocab_size=int(tensors["token_embedding.weight"].shape[0]),
        context_length=int(tensors["positional_embedding"].shape[0]),
        vision_mlp_dim=mlp_dim("visual.transformer.resblocks.0.mlp.c_fc.weight"),
        text_mlp_dim=mlp_dim("transformer.resblocks.0.mlp.c_fc.weight"),
    )


def read_openai_file(path: str) -> BaseCheckpoint:
    """An OpenAI-layout `.pt` (TorchScript archive or plain state dict), architecture inferred."""
    tensors = read_state_dict(path)
    return BaseCheckpoint(
        config=openai_config(tensors),
        tensors=tensors,
        table=openai_table,
        ignored=lambda name: name in OPENAI_BUFFERS,
        description=path,
    )


# --------------------------------------------------------------------------- mapping table


def _slice(index: int, width: int, then: Transform) -> Transform:
    def transform(array):
        if array.shape[0] != 3 * width:
            raise InputError("wrong fused size")
        return then(array[index * width : (index + 1) * width])

    return transform


def _openai_block(builder: TableBuilder, prefix: str, block, width: int, heads: int) -> None:
    attention = block.attention
    for index, projection in enumerate(
        (attention._query_dense, attention._key_dense, attention._value_dense)
    ):
        builder.add(
            f"{prefix}.attn.in_proj_weight",
            projection.kernel,
            _slice(index, width, heads_in(width, heads)),
        )
        builder.add(
            f"{prefix}.attn.in_proj_bias",
            projection.bias,
            _slice(index, width, heads_bias(width, heads)),
        )
    builder.add(
        f"{prefix}.attn.out_proj.weight", attention._output_dense.kernel, heads_out(width, heads)
    )
    builder.add(f"{prefix}.attn.out_proj.bias", attention._output_dense.bias)
    builder.layer_norm(f"{prefix}.ln_1", block.layer_norm_1)
    builder.layer_norm(f"{prefix}.ln_2", block.layer_norm_2)
    builder.add(f"{prefix}.mlp.c_fc.weight", block.dense_1.kernel, transpose)
    builder.add(f"{prefix}.mlp.c_fc.bias", block.dense_1.bias)
    builder.add(f"{prefix}.mlp.c_proj.weight", block.dense_2.kernel, transpose)
    builder.add(f"{prefix}.mlp.c_proj.bias", block.dense_2.bias)


def openai_table(model) -> Table:
    """OpenAI `state_dict` names → our variables (prompts excluded)."""
    config, builder = model.config, TableBuilder()
    visual, text = model.visual, model.text
    builder.add(
        "visual.conv1.weight", visual.embedding.patch_conv.kernel, lambda a: a.transpose(2, 3, 1, 0)
    )
    builder.add("visual.class_embedding", visual.embedding.class_embedding)
    builder.add("visual.positional_embedding", visual.embedding.position_embedding)
    builder.layer_norm("visual.ln_pre", visual.ln_pre)
    for i, block in enumerate(visual.blocks):
        _openai_block(
            builder,
            f"visual.transformer.resblocks.{i}",
            block,
            config.vision_width,
            config.vision_heads,
        )
    builder.layer_norm("visual.ln_post", visual.ln_post)
    builder.add("visual.proj", visual.projection.kernel)
    builder.add("token_embedding.weight", text.embedding.token_embedding.embeddings)
    builder.add("positional_embedding", text.embedding.position_embedding)
    for i, block in enumerate(text.blocks):
        _openai_block(
            builder, f"transformer.resblocks.{i}", block, config.text_width, config.text_heads
        )
    builder.layer_norm("ln_final", text.ln_final)
    builder.add("text_projection", text.projection.kernel)
    builder.add("logit_scale", model.logit_scale)
    return builder.table
