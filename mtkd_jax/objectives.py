"""The training objectives of the stages, as pure JAX functions (no Keras import).

Every stage is trained by the same loop (`mtkd_jax.train.fit`); `mtkd_jax.stages` says which
objective each stage uses. Each `*_loss` returns a `loss_fn(trainable, non_trainable, batch, rng,
frozen) -> (loss, (new_non_trainable, measurements))` for `mtkd_jax.train.make_train_step`, where
`frozen` is a typed tuple (`TeacherPromptInputs`, `DistillationInputs`, `ClassificationInputs`)
of what the loss reads but never trains (the frozen teacher's variables, the stored class text
features), passed to the compiled step as arguments rather than constants.

* Stage 0 (`teacher_prompt_loss`): the teacher's deep prompts learn cross-entropy on the K-shot
  labels, with PromptSRC's self-regularisation towards the frozen, un-prompted CLIP.
* Stage 1 (`distillation_loss`): the student learns `kd_weight · multilevel_kd(student, teacher)`
  on unlabeled batches (they carry no labels at all).
* Stage 2 and the supervised baseline (`classification_loss`): cross-entropy of the student's
  logits on labeled K-shot batches.

Logits everywhere are `exp(logit_scale) · normalize(image features) · text_featuresᵀ`, with the
teacher's fixed `logit_scale` and its normalised class text features `[classes, dim]`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtkd_jax.losses import instance_kd, multilevel_kd


class TeacherPromptInputs(NamedTuple):
    """What stage 0's loss reads and never trains."""

    token_ids: jax.Array  # int32 [C', context] prompted class token ids of the trained classes
    plain_text: jax.Array  # [C', D] the frozen, un-prompted CLIP's class text features
    label_map: jax.Array  # int32 [C] original label id -> row of the trained classes
    scale: jax.Array  # scalar, the teacher's logit scale


class DistillationInputs(NamedTuple):
    """What stage 1's loss reads and never trains."""

    teacher: tuple[Any, Any]  # (trainable, non_trainable) variable values of the frozen teacher
    text: jax.Array  # [C, D] the teacher's class text features
    scale: jax.Array  # scalar, the teacher's logit scale


class ClassificationInputs(NamedTuple):
    """What stage 2's (and the supervised baseline's) loss reads and never trains."""

    text: jax.Array  # [C', D] text features of the trained classes
    scale: jax.Array  # scalar, the teacher's logit scale
    label_map: jax.Array  # int32 [C] original label id -> row of `text`


def normalize(features: jax.Array) -> jax.Array:
    """L2-normalises the last axis, in float32: `[..., dim]`."""
    features = features.astype(jnp.float32)
    return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def class_logits(
    image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array
) -> jax.Array:
    """`exp(logit_scale) · normalize(image) · normalize(text)ᵀ`: `[batch, classes]` float32.

    Args:
      image_features: `[batch, dim]` projected image features (any float dtype).
      text_features: `[classes, dim]` class text features.
      logit_scale: scalar, CLIP's log temperature.
    """
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    # Full float32 (not TF32 / bfloat16 passes on GPU / TPU): the cosines are scaled by ~100.
    cosines = jnp.matmul(
        normalize(image_features),
        normalize(text_features).T,
        precision=jax.lax.Precision.HIGHEST,
    )
    return scale * cosines


def cross_entropy(logits: jax.Array, labels: jax.Array, where: jax.Array | None) -> jax.Array:
    """Mean softmax cross-entropy over real rows: logits `[batch, classes]`, labels `[batch]`."""
    return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), where)


def _masked_mean(values: jax.Array, where: jax.Array | None) -> jax.Array:
    """Mean of `values` `[batch]` over the real rows (`where` True; None: all rows)."""
    if where is None:
        return jnp.mean(values)
    where = where.astype(jnp.float32)
    return jnp.sum(values * where) / jnp.maximum(jnp.sum(where), 1.0)


def teacher_logits_fn(teacher) -> Callable:
    """`fn(teacher_vars, images, text_features, scale) -> [batch, classes]` of a frozen teacher.

    `teacher_vars` is the `(trainable, non_trainable)` pair of the teacher's variable values.
    """

    def fn(teacher_vars, images, text_features, scale):
        features = teacher.stateless_encode_image(*teacher_vars, images)
        return jax.lax.stop_gradient(class_logits(features, text_features, scale))

    return fn


