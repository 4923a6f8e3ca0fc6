"""CLIP (OpenAI architecture) as a Keras 3 model, with optional deep prompts (IVLP).

The transformer blocks are keras-hub's `CLIPEncoderLayer` (pre-LayerNorm, multi-head attention,
an MLP of `CLIPConfig.vision_mlp_size` / `text_mlp_size`, OpenAI's 4 × width by default): the same
math as OpenAI's `ResidualAttentionBlock`. What
keras-hub lacks is written here: the embeddings without keras-hub's integer `position_ids`
variable, the deep prompts, pooling and projections as OpenAI lays them out.

Deep prompts follow PromptSRC / PromptKD (their `IVLP` trainer):

- vision: `n` learnable tokens are appended after the patch tokens (after the positional
  embedding, before `ln_pre`); before each layer `i` in `1 … depth-1` the last `n` tokens are
  replaced by that layer's own learnable tokens;
- text: the `n` tokens after start-of-text are learnable context vectors (whatever ids the
  caller put there are placeholders); before each layer `i` in `1 … depth-1`, positions `1 … n`
  are replaced by that layer's tokens.

Every prompt variable is called `prompt_<layer>` inside a layer called `prompts`, so
`"prompt" in variable.path` selects them; `CLIP.freeze_encoders()` leaves only them trainable.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers, ops
from keras_hub.src.models.clip.clip_layers import CLIPEncoderLayer

from mtkd_jax.clip import attention_log
from mtkd_jax.clip.config import CLIPConfig

PROMPT_INIT_STDDEV = 0.02
attention_log.install()  # Keras's flash-attention fallbacks: one warning, not a traceback each.


@keras.saving.register_keras_serializable(package="mtkd_jax")
class VisionEmbedding(layers.Layer):
    """Patch embedding (conv, no bias) + class token + learned positions.

    Input `[batch, image_size, image_size, 3]` → output `[batch, 1 + num_patches, width]`.
    """

    def __init__(self, width: int, patch_size: int, image_size: int, **kwargs):
        super().__init__(**kwargs)
        self.width, self.patch_size, self.image_size = width, patch_size, image_size
        self.num_positions = (image_size // patch_size) ** 2 + 1
        self.patch_conv = layers.Conv2D(
            width,
            kernel_size=patch_size,
            strides=patch_size,
            use_bias=False,
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="patch_conv",
        )

    def build(self, input_shape=None):
        self.patch_conv.build((None, self.image_size, self.image_size, 3))
        init = keras.initializers.RandomNormal(stddev=self.width**-0.5)
        self.class_embedding = self.add_weight(
            shape=(self.width,), initializer=init, name="class_embedding"
        )
        self.position_embedding = self.add_weight(
            shape=(self.num_positions, self.width), initializer=init, name="position_embedding"
        )

    def call(self, images):
        patches = self.patch_conv(images)
        batch = ops.shape(patches)[0]
        patches = ops.reshape(patches, (batch, -1, self.width))
        cls = ops.cast(self.class_embedding, patches.dtype)
        cls = ops.broadcast_to(cls, (batch, 1, self.width))
        tokens = ops.concatenate([cls, patches], axis=1)
        return tokens + ops.cast(self.position_embedding, tokens.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
        }


@keras.saving.register_keras_serializable(package="mtkd_jax")
class TextEmbedding(layers.Layer):
    """Token embedding `[vocab, width]` and learned positions `[context, width]`.

    `call` returns the token embeddings only `[batch, context, width]`; the positions are added
    by the text tower after the prompt tokens are put in place.
    """

    def __init__(self, vocab_size: int, width: int, context_length: int, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.width, self.context_length = vocab_size, width, context_length
        self.token_embedding = layers.Embedding(
            vocab_size,
            width,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=self.dtype_policy,
            name="token_embedding",
        )

    def build(self, input_shape=None):
        self.token_embedding.build((None, self.context_length))
        self.position_embedding = self.add_weight(
            shape=(self.context_length, self.width),
            initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="position_embedding",
        )

    def call(self, token_ids):
        return self.token_embedding(token_ids)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "width": self.width,
            "context_length": self.context_length,
        }


@keras.saving.register_keras_serializable(package="mtkd_jax")
class DeepPrompts(layers.Layer):
    """Learnable prompt tokens of layers `0 … depth-1`: variables `prompt_<i>` `[length, width]`."""

    def __init__(self, length: int, depth: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.length, self.depth, self.width = length, depth, width

    def build(self, input_shape=None):
        init = keras.initializers.RandomNormal(stddev=PROMPT_INIT_STDDEV)
        self.tokens = [
            self.add_weight(shape=(self.length, self.width), initializer=init, name=f"prompt_{i}")
            for i in range(self.depth)
        ]

    def for_layer(self, layer: int, batch, dtype):
        """Prompt tokens of one layer broadcast to `[batch, length, width]`."""
        tokens = ops.cast(self.tokens[layer], dtype)
        return ops.broadcast_to(tokens[None], (batch, self.length, self.width))

    def get_config(self):
        return {
            **super().get_config(),
            "length": self.length,
            "depth": self.depth,
            "width": self.width,
        }


def _encoder_layers(width, heads, mlp_dim, num_layers, activation, epsilon, causal, dtype):
    """keras-hub's CLIP blocks, with `epsilon` in both LayerNorms.

    keras-hub builds them with OpenAI's 1e-5; other CLIPs (e.g. some LAION ones) use another
    value, which is set on the (not yet built) LayerNorms' public `epsilon` attribute.
    """
    blocks = []
    for i in range(num_layers):
        block = CLIPEncoderLayer(
            width,
            heads,
            mlp_dim,
            activation,
            use_causal_mask=causal,
            dtype=dtype,
            name=f"block_{i}",
        )
        block.layer_norm_1.epsilon = block.layer_norm_2.epsilon = epsilon
        blocks.append(block)
    return blocks


@keras.saving.register_keras_serializable(package="mtkd_jax")
class VisionTransformer(layers.Layer):
    """CLIP image encoder: images `[batch, H, W, 3]` (CLIP-normalised) → features `[batch, embed]`.

    Sub-layers: `embedding`, `prompts` (if any), `ln_pre`, `block_<i>`, `ln_post`, `projection`.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        num_layers: int,
        heads: int,
        embed_dim: int,
        activation: str = "quick_gelu",
        prompt_length: int = 0,
        prompt_depth: int = 0,
        mlp_dim: int = 0,
        layer_norm_eps: float = 1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.num_layers, self.heads, self.embed_dim = num_layers, heads, embed_dim
        self.activation = activation
        self.prompt_length, self.prompt_depth = prompt_length, prompt_depth
        self.mlp_dim, self.layer_norm_eps = mlp_dim or 4 * width, layer_norm_eps
        epsilon = layer_norm_eps
        dtype = self.dtype_policy
        self.embedding = VisionEmbedding(
            width, patch_size, image_size, dtype=dtype, name="embedding"
        )
        self.prompts = (
            DeepPrompts(prompt_length, prompt_depth, width, dtype=dtype, name="prompts")
            if prompt_depth
            else None
        )
        self.ln_pre = layers.LayerNormalization(epsilon=epsilon, dtype=dtype, name="ln_pre")
        self.blocks = _encoder_layers(
            width, heads, self.mlp_dim, num_layers, activation, epsilon, False, dtype
        )
        self.ln_post = layers.LayerNormalization(epsilon=epsilon, dtype=dtype, name="ln_post")
        self.projection = layers.Dense(embed_dim, use_bias=False, dtype=dtype, name="projection")

    def build(self, input_shape=None):
        self.embedding.build()
        if self.prompts is not None:
            self.prompts.build()
        tokens = (None, self.embedding.num_positions + self.prompt_length, self.width)
        self.ln_pre.build(tokens)
        for block in self.blocks:
            block.build(tokens)
        self.ln_post.build((None, self.width))
        self.projection.build((None, self.width))

    def encoder_layers(self) -> list:
        """Every sub-layer except the prompts (what a frozen encoder freezes)."""
        return [self.embedding, self.ln_pre, *self.blocks, self.ln_post, self.projection]

    def call(self, images, training=None):
        x = self.embedding(images)
        batch = ops.shape(x)[0]
        if self.prompts is not None:
            x = ops.concatenate([x, self.prompts.for_layer(0, batch, x.dtype)], axis=1)
        x = self.ln_pre(x)
        for i, block in enumerate(self.blocks):
            if 0 < i < self.prompt_depth:
                x = ops.concatenate(
                    [x[:, : -self.prompt_length], self.prompts.for_layer(i, batch, x.dtype)],
                    axis=1,
                )
            x = block(x, training=training)
        return self.projection(self.ln_post(x[:, 0]))

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "width": self.width,
            "num_layers": self.num_layers,
            "heads": self.heads,
            "embed_dim": self.embed_dim,
            "activation": self.activation,
            "prompt_length": self.prompt_length,
            "prompt_depth": self.prompt_depth,
            "mlp_dim": self.mlp_dim,
            "layer_norm_eps": self.layer_norm_eps,
        }


