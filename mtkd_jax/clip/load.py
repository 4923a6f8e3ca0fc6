"""Load CLIP from the checkpoints users have, safely and strictly.

`load(source, prompts=None, dtype="float32")` reads

- a Hugging Face CLIP directory (`config.json` + `model.safetensors` or `pytorch_model.bin`,
  tokenizer files), or `hf:<repo_id>` fetched with `huggingface_hub`;
- an OpenAI CLIP `.pt` file (TorchScript archive as distributed, or a plain state dict with
  OpenAI's names, e.g. open_clip's ViT checkpoints); the architecture is inferred from the
  tensor shapes, as OpenAI's `build_model` does;
- a keras-hub preset: `keras_hub:<preset name or local preset directory>`;
- our own format (a directory written by `save` / `python -m mtkd_jax.convert`), with no torch;

and, with `prompts=`, a PromptKD / PromptSRC teacher checkpoint (`model-best.pth.tar`) or the
MTKD reference code's prompt names, whose prompt length and depth are read from the file.

Every foreign format has one mapping table (source name → model variable + transform) applied by
one porting helper, `port`. Loading is strict: if a source tensor is neither mapped nor
explicitly ignored, a model variable is left unfilled, or a shape disagrees, one
`CheckpointMismatchError` lists every such name. PyTorch pickles are only ever read by the
restricted reader in `mtkd_jax.clip.torch_io` (never `pickle.load`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from mtkd_jax.clip.config import CLIPConfig
from mtkd_jax.errors import InputError

Transform = Callable[[np.ndarray], np.ndarray]
Table = dict[str, list[tuple[Any, Transform]]]

FORMAT_NAME = "mtkd_jax.clip"
FORMAT_VERSION = 1
CONFIG_FILE = "clip_config.json"
WEIGHTS_FILE = "model.weights.h5"
TEXT_PROMPT_INIT = "a photo of a"


class CheckpointMismatchError(InputError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped names."""


def _same(array: np.ndarray) -> np.ndarray:
    return array


def _transpose(array: np.ndarray) -> np.ndarray:
    return array.T


# --------------------------------------------------------------------------- porting helper


@dataclasses.dataclass
class Source:
    """Tensors of one checkpoint with the table that maps them and the names it ignores."""

    description: str
    tensors: Mapping[str, np.ndarray]
    table: Table
    ignored: Callable[[str], bool] = lambda name: False


def port(model, sources: Iterable[Source]) -> None:
    """Assign every model variable from the sources' tables; strict.

    Raises:
        CheckpointMismatchError: naming, in one message, every model variable no table fills,
            every table entry absent from its source, every source tensor neither mapped nor
            ignored, and every tensor whose shape (after its transform) disagrees.
    """
    missing, unexpected, misshaped, filled = [], [], [], set()
    for source in sources:
        for name in source.tensors:
            if name not in source.table and not source.ignored(name):
                unexpected.append(f"{source.description}: {name}")
        for name, targets in source.table.items():
            if name not in source.tensors:
                missing.append(f"{source.description}: {name}")
                continue
            array = np.asarray(source.tensors[name])
            for variable, transform in targets:
                filled.add(id(variable))
                try:
                    value = transform(array)
                except ValueError:
                    value = None
                if value is None or tuple(value.shape) != tuple(variable.shape):
                    misshaped.append(
                        f"{source.description}: {name} {tuple(array.shape)} → {variable.path} "
                        f"expects {tuple(variable.shape)}"
                    )
                    continue
                if not missing and not misshaped and not unexpected:
                    variable.assign(value)
    unfilled = [v.path for v in model.weights if id(v) not in filled]
    if missing or unexpected or misshaped or unfilled:
        parts = []
        for title, names in (
            ("missing from the checkpoint", missing),
            ("unexpected (neither mapped nor ignored)", unexpected),
            ("mis-shaped", misshaped),
            ("model variables no table fills", unfilled),
        ):
            if names:
                parts.append(f"{len(names)} {title}:\n  " + "\n  ".join(names))
        raise CheckpointMismatchError(
            "The checkpoint does not match the model; nothing was loaded.\n"
            + "\n".join(parts)
            + "\nCheck that the files belong together (base model and prompts of the same "
            "architecture) and are complete."
        )