def distillation_loss(
    student,
    teacher,
    *,
    temperatures,
    weights,
    kd_weight: float,
) -> Callable:
    """Stage 1: `kd_weight · multilevel_kd(student_logits, teacher_logits)` on unlabeled images.

    `frozen` is a `DistillationInputs`. The batch holds `"images"` `[batch, H, W, 3]` and no
    labels.
    """
    teacher_logits = teacher_logits_fn(teacher)
    temperatures, weights = tuple(temperatures), tuple(weights)

    def loss_fn(trainable, non_trainable, batch, rng, frozen):
        del rng
        images = batch["images"]
        targets = teacher_logits(frozen.teacher, images, frozen.text, frozen.scale)
        features, new_non_trainable = student.stateless_call(
            trainable, non_trainable, images, training=True
        )
        logits = class_logits(features, frozen.text, frozen.scale)
        loss, parts = multilevel_kd(
            logits, targets, temperatures=temperatures, weights=weights, where=batch.get("mask")
        )
        measurements = {f"kd_{name}": value for name, value in parts.items()}
        measurements["kd"] = loss
        return kd_weight * loss, (new_non_trainable, measurements)

    return loss_fn


def classification_loss(student) -> Callable:
    """Stage 2 (and the supervised baseline): cross-entropy on labeled images.

    `frozen` is a `ClassificationInputs`. The batch holds `"images"`, `"labels"` (original ids)
    and optionally `"mask"`.
    """

    def loss_fn(trainable, non_trainable, batch, rng, frozen):
        del rng
        features, new_non_trainable = student.stateless_call(
            trainable, non_trainable, batch["images"], training=True
        )
        logits = class_logits(features, frozen.text, frozen.scale)
        labels = frozen.label_map[batch["labels"]]
        loss = cross_entropy(logits, labels, batch.get("mask"))
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        accuracy = _masked_mean(correct, batch.get("mask"))
        return loss, (new_non_trainable, {"ce": loss, "train_accuracy": accuracy})

    return loss_fn


def teacher_prompt_loss(
    teacher,
    plain_teacher,
    plain_values: Callable,
    *,
    regularise: bool,
    text_weight: float,
    image_weight: float,
    logit_weight: float,
) -> Callable:
    """Stage 0: the teacher's deep prompts learn cross-entropy on the K-shot labels.

    With `regularise`, PromptSRC's self-regularisation keeps the prompted model near the frozen
    CLIP: `text_weight · L1(text, frozen text) + image_weight · L1(image, frozen image) +
    logit_weight · KL(frozen zero-shot logits ‖ prompted logits)` on normalised features.

    `plain_values(trainable, non_trainable) -> (plain_trainable, plain_non_trainable)` picks
    the un-prompted CLIP's variable values out of the teacher's (they are the same weights, so
    nothing is copied). `frozen` is a `TeacherPromptInputs`. The logit term is PromptSRC's:
    `instance_kd` at temperature 1 (KL(frozen ‖ prompted) averaged over images) divided by the
    number of classes, i.e. the KL summed over the batch and divided by its number of entries.
    """

    def loss_fn(trainable, non_trainable, batch, rng, frozen):
        del rng
        images = batch["images"]
        image = teacher.stateless_encode_image(trainable, non_trainable, images)
        text = teacher.stateless_encode_text(trainable, non_trainable, frozen.token_ids)
        logits = class_logits(image, text, frozen.scale)
        labels = frozen.label_map[batch["labels"]]
        where = batch.get("mask")
        ce = cross_entropy(logits, labels, where)
        measurements = {"ce": ce}
        loss = ce
        if regularise:
            plain_image = plain_teacher.stateless_encode_image(
                *plain_values(trainable, non_trainable), images
            )
            plain_image = jax.lax.stop_gradient(plain_image)
            plain_logits = class_logits(plain_image, frozen.plain_text, frozen.scale)
            text_l1 = jnp.mean(jnp.abs(normalize(text) - normalize(frozen.plain_text)))
            image_l1 = _masked_mean(
                jnp.mean(jnp.abs(normalize(image) - normalize(plain_image)), axis=-1), where
            )
            logit_kl = instance_kd(logits, plain_logits, where=where) / logits.shape[-1]
            loss = ce + text_weight * text_l1 + image_weight * image_l1 + logit_weight * logit_kl
            measurements.update(reg_text_l1=text_l1, reg_image_l1=image_l1, reg_logit_kl=logit_kl)
        return loss, (non_trainable, measurements)

    return loss_fn