@keras.saving.register_keras_serializable(package="mtkd_jax")
class TextTransformer(layers.Layer):
    """CLIP text encoder: token ids `[batch, context]` → features `[batch, embed]`.

    Causal attention; pooled at the end-of-text token, found as the largest id of each row (as
    OpenAI and PromptKD do: end-of-text is the last entry of the vocabulary).
    Sub-layers: `embedding`, `prompts` (if any), `block_<i>`, `ln_final`, `projection`.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        num_layers: int,
        heads: int,
        embed_dim: int,
        activation: str = "quick_gelu",
        prompt_length: int = 0,
        prompt_depth: int = 0,
        mlp_dim: int = 0,
        layer_norm_eps: float = 1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.num_layers, self.heads, self.embed_dim = num_layers, heads, embed_dim
        self.activation = activation
        self.prompt_length, self.prompt_depth = prompt_length, prompt_depth
        self.mlp_dim, self.layer_norm_eps = mlp_dim or 4 * width, layer_norm_eps
        epsilon = layer_norm_eps
        dtype = self.dtype_policy
        self.embedding = TextEmbedding(
            vocab_size, width, context_length, dtype=dtype, name="embedding"
        )
        self.prompts = (
            DeepPrompts(prompt_length, prompt_depth, width, dtype=dtype, name="prompts")
            if prompt_depth
            else None
        )
        self.blocks = _encoder_layers(
            width, heads, self.mlp_dim, num_layers, activation, epsilon, True, dtype
        )
        self.ln_final = layers.LayerNormalization(epsilon=epsilon, dtype=dtype, name="ln_final")
        self.projection = layers.Dense(embed_dim, use_bias=False, dtype=dtype, name="projection")

    def build(self, input_shape=None):
        self.embedding.build()
        if self.prompts is not None:
            self.prompts.build()
        tokens = (None, self.context_length, self.width)
        for block in self.blocks:
            block.build(tokens)
        self.ln_final.build(tokens)
        self.projection.build((None, self.width))

    def encoder_layers(self) -> list:
        """Every sub-layer except the prompts (what a frozen encoder freezes)."""
        return [self.embedding, *self.blocks, self.ln_final, self.projection]

    def _with_prompt(self, x, layer):
        n = self.prompt_length
        batch = ops.shape(x)[0]
        return ops.concatenate(
            [x[:, :1], self.prompts.for_layer(layer, batch, x.dtype), x[:, 1 + n :]], axis=1
        )

    def call(self, token_ids, training=None):
        token_ids = ops.convert_to_tensor(token_ids, dtype="int32")
        x = self.embedding(token_ids)
        if self.prompts is not None:
            x = self._with_prompt(x, 0)
        x = x + ops.cast(self.embedding.position_embedding, x.dtype)
        for i, block in enumerate(self.blocks):
            if 0 < i < self.prompt_depth:
                x = self._with_prompt(x, i)
            x = block(x, training=training)
        x = self.ln_final(x)
        eot = ops.argmax(token_ids, axis=-1)
        pooled = ops.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        return self.projection(pooled)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "context_length": self.context_length,
            "width": self.width,
            "num_layers": self.num_layers,
            "heads": self.heads,
            "embed_dim": self.embed_dim,
            "activation": self.activation,
            "prompt_length": self.prompt_length,
            "prompt_depth": self.prompt_depth,
            "mlp_dim": self.mlp_dim,
            "layer_norm_eps": self.layer_norm_eps,
        }


def vision_transformer(config: CLIPConfig, *, dtype=None, name: str = "visual"):
    """A built `VisionTransformer` for the vision half of `config` (also used by the student)."""
    tower = VisionTransformer(
        image_size=config.image_size,
        patch_size=config.patch_size,
        width=config.vision_width,
        num_layers=config.vision_layers,
        heads=config.vision_heads,
        embed_dim=config.embed_dim,
        activation=config.activation,
        prompt_length=config.vision_prompt_length,
        prompt_depth=config.vision_prompt_depth,
        mlp_dim=config.vision_mlp_size,
        layer_norm_eps=config.layer_norm_eps,
        dtype=dtype,
        name=name,
    )
    tower.build()
    return tower


def class_token_ids(
    classnames, tokenizer, config: CLIPConfig, template: str = "a photo of a {}."
) -> np.ndarray:
    """Token ids of one prompt per class, `[num_classes, context_length]` int32.

    Without text prompts: `template.format(name)`. With text prompts of length `n`:
    `"X X … X {name}."` (n placeholders, as PromptKD builds them); the placeholders sit at
    positions `1 … n` and are replaced by the learned context inside the model. Underscores in
    class names become spaces.
    """
    names = [str(name).replace("_", " ") for name in classnames]
    if config.text_prompt_length:
        texts = [" ".join(["X"] * config.text_prompt_length) + f" {name}." for name in names]
    else:
        texts = [template.format(name) for name in names]
    return np.asarray(tokenizer.tokenize(texts, context_length=config.context_length), np.int32)


@keras.saving.register_keras_serializable(package="mtkd_jax")
class CLIP(keras.Model):
    """CLIP: a ViT image encoder and a causal text encoder sharing an embedding space.

    The model is built (all variables exist) when constructed. Inputs are NHWC float images
    already normalised with CLIP's mean/std, and int token ids `[N, context_length]`.

    Args:
        config: a `CLIPConfig` (or its dict).
        dtype: Keras dtype policy for weights and compute, e.g. `"float32"`, `"bfloat16"`.

    Example:
    ```python
    model = CLIP(CLIPConfig.preset("tiny"))
    out = model({"images": images, "token_ids": ids})
    out["logits"]  # [num_images, num_texts]
    ```
    """

    def __init__(self, config: CLIPConfig | dict, *, dtype=None, name: str = "clip", **kwargs):
        super().__init__(dtype=dtype, name=name, **kwargs)
        if isinstance(config, dict):
            config = CLIPConfig.from_dict(config)
        if not isinstance(config, CLIPConfig):
            raise ValueError(f"config must be a CLIPConfig or a dict. Received: config={config!r}")
        self.config = config
        self.visual = vision_transformer(config, dtype=self.dtype_policy, name="visual")
        self.text = TextTransformer(
            vocab_size=config.vocab_size,
            context_length=config.context_length,
            width=config.text_width,
            num_layers=config.text_layers,
            heads=config.text_heads,
            embed_dim=config.embed_dim,
            activation=config.activation,
            prompt_length=config.text_prompt_length,
            prompt_depth=config.text_prompt_depth,
            mlp_dim=config.text_mlp_size,
            layer_norm_eps=config.layer_norm_eps,
            dtype=self.dtype_policy,
            name="text",
        )
        self.text.build()
        self.logit_scale = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(float(np.log(1 / 0.07))),
            name="logit_scale",
        )
        self.built = True

    def encode_image(self, images, training=None):
        """Images `[N, H, W, 3]` (CLIP-normalised) → projected, un-normalised features `[N, D]`."""
        return self.visual(images, training=training)

    def encode_text(self, token_ids, training=None):
        """Token ids `[N, context_length]` → projected, un-normalised features `[N, D]`.

        With text prompts, positions `1 … text_prompt_length` are overwritten by the learned
        context; build such ids with `mtkd_jax.clip.class_token_ids`.
        """
        return self.text(token_ids, training=training)

    def logits(self, image_features, text_features):
        """Scaled cosine similarities `[N_images, N_texts]` = exp(logit_scale) · cos."""
        image_features = image_features / ops.norm(image_features, axis=-1, keepdims=True)
        text_features = text_features / ops.norm(text_features, axis=-1, keepdims=True)
        scale = ops.exp(ops.cast(self.logit_scale, image_features.dtype))
        return scale * ops.matmul(image_features, ops.transpose(text_features))

    def call(self, inputs, training=None):
        """`{"images", "token_ids"}` → `{"image_features" [N, D], "text_features" [M, D],
        "logits" [N, M]}`."""
        image_features = self.encode_image(inputs["images"], training=training)
        text_features = self.encode_text(inputs["token_ids"], training=training)
        return {
            "image_features": image_features,
            "text_features": text_features,
            "logits": self.logits(image_features, text_features),
        }

    def prompt_variables(self) -> list:
        """All deep-prompt variables (vision then text)."""
        towers = (self.visual, self.text)
        return [v for tower in towers if tower.prompts is not None for v in tower.prompts.weights]

    def freeze_encoders(self) -> CLIP:
        """Make every weight non-trainable except the deep prompts; returns `self`."""
        for tower in (self.visual, self.text):
            for layer in tower.encoder_layers():
                layer.trainable = False
        self.logit_scale.trainable = False
        return self

    def init_text_prompts(self, token_ids) -> None:
        """Set every text prompt layer to the token embeddings of `token_ids` (ints `[length]`),
        e.g. the ids of "a photo of a" without start/end tokens (PromptSRC's `ctx_init`)."""
        if self.text.prompts is None:
            raise ValueError("This CLIP has no text prompts (text_prompt_depth=0).")
        token_ids = np.asarray(token_ids, dtype="int32")
        if token_ids.shape != (self.config.text_prompt_length,):
            raise ValueError(
                f"Expected {self.config.text_prompt_length} token ids for the text prompt "
                f"initialisation. Received: shape={token_ids.shape}"
            )
        table = self.text.embedding.token_embedding.embeddings
        vectors = ops.take(table, token_ids, axis=0)
        self.text.prompts.tokens[0].assign(vectors)

    def _stateless(self, trainable_variables, non_trainable_variables):
        variables = self.trainable_variables + self.non_trainable_variables
        values = list(trainable_variables) + list(non_trainable_variables)
        if len(values) != len(variables):
            raise ValueError(
                f"Expected {len(self.trainable_variables)} trainable and "
                f"{len(self.non_trainable_variables)} non-trainable values. Received: "
                f"{len(trainable_variables)} and {len(non_trainable_variables)}"
            )
        return keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True)))

    def stateless_encode_image(self, trainable_variables, non_trainable_variables, images):
        """`encode_image` with the given variable values (for use inside `jax.jit`)."""
        with self._stateless(trainable_variables, non_trainable_variables):
            return self.encode_image(images)

    def stateless_encode_text(self, trainable_variables, non_trainable_variables, token_ids):
        """`encode_text` with the given variable values (for use inside `jax.jit`)."""
        with self._stateless(trainable_variables, non_trainable_variables):
            return self.encode_text(token_ids)

    def get_config(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "name": self.name,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CLIP:
        config = dict(config)
        dtype = config.pop("dtype", None)
        if isinstance(dtype, dict):
            dtype = keras.dtype_policies.deserialize(dtype)
        return cls(config.pop("config"), dtype=dtype, **config)