def build_uninitialised(build: Callable[[], Any]):
    """`build()` a Keras model without computing initial values that loading would overwrite.

    Keras defers the initialisation of variables created inside a `StatelessScope`; the loader
    then assigns every variable (strictly) and `forget_pending` drops them from Keras's list of
    variables awaiting initialisation. Saves the model's size in RAM and the compile time of
    the random initialisers (seconds for ViT-L/14).
    """
    import keras

    with keras.StatelessScope(initialize_variables=False):
        return build()


def forget_pending(model) -> None:
    """Remove `model`'s variables from Keras's deferred-initialisation list (see above)."""
    from keras.src.backend.common import global_state

    pending = global_state.get_global_attribute("uninitialized_variables") or []
    ours = {id(v) for v in model.weights}
    remaining = [v for v in pending if id(v) not in ours]
    global_state.set_global_attribute("uninitialized_variables", remaining)


# --------------------------------------------------------------------------- mapping tables


class _TableBuilder:
    def __init__(self):
        self.table: Table = {}

    def add(self, name: str, variable, transform: Transform = _same) -> None:
        self.table.setdefault(name, []).append((variable, transform))

    def layer_norm(self, name: str, layer) -> None:
        self.add(f"{name}.weight", layer.gamma)
        self.add(f"{name}.bias", layer.beta)


