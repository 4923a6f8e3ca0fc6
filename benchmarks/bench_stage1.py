"""Throughput of the paper's stage-1 step, float32 against bfloat16, in one run.

    .venv/bin/python benchmarks/bench_stage1.py                                  # paper sizes
    .venv/bin/python benchmarks/bench_stage1.py --teacher=tiny-teacher --student=tiny-student \\
        --image_size=32 --batch_size=16 --steps=3                                # CPU smoke

Builds the teacher (CLIP `--teacher` preset with deep prompts, as stage 0 leaves it) and the
student (`--student` preset image encoder, frozen, with visual deep prompts and the projector)
with random weights (no download; the cost of a step does not depend on the values), then
times the real stage-1 step: `objectives.distillation_loss` (teacher forward, student forward and
backward, all three KD levels at the paper's five temperatures) inside
`train.make_train_step`, with the batch sharded over every device. Both precisions start from
the same weights and see the same batch, so the first step's loss also shows how far bfloat16
moves it. `--dtypes=bfloat16,bfloat16:xla` also compares Keras's own attention choice, which
the models use (cuDNN flash attention where it accepts the shapes), with XLA everywhere.
Prints one JSON line per setting and one with each ratio; the ratios are the numbers to quote,
since they come from one process on one machine. Measured numbers: docs/training.md.

Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from step_timing import time_train_step  # noqa: E402

from mtkd_jax import objectives, train  # noqa: E402
from mtkd_jax.clip import CLIP, CLIPConfig  # noqa: E402
from mtkd_jax.optim import make_optimizer  # noqa: E402
from mtkd_jax.student import clip_student  # noqa: E402

TEMPERATURES = (1.0, 2.0, 3.0, 5.0, 6.0)


def build_models(args, policy):
    """Teacher and student with the same random weights whatever the precision policy."""
    keras.utils.set_random_seed(0)
    prompts = dict(
        vision_prompt_length=4, vision_prompt_depth=args.teacher_prompt_depth,
        text_prompt_length=4, text_prompt_depth=args.teacher_prompt_depth,
    )  # fmt: skip
    teacher_config = CLIPConfig.preset(args.teacher, image_size=args.image_size, **prompts)
    teacher = CLIP(teacher_config, dtype=policy)
    student_config = CLIPConfig.preset(args.student, image_size=args.image_size)
    student = clip_student(
        student_config,
        teacher_config.embed_dim,
        prompt_length=4,
        prompt_depth=args.student_prompt_depth,
        dtype=policy,
    )
    return teacher, student


def force_xla_attention(*models) -> None:
    """Makes every attention block use XLA's attention instead of Keras's own choice (cuDNN /
    Splash flash kernels where they accept the shapes), for comparison."""
    for model in models:
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.MultiHeadAttention):
                layer._flash_attention = False


def time_step(args, dtype: str, images: np.ndarray, text: np.ndarray) -> dict:
    dtype, _, attention = dtype.partition(":")
    policy = "mixed_bfloat16" if dtype == "bfloat16" else None
    teacher, student = build_models(args, policy)
    if attention == "xla":
        force_xla_attention(teacher, student)
    mesh = train.make_mesh()
    loss_fn = objectives.distillation_loss(
        student, teacher, temperatures=TEMPERATURES, weights=(1.0, 1.0, 1.0), kd_weight=1.0
    )
    frozen = objectives.DistillationInputs(
        teacher=train.model_variables(teacher),
        text=jax.numpy.asarray(text),
        scale=jax.numpy.float32(np.log(100.0)),
    )
    optimizer = make_optimizer(epochs=2, warmup_epochs=1, steps_per_epoch=args.steps + 2)
    state = train.init_train_state(*train.model_variables(student), optimizer, seed=0, mesh=mesh)
    step = train.make_train_step(loss_fn, optimizer, mesh, frozen=frozen)
    batch = train.shard_batch({"images": images}, mesh)

    timing = time_train_step(step, state, batch, args.steps)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "dtype": dtype,
        "attention": attention or "keras",
        "device": jax.devices()[0].device_kind,
        "devices": len(jax.devices()),
        "teacher": args.teacher,
        "student": args.student,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "compile_s": round(timing.compile_s, 2),
        "steps_per_s": round(timing.steps_per_s, 3),
        "images_per_s": round(timing.steps_per_s * args.batch_size, 1),
        "first_loss": float(timing.first_measurements["loss"]),
        "final_loss": float(timing.last_measurements["loss"]),
        "trace_count": step.trace_count,
        # The process's peak so far (earlier precisions included), where the device reports it.
        "peak_device_gib_so_far": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="ViT-L/14", help="CLIPConfig preset of the teacher")
    parser.add_argument("--student", default="ViT-B/16", help="CLIPConfig preset of the student")
    parser.add_argument("--teacher_prompt_depth", type=int, default=9)
    parser.add_argument("--student_prompt_depth", type=int, default=9)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=37)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="comma-separated; ':xla' after one forces XLA attention instead of Keras's choice",
    )
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = rng.normal(size=shape).astype(np.float32)
    teacher_dim = CLIPConfig.preset(args.teacher).embed_dim
    text = rng.normal(size=(args.classes, teacher_dim)).astype(np.float32)

    results = {}
    for dtype in args.dtypes.split(","):
        results[dtype] = time_step(args, dtype, images, text)
        print(json.dumps(results[dtype]), flush=True)
    if {"bfloat16", "bfloat16:xla"} <= set(results):
        ratio = results["bfloat16"]["steps_per_s"] / results["bfloat16:xla"]["steps_per_s"]
        print(json.dumps({"keras_over_xla_attention_bfloat16": round(ratio, 3)}))
    if {"float32", "bfloat16"} <= set(results):
        f32, bf16 = results["float32"], results["bfloat16"]
        moved = abs(bf16["first_loss"] - f32["first_loss"]) / abs(f32["first_loss"])
        print(
            json.dumps(
                {
                    "bfloat16_speedup": round(bf16["steps_per_s"] / f32["steps_per_s"], 2),
                    "first_loss_relative_difference": float(f"{moved:.2e}"),
                }
            )
        )


if __name__ == "__main__":
    main()
