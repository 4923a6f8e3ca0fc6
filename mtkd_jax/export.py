"""The deployable student: one `.keras` file that classifies images with no teacher, no text.

`DeployedClassifier` wraps the trained student (image encoder + prompts + projector + adapter)
with the teacher's class text features `[classes, dim]` (stored as a frozen weight), its logit
scale and the class names, so that `keras.saving.load_model(path)` alone gives
`images [batch, H, W, 3] (CLIP-normalised) -> logits [batch, classes]`. Saved atomically.
"""

import os
from pathlib import Path

import keras
import numpy as np
from keras import ops

import mtkd_jax  # noqa: F401  (sets KERAS_BACKEND=jax)
from mtkd_jax import atomic
from mtkd_jax import student as student_lib  # noqa: F401  (registers the student's layers)


@keras.saving.register_keras_serializable(package="mtkd_jax")
class DeployedClassifier(keras.Model):
    """Student features against fixed class text features: images -> logits `[batch, classes]`.

    Args:
      student: the trained `mtkd_jax.student.Student`.
      num_classes, embed_dim: the shape of the text features.
      logit_scale: CLIP's log temperature (logits are `exp(scale) · cos`).
      classnames: the class names, index = label id.
      image_size: the input resolution the student was trained at.
    """

    def __init__(
        self,
        student,
        num_classes: int,
        embed_dim: int,
        logit_scale: float,
        classnames: list[str],
        image_size: int,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(classnames) != num_classes:
            raise ValueError(
                f"classnames must name each of the {num_classes} classes. "
                f"Received {len(classnames)} names."
            )
        self.student = student
        self.num_classes, self.embed_dim = int(num_classes), int(embed_dim)
        self.logit_scale = float(logit_scale)
        self.classnames = list(classnames)
        self.image_size = int(image_size)
        self.text_features = self.add_weight(
            shape=(self.num_classes, self.embed_dim),
            initializer="zeros",
            trainable=False,
            name="text_features",
        )
        self.built = True

    def call(self, images):
        features = self.student(images, training=False)
        features = features / ops.norm(features, axis=-1, keepdims=True)
        text = ops.cast(self.text_features, features.dtype)
        return float(np.exp(self.logit_scale)) * ops.matmul(features, ops.transpose(text))

    def get_config(self):
        return {
            "student": keras.layers.serialize(self.student),
            "num_classes": self.num_classes,
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "classnames": self.classnames,
            "image_size": self.image_size,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.layers.deserialize(config.pop("student"))
        return cls(**config)


def export_classifier(
    student,
    text_features: np.ndarray,
    logit_scale: float,
    classnames: list[str],
    image_size: int,
    path: str | os.PathLike,
) -> Path:
    """Writes the deployable classifier to `path` (a `.keras` file), atomically.

    Args:
      student: the trained student.
      text_features: `[classes, dim]` normalised class text features of the teacher.
      logit_scale: the teacher's logit scale (log).
      classnames: `[classes]` names.
      image_size: the input resolution.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"The exported model must be a .keras file. Received: {path}")
    text_features = np.asarray(text_features, np.float32)
    model = DeployedClassifier(
        student,
        num_classes=text_features.shape[0],
        embed_dim=text_features.shape[1],
        logit_scale=logit_scale,
        classnames=classnames,
        image_size=image_size,
        name="mtkd_student",
    )
    model.text_features.assign(text_features)
    with atomic.replacing(path, suffix=".keras") as tmp:
        model.save(tmp)
    return path


def load_classifier(path: str | os.PathLike) -> DeployedClassifier:
    """Reads a classifier written by `export_classifier` (Keras safe mode: no code is run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No exported model at {path}. Stage 2 writes <workdir>/student.keras "
            "(python -m mtkd_jax.main --stage=2 ... --export)."
        )
    model = keras.saving.load_model(path, safe_mode=True)
    if not isinstance(model, DeployedClassifier):
        raise ValueError(f"{path} is a Keras model but not an mtkd_jax exported student.")
    return model