def _heads_in(width: int, heads: int) -> Transform:
    """torch Linear weight `[out, in]` → Keras EinsumDense kernel `[in, heads, head_dim]`."""
    return lambda a: a.T.reshape(width, heads, width // heads)


def _heads_bias(width: int, heads: int) -> Transform:
    return lambda a: a.reshape(heads, width // heads)


def _heads_out(width: int, heads: int) -> Transform:
    """torch out_proj weight `[width, width]` → Keras kernel `[heads, head_dim, width]`."""
    return lambda a: a.T.reshape(heads, width // heads, width)


def _slice(index: int, width: int, then: Transform) -> Transform:
    def transform(array):
        if array.shape[0] != 3 * width:
            raise InputError("wrong fused size")
        return then(array[index * width : (index + 1) * width])

    return transform


def _openai_block(builder: _TableBuilder, prefix: str, block, width: int, heads: int) -> None:
    attention = block.attention
    for index, projection in enumerate(
        (attention._query_dense, attention._key_dense, attention._value_dense)
    ):
        builder.add(
            f"{prefix}.attn.in_proj_weight",
            projection.kernel,
            _slice(index, width, _heads_in(width, heads)),
        )
        builder.add(
            f"{prefix}.attn.in_proj_bias",
            projection.bias,
            _slice(index, width, _heads_bias(width, heads)),
        )
    builder.add(
        f"{prefix}.attn.out_proj.weight", attention._output_dense.kernel, _heads_out(width, heads)
    )
    builder.add(f"{prefix}.attn.out_proj.bias", attention._output_dense.bias)
    builder.layer_norm(f"{prefix}.ln_1", block.layer_norm_1)
    builder.layer_norm(f"{prefix}.ln_2", block.layer_norm_2)
    builder.add(f"{prefix}.mlp.c_fc.weight", block.dense_1.kernel, _transpose)
    builder.add(f"{prefix}.mlp.c_fc.bias", block.dense_1.bias)
    builder.add(f"{prefix}.mlp.c_proj.weight", block.dense_2.kernel, _transpose)
    builder.add(f"{prefix}.mlp.c_proj.bias", block.dense_2.bias)


def openai_table(model) -> Table:
    """OpenAI `state_dict` names → our variables (prompts excluded)."""
    config, builder = model.config, _TableBuilder()
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


def _hf_block(builder: _TableBuilder, prefix: str, block, width: int, heads: int) -> None:
    attention = block.attention
    for letter, projection in zip(
        "qkv", (attention._query_dense, attention._key_dense, attention._value_dense), strict=True
    ):
        builder.add(
            f"{prefix}.self_attn.{letter}_proj.weight", projection.kernel, _heads_in(width, heads)
        )
        builder.add(
            f"{prefix}.self_attn.{letter}_proj.bias", projection.bias, _heads_bias(width, heads)
        )
    builder.add(
        f"{prefix}.self_attn.out_proj.weight",
        attention._output_dense.kernel,
        _heads_out(width, heads),
    )
    builder.add(f"{prefix}.self_attn.out_proj.bias", attention._output_dense.bias)
    builder.layer_norm(f"{prefix}.layer_norm1", block.layer_norm_1)
    builder.layer_norm(f"{prefix}.layer_norm2", block.layer_norm_2)
    builder.add(f"{prefix}.mlp.fc1.weight", block.dense_1.kernel, _transpose)
    builder.add(f"{prefix}.mlp.fc1.bias", block.dense_1.bias)
    builder.add(f"{prefix}.mlp.fc2.weight", block.dense_2.kernel, _transpose)
    builder.add(f"{prefix}.mlp.fc2.bias", block.dense_2.bias)


def hf_table(model) -> Table:
    """Hugging Face `CLIPModel` names → our variables (prompts excluded)."""
    config, builder = model.config, _TableBuilder()
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
    builder.add("visual_projection.weight", visual.projection.kernel, _transpose)
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
    builder.add("text_projection.weight", text.projection.kernel, _transpose)
    builder.add("logit_scale", model.logit_scale)
    return builder.table


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
    builder = _TableBuilder()
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


PROMPTKD_VISION = re.compile(
    r"image_encoder\.transformer\.resblocks\.(\d+)\.(VPT_shallow|new_prompt)$"
)
PROMPTKD_TEXT = re.compile(
    r"text_encoder\.transformer\.resblocks\.(\d+)\.(VPT_shallow|new_prompt)$"
)


def prompt_table(model) -> Table:
    """PromptSRC/PromptKD prompt names → our prompt variables (after `_normalise_prompt_names`)."""
    builder = _TableBuilder()
    if model.visual.prompts is not None:
        tokens = model.visual.prompts.tokens
        builder.add("image_encoder.VPT", tokens[0])
        for i in range(1, len(tokens)):
            builder.add(f"image_encoder.transformer.resblocks.{i}.VPT_shallow", tokens[i])
    if model.text.prompts is not None:
        tokens = model.text.prompts.tokens
        builder.add("prompt_learner.ctx", tokens[0])
        for i in range(1, len(tokens)):
            builder.add(f"text_encoder.transformer.resblocks.{i}.VPT_shallow", tokens[i])
    return builder.table


# --------------------------------------------------------------------------- readers


def _read_torch(path: str) -> Any:
    """A torch checkpoint (zip or TorchScript) as nested Python containers of numpy arrays."""
    from mtkd_jax.clip.torch_io import read_torch_file

    return read_torch_file(path)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A `.safetensors` file as read-only memory-mapped numpy arrays (bfloat16 via ml_dtypes),
    after every check of the format (`mtkd_jax.clip.safetensors_io`)."""
    from mtkd_jax.clip import safetensors_io

    return safetensors_io.read(path)


def _as_float(array: np.ndarray) -> np.ndarray:
    """bfloat16 has no numpy arithmetic worth trusting here: widen it to float32."""
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def _flat_state_dict(obj: Any, description: str) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InputError(
            f"Expected a state dict (name → tensor) in {description}. "
            f"Received: an object of type {type(obj).__name__}"
        )
    return {str(k): _as_float(np.asarray(v)) for k, v in obj.items() if isinstance(v, np.ndarray)}


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


@dataclasses.dataclass
class BaseCheckpoint:
    """A base CLIP checkpoint read from disk, ready to port onto a model."""

    config: CLIPConfig
    tensors: Mapping[str, np.ndarray]
    table: Callable[[Any], Table]
    ignored: Callable[[str], bool]
    description: str
    tokenizer_dir: str | None = None


def _read_hf_directory(path: str) -> BaseCheckpoint:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as file:
        config = hf_config(json.load(file), path)
    safetensors = os.path.join(path, "model.safetensors")
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(safetensors):
        tensors = read_safetensors(safetensors)
    elif os.path.isfile(binary):
        tensors = _flat_state_dict(_read_torch(binary), binary)
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
        tokenizer_dir=path,
    )


def _read_openai_file(path: str) -> BaseCheckpoint:
    tensors = _flat_state_dict(_read_torch(path), path)
    return BaseCheckpoint(
        config=openai_config(tensors),
        tensors=tensors,
        table=openai_table,
        ignored=lambda name: name in OPENAI_BUFFERS,
        description=path,
    )


def _read_keras_hub_preset(preset: str) -> BaseCheckpoint:
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
        tokenizer_dir=preset if os.path.isdir(preset) else None,
    )


def _download_hf(repo_id: str) -> str:
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


def is_native(path: str) -> bool:
    """True when `path` is a directory in our own format."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_base(source: str | os.PathLike) -> BaseCheckpoint:
    """Read a base CLIP checkpoint (any supported foreign format) without building a model."""
    source = os.fspath(source)
    if source.startswith("hf:"):
        return _read_hf_directory(_download_hf(source[3:]))
    if source.startswith("keras_hub:"):
        return _read_keras_hub_preset(source[len("keras_hub:") :])
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "config.json")):
            with open(os.path.join(source, "config.json"), encoding="utf-8") as file:
                values = json.load(file)
            if values.get("model_type") == "clip":
                return _read_hf_directory(source)
        if os.path.isfile(os.path.join(source, "metadata.json")):
            return _read_keras_hub_preset(source)
        raise InputError(
            "Unrecognised CLIP directory: expected a Hugging Face CLIP directory (config.json "
            "with model_type 'clip'), a keras-hub preset (metadata.json) or our own format "
            f"({CONFIG_FILE}). Received: {source!r} with {sorted(os.listdir(source))}"
        )
    if os.path.isfile(source):
        return _read_openai_file(source)
    raise InputError(
        "CLIP source not found. Pass a local directory or file, 'hf:<repo_id>' or "
        f"'keras_hub:<preset>'. Received: source={source!r}"
    )


# --------------------------------------------------------------------------- prompts


_PROMPT_RENAMES = (
    (re.compile(r"^image_encoder\.initial_prompt$"), "image_encoder.VPT"),
    (
        re.compile(r"^(image_encoder|text_encoder)(\.transformer\.resblocks\.\d+)\.new_prompt$"),
        r"\1\2.VPT_shallow",
    ),
)
_PROMPT_NAMES = re.compile(
    r"^(image_encoder\.VPT|prompt_learner\.ctx|"
    r"(image_encoder|text_encoder)\.transformer\.resblocks\.\d+\.VPT_shallow)$"
)


def _ignored_in_prompts(name: str) -> bool:
    """Derived buffers, and the frozen CLIP weights that Dassl checkpoints also carry: the base
    model comes from `source`, only the prompts come from this file."""
    if name.startswith(("prompt_learner.token_prefix", "prompt_learner.token_suffix")):
        return True
    frozen = name.startswith(("image_encoder.", "text_encoder.")) or name == "logit_scale"
    return frozen and not _PROMPT_NAMES.match(name)


def read_prompts(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a PromptKD/PromptSRC (or MTKD reference) checkpoint, with the MTKD names
    (`initial_prompt`, `new_prompt`) renamed to PromptSRC's (`VPT`, `VPT_shallow`)."""
    path = os.fspath(path)
    tensors = _flat_state_dict(_read_torch(path), path)
    renamed = {}
    for name, array in tensors.items():
        name = name.removeprefix("module.")
        for pattern, replacement in _PROMPT_RENAMES:
            name = pattern.sub(replacement, name)
        renamed[name] = array
    return renamed


def prompt_settings(tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Prompt lengths and depths of a prompt checkpoint (0 where a tower has no prompts)."""
    settings = {}
    for tower, first, pattern in (
        ("vision", "image_encoder.VPT", PROMPTKD_VISION),
        ("text", "prompt_learner.ctx", PROMPTKD_TEXT),
    ):
        layers = {int(m.group(1)): name for name in tensors if (m := pattern.match(name))}
        length = 0
        if first in tensors:
            length = tensors[first].shape[0]
        elif layers:
            length = tensors[layers[min(layers)]].shape[0]
        depth = (max(layers) + 1) if layers else (1 if first in tensors else 0)
        settings[f"{tower}_prompt_length"] = int(length)
        settings[f"{tower}_prompt_depth"] = int(depth)
    if not any(settings.values()):
        raise InputError(
            "No prompt tensors found: expected 'prompt_learner.ctx', 'image_encoder.VPT' and "
            "'…resblocks.<i>.VPT_shallow' (or the MTKD names 'image_encoder.initial_prompt', "
            f"'…new_prompt'). Received names such as {sorted(tensors)[:8]}"
        )
    return settings


# --------------------------------------------------------------------------- load / save


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
            sources.append(Source(description, tensors, prompt_table(model), _ignored_in_prompts))
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
        table[variable.path] = [(variable, _same)]
        tensors[variable.path] = np.asarray(variable)
    return Source("fresh prompts", tensors, table)


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
