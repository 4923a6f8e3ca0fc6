"""Steps per second of the shared jitted training step (`mtkd_jax.train.make_train_step`).

A small Keras conv student distilled from a frozen random linear "teacher" with the multi-level
KD loss (instance + batch + class terms, so the loss couples the global batch), SGD with the
paper's schedule. It measures the machinery (sharding, donation, optimizer, measurements), not a
real CLIP: compile time once, then steady-state steps/s and images/s with one host sync per timed
window.

    .venv/bin/python benchmarks/bench_train_step.py                      # CPU, float32
    .venv/bin/python benchmarks/bench_train_step.py --dtype=bfloat16 --batch_size=64 --steps=50
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        .venv/bin/python benchmarks/bench_train_step.py                  # 2 virtual CPU devices

Prints one JSON line: device kind and count, batch size, image size, dtype, compile seconds,
steps/s, images/s, trace count (must be 1), and the loss of the first and the last step.
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from step_timing import time_train_step  # noqa: E402

from mtkd_jax import train  # noqa: E402
from mtkd_jax.losses import multilevel_kd  # noqa: E402
from mtkd_jax.optim import make_optimizer  # noqa: E402


def build_student(image_size: int, classes: int, width: int, dtype: str | None):
    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((image_size, image_size, 3)),
            layers.Conv2D(width, 3, strides=2, activation="gelu", name="conv1", dtype=dtype),
            layers.Conv2D(2 * width, 3, strides=2, activation="gelu", name="conv2", dtype=dtype),
            layers.Conv2D(4 * width, 3, strides=2, activation="gelu", name="conv3", dtype=dtype),
            layers.GlobalAveragePooling2D(name="pool", dtype=dtype),
            layers.LayerNormalization(name="norm", dtype=dtype),
            layers.Dense(classes, name="head", dtype=dtype),
        ],
        name="bench_student",
    )


def make_inputs(batch_size: int, image_size: int, classes: int):
    """The frozen random linear teacher `[3, classes]` and the one batch of images, seeded."""
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(3, classes)).astype(np.float32) / np.sqrt(3)
    images = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
    return projection, images


def teacher_logits(images, projection):
    """The "teacher": mean colour of each image through a fixed random projection, × 10."""
    return jnp.mean(images, axis=(1, 2)) @ projection * 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=37)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps after the warm-up")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    mesh = train.make_mesh()
    policy = "mixed_bfloat16" if args.dtype == "bfloat16" else None
    student = build_student(args.image_size, args.classes, args.width, policy)
    projection, images = make_inputs(args.batch_size, args.image_size, args.classes)
    teacher = {"projection": jnp.asarray(projection)}

    def loss_fn(trainable, non_trainable, batch, key, frozen):
        logits, non_trainable = student.stateless_call(
            trainable, non_trainable, batch["images"], training=True
        )
        targets = teacher_logits(batch["images"], frozen["projection"])
        loss, terms = multilevel_kd(logits.astype(jnp.float32), targets)
        return loss, (non_trainable, {f"kd_{k}": v for k, v in terms.items()})

    total_steps = args.steps + 2
    optimizer = make_optimizer(epochs=2, warmup_epochs=1, steps_per_epoch=total_steps)
    state = train.init_train_state(*train.model_variables(student), optimizer, seed=0, mesh=mesh)
    step = train.make_train_step(loss_fn, optimizer, mesh, frozen=teacher)
    batch = train.shard_batch({"images": images}, mesh)

    timing = time_train_step(step, state, batch, args.steps)

    print(
        json.dumps(
            {
                "device": jax.devices()[0].device_kind,
                "devices": len(jax.devices()),
                "batch_size": args.batch_size,
                "image_size": args.image_size,
                "dtype": args.dtype,
                "compile_s": round(timing.compile_s, 3),
                "steps_per_s": round(timing.steps_per_s, 2),
                "images_per_s": round(timing.steps_per_s * args.batch_size, 1),
                "trace_count": step.trace_count,
                "first_loss": float(timing.first_measurements["loss"]),
                "final_loss": float(timing.last_measurements["loss"]),
            }
        )
    )


if __name__ == "__main__":
    main()
