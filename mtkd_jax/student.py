"""The student: an image encoder, a projector to the teacher's embedding size, and (stage 2) a
residual adapter.

Two kinds of encoder:

- `clip_student(...)`: the paper's student, a CLIP ViT image encoder (e.g. ViT-B/16) whose weights
  are frozen, with learnable visual deep prompts (the same IVLP prompts as the teacher's);
- `backbone_student(...)`: any keras-hub image backbone (a preset name or a backbone built from a
  config with random weights), globally average-pooled, trained whole: the deployment-size
  network (MobileNet / EfficientNet / ResNet).

The projector is the reference implementation's 1×1-conv projector as dense layers:
`Dense(d_s → d_t, no bias) → BatchNorm → ReLU → Dense(d_t → d_t, no bias)`.

Which variables train is decided by the stage, nothing else:

- stage 1 (`student.use_adapter is False`): prompts (or the whole light backbone) + projector;
- stage 2 (`student.start_adapter_stage()`): only the adapter; everything else frozen, the
  projector's BatchNorm then runs on its moving statistics.

The student's variables are the same in both stages (the adapter exists from the start, unused
and frozen in stage 1), so one checkpoint layout serves both. Call it statelessly from a jitted
step: `features, non_trainable = student.stateless_call(trainable, non_trainable, images,
training=True)`, features `[batch, d_t]`.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import layers, ops

from mtkd_jax.clip.config import CLIPConfig
from mtkd_jax.clip.model import CLIP, VisionTransformer, vision_transformer


@keras.saving.register_keras_serializable(package="mtkd_jax")
class Projector(layers.Layer):
    """`Dense(no bias) → BatchNorm → ReLU → Dense(no bias)`: `[batch, d_s]` → `[batch, d_t]`."""

    def __init__(self, output_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        dtype = self.dtype_policy
        self.dense_in = layers.Dense(output_dim, use_bias=False, dtype=dtype, name="dense_in")
        self.norm = layers.BatchNormalization(epsilon=1e-5, momentum=0.9, dtype=dtype, name="norm")
        self.dense_out = layers.Dense(output_dim, use_bias=False, dtype=dtype, name="dense_out")

    def build(self, input_shape):
        self.dense_in.build(input_shape)
        self.norm.build((None, self.output_dim))
        self.dense_out.build((None, self.output_dim))

    def call(self, x, training=None):
        x = self.norm(self.dense_in(x), training=training)
        return self.dense_out(ops.relu(x))

    def get_config(self):
        return {**super().get_config(), "output_dim": self.output_dim}


@keras.saving.register_keras_serializable(package="mtkd_jax")
class ResidualAdapter(layers.Layer):
    """`ratio · ReLU(W₂ ReLU(W₁ x)) + (1 − ratio) · x`, no biases; `[batch, d]` → `[batch, d]`.

    `W₁: d → d // reduction` (at least 1), `W₂: d // reduction → d`. Paper: reduction 24,
    ratio 0.2 (CLIP-Adapter's form).
    """

    def __init__(self, reduction: int = 24, ratio: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if reduction <= 0 or not 0.0 <= ratio <= 1.0:
            raise ValueError(
                "reduction must be positive and ratio in [0, 1]. "
                f"Received: reduction={reduction!r}, ratio={ratio!r}"
            )
        self.reduction, self.ratio = reduction, ratio

    def build(self, input_shape):
        dim = int(input_shape[-1])
        dtype = self.dtype_policy
        self.down = layers.Dense(
            max(1, dim // self.reduction), use_bias=False, dtype=dtype, name="down"
        )
        self.up = layers.Dense(dim, use_bias=False, dtype=dtype, name="up")
        self.down.build(input_shape)
        self.up.build((None, max(1, dim // self.reduction)))

    def call(self, x):
        adapted = ops.relu(self.up(ops.relu(self.down(x))))
        return self.ratio * adapted + (1.0 - self.ratio) * x

    def get_config(self):
        return {**super().get_config(), "reduction": self.reduction, "ratio": self.ratio}


@keras.saving.register_keras_serializable(package="mtkd_jax")
class PooledBackbone(layers.Layer):
    """A keras-hub (or any Keras) image backbone followed by global average pooling.

    Feature maps `[batch, h, w, c]` are averaged over space, token sequences `[batch, n, c]` over
    tokens; output `[batch, c]`.
    """

    def __init__(self, backbone: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    @property
    def output_dim(self) -> int:
        return int(self.backbone.output.shape[-1])

    def build(self, input_shape=None):
        self.backbone.build(self.backbone.input.shape)

    def call(self, images, training=None):
        features = self.backbone(images, training=training)
        if isinstance(features, dict):
            raise ValueError(
                "The backbone returns a dict; PooledBackbone needs a single feature map. "
                f"Received keys: {sorted(features)}"
            )
        return ops.mean(features, axis=tuple(range(1, len(features.shape) - 1)))

    def get_config(self):
        return {**super().get_config(), "backbone": keras.layers.serialize(self.backbone)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.layers.deserialize(config["backbone"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="mtkd_jax")
class Student(keras.Model):
    """Image encoder → projector → (stage 2) residual adapter: images → features `[batch, d_t]`.

    Args:
        encoder: a `VisionTransformer` (CLIP student, frozen except its prompts) or a
            `PooledBackbone` (light student, trained whole).
        teacher_dim: `d_t`, the teacher's embedding size.
        use_adapter: stage 2 when True (only the adapter trains).
        adapter_reduction, adapter_ratio: the adapter's shape (paper: 24, 0.2).
    """

    def __init__(
        self,
        encoder: layers.Layer,
        teacher_dim: int,
        *,
        use_adapter: bool = False,
        adapter_reduction: int = 24,
        adapter_ratio: float = 0.2,
        name: str = "student",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if not isinstance(encoder, (VisionTransformer, PooledBackbone)):
            raise ValueError(
                "encoder must be a VisionTransformer or a PooledBackbone (see clip_student and "
                f"backbone_student). Received: {type(encoder).__name__}"
            )
        self.encoder = encoder
        self.teacher_dim = teacher_dim
        self.adapter_reduction, self.adapter_ratio = adapter_reduction, adapter_ratio
        self.projector = Projector(teacher_dim, dtype=self.dtype_policy, name="projector")
        self.adapter = ResidualAdapter(
            adapter_reduction, adapter_ratio, dtype=self.dtype_policy, name="adapter"
        )
        if not encoder.built:
            encoder.build()
        self.projector.build((None, self.encoder_dim))
        self.adapter.build((None, teacher_dim))
        self.built = True
        self.use_adapter = False
        self._set_trainable()
        if use_adapter:
            self.start_adapter_stage()

    @property
    def encoder_dim(self) -> int:
        """`d_s`, the encoder's output size."""
        if isinstance(self.encoder, VisionTransformer):
            return self.encoder.embed_dim
        return self.encoder.output_dim

    @property
    def image_size(self) -> int | None:
        if isinstance(self.encoder, VisionTransformer):
            return self.encoder.image_size
        return self.encoder.backbone.input.shape[1]

    def _set_trainable(self) -> None:
        if self.use_adapter:
            self.encoder.trainable = False
            self.projector.trainable = False
            self.adapter.trainable = True
            return
        self.encoder.trainable = True
        if isinstance(self.encoder, VisionTransformer):
            for layer in self.encoder.encoder_layers():
                layer.trainable = False
        self.projector.trainable = True
        self.adapter.trainable = False

    def start_adapter_stage(self) -> Student:
        """Stage 2: freeze encoder and projector, train only the adapter; returns `self`."""
        self.use_adapter = True
        self._set_trainable()
        return self

    def call(self, images, training=None):
        features = self.projector(self.encoder(images, training=training), training=training)
        if self.use_adapter:
            features = self.adapter(features)
        return features

    def get_config(self) -> dict[str, Any]:
        return {
            "encoder": keras.layers.serialize(self.encoder),
            "teacher_dim": self.teacher_dim,
            "use_adapter": self.use_adapter,
            "adapter_reduction": self.adapter_reduction,
            "adapter_ratio": self.adapter_ratio,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Student:
        config = dict(config)
        config["encoder"] = keras.layers.deserialize(config.pop("encoder"))
        return cls(**config)


def clip_student(
    clip: CLIP | CLIPConfig,
    teacher_dim: int,
    *,
    prompt_length: int = 4,
    prompt_depth: int = 9,
    use_adapter: bool = False,
    adapter_reduction: int = 24,
    adapter_ratio: float = 0.2,
    dtype=None,
) -> Student:
    """The paper's student: a CLIP image encoder + fresh visual deep prompts + projector.

    Args:
        clip: a loaded `CLIP` (its vision weights are copied, e.g. ViT-B/16) or a `CLIPConfig`
            (random weights, e.g. `CLIPConfig.preset("tiny-student")` for the offline demo).
        teacher_dim: the teacher's embedding size (768 for ViT-L/14).
        prompt_length, prompt_depth: the student's visual prompts (paper: 4, 9); 0, 0 for none.
    """
    config = clip.config if isinstance(clip, CLIP) else clip
    if not isinstance(config, CLIPConfig):
        raise ValueError(f"clip must be a CLIP or a CLIPConfig. Received: {type(clip).__name__}")
    config = config.replace(vision_prompt_length=prompt_length, vision_prompt_depth=prompt_depth)
    encoder = vision_transformer(config, dtype=dtype, name="encoder")
    if isinstance(clip, CLIP):
        for source, target in zip(
            clip.visual.encoder_layers(), encoder.encoder_layers(), strict=True
        ):
            for from_variable, to_variable in zip(source.weights, target.weights, strict=True):
                to_variable.assign(from_variable.value)
    return Student(
        encoder,
        teacher_dim,
        use_adapter=use_adapter,
        adapter_reduction=adapter_reduction,
        adapter_ratio=adapter_ratio,
        dtype=dtype,
    )


def backbone_student(
    backbone: str | keras.Model,
    teacher_dim: int,
    *,
    use_adapter: bool = False,
    adapter_reduction: int = 24,
    adapter_ratio: float = 0.2,
    load_weights: bool = True,
    dtype=None,
) -> Student:
    """A light student: a keras-hub image backbone (preset name, or a built backbone such as
    `keras_hub.models.ResNetBackbone(...)` with random weights) + pooling + projector.

    Images are fed as the teacher gets them (CLIP-normalised), so fine-tune the whole backbone.
    """
    if isinstance(backbone, str):
        import keras_hub

        backbone = keras_hub.models.Backbone.from_preset(
            backbone, load_weights=load_weights, dtype=dtype
        )
    if not isinstance(backbone, keras.Model):
        raise ValueError(
            "backbone must be a keras-hub preset name or a Keras model. "
            f"Received: {type(backbone).__name__}"
        )
    encoder = PooledBackbone(backbone, dtype=dtype, name="encoder")
    return Student(
        encoder,
        teacher_dim,
        use_adapter=use_adapter,
        adapter_reduction=adapter_reduction,
        adapter_ratio=adapter_ratio,
        dtype=dtype,
    )


# The embedded students, built from random weights and trained whole. `tiny_resnet` (the
# demo's) is keras-hub's ResNet in a small shape: 14.5 MFLOPs per 32-px image against the shapes
# teacher's 121 (XLA's count, `measured_flops`), 8x fewer. `tiny_vit` is a 2-layer CLIP ViT (7.6x
# fewer); it exercises the CLIP-student path (prompts, `clip_student`) in smoke runs.
TINY_RESNET = {
    "input_conv_filters": [64], "input_conv_kernel_sizes": [3], "stackwise_num_filters": [64, 128],
    "stackwise_num_blocks": [1, 1], "stackwise_num_strides": [1, 2], "block_type": "basic_block",
}  # fmt: skip
TINY_VIT = {
    "embed_dim": 64, "image_size": 32, "patch_size": 4, "vision_width": 64, "vision_layers": 2,
    "vision_heads": 2, "text_width": 64, "text_layers": 1, "text_heads": 2,
}  # fmt: skip


def init_seed(seed: int) -> int:
    """The seed every fresh student of a run is built from: a function of the run's seed only,
    so every student of the run (each stage-1 variant, the supervised baseline) starts from the
    same initial weights."""
    from mtkd_jax.stages import stable_hash

    return (int(seed) * 1_000_003 + stable_hash("student")) % (2**31 - 1)


def build_student(config, *, teacher_dim: int, image_size: int, adapter: bool) -> Student:
    """A fresh student for `config.student` (`RunConfig`), adapter in use when `adapter`.

    `tiny_resnet` (the demo's) and `tiny_vit` are trained whole from random weights;
    `clip:<source>` is the paper's frozen CLIP image encoder (loaded from `<source>`) with
    visual deep prompts; `keras_hub:<preset>` a light keras-hub backbone trained whole.
    """
    from mtkd_jax.config import STUDENT_KINDS
    from mtkd_jax.errors import InputError

    spec, dtype = config.student, config.keras_dtype
    keras.utils.set_random_seed(init_seed(config.seed))
    common = dict(
        use_adapter=adapter,
        adapter_reduction=config.reduction,
        adapter_ratio=config.residual_ratio,
        dtype=dtype,
    )
    prompts = dict(
        prompt_length=config.student_prompt_length, prompt_depth=config.student_prompt_depth
    )
    if spec == "tiny_vit":
        vit = CLIPConfig(**{**TINY_VIT, "image_size": image_size})
        student = clip_student(vit, teacher_dim, **prompts, **common)
        if not adapter:  # From scratch: the whole encoder learns in stage 1.
            for layer in student.encoder.encoder_layers():
                layer.trainable = True
        return student
    if spec == "tiny_resnet":
        import keras_hub

        backbone = keras_hub.models.ResNetBackbone(
            **{**TINY_RESNET, "image_shape": (image_size, image_size, 3)}, dtype=dtype
        )
        return backbone_student(backbone, teacher_dim, **common)
    if spec.startswith("clip:"):
        from mtkd_jax.clip.load import load as load_clip

        clip = load_clip(spec[len("clip:") :], dtype=dtype or "float32")
        return clip_student(clip, teacher_dim, **prompts, **common)
    if spec.startswith("keras_hub:"):
        return backbone_student(spec[len("keras_hub:") :], teacher_dim, **common)
    raise InputError(f"Unknown --student={spec!r}. Valid kinds: {', '.join(STUDENT_KINDS)}.")


def measured_flops(model: keras.Layer, image_shape: tuple[int, int, int]) -> float:
    """FLOPs of one image through `model` (inference), as XLA's cost analysis counts them."""
    import jax

    values = [v.value for v in model.variables]

    def forward(values, images):
        mapping = list(zip(model.variables, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return model(images, training=False)

    images = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
    compiled = jax.jit(forward).lower(values, images).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis["flops"])
