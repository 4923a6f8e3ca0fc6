"""What distillation buys at deployment: the teacher against the student, as ONNX classifiers.

    .venv/bin/python benchmarks/bench_deploy_cost.py                   # demo and paper sizes
    .venv/bin/python benchmarks/bench_deploy_cost.py --groups=demo     # seconds

Every model is a whole "uint8 image -> class probabilities" classifier, exported the way
`python -m mtkd_jax.export` exports the student (preprocessing in the graph): the teacher is
its CLIP image encoder (with its visual deep prompts) against the stored class text features;
the student its encoder, projector and residual adapter against the same text features.
Weights are random (no download; cost does not depend on the values). Groups:

- `demo`: the shapes teacher (`tiny-teacher`, prompts 4 x depth 3) against the demo's
  `tiny_resnet`, 32 px, 36 classes;
- `paper`: ViT-L/14 with deep prompts (4 x depth 9) against the paper's ViT-B/16 student
  (prompts 4 x depth 9) and against a light keras-hub backbone (ResNet-18 shape, trained whole),
  224 px, 1000 classes (ImageNet's count).

For each: parameters, ONNX file size, GFLOPs per image (XLA's cost analysis of the Keras
forward pass), and `onnxruntime` CPU latency at batch 1 (median; the models of a group are
timed in turns, round after round, so a change in the machine's load hits all of them alike).
Prints one JSON line per model and one per student with its ratios to the teacher; the ratios
are the numbers to quote. Measured: docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from mtkd_jax import export  # noqa: E402
from mtkd_jax import student as student_lib  # noqa: E402
from mtkd_jax.clip import CLIPConfig  # noqa: E402
from mtkd_jax.clip.model import vision_transformer  # noqa: E402

RESNET18 = {
    "input_conv_filters": [64], "input_conv_kernel_sizes": [7],
    "stackwise_num_filters": [64, 128, 256, 512], "stackwise_num_blocks": [2, 2, 2, 2],
    "stackwise_num_strides": [1, 2, 2, 2], "block_type": "basic_block",
}  # fmt: skip


def classifier_of(encoder, embed_dim: int, num_classes: int, image_size: int):
    """Encoder features against `[classes, embed_dim]` random unit text features."""
    text = np.random.RandomState(0).randn(num_classes, embed_dim).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    classifier = export.DeployedClassifier(
        encoder,
        num_classes=num_classes,
        embed_dim=embed_dim,
        logit_scale=float(np.log(100.0)),
        classnames=[f"class {i}" for i in range(num_classes)],
        image_size=image_size,
    )
    classifier.text_features.assign(text)
    return classifier


def resnet_student(config: dict, image_size: int, teacher_dim: int):
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(**config, image_shape=(image_size, image_size, 3))
    return student_lib.backbone_student(backbone, teacher_dim, use_adapter=True)


def group_models(group: str) -> tuple[int, int, dict]:
    """(image size, classes, {name: builder}) of a group; the teacher first."""
    if group == "demo":
        teacher = CLIPConfig.preset("tiny-teacher", vision_prompt_length=4, vision_prompt_depth=3)
        return (
            32,
            36,
            {
                "teacher shapes CLIP (tiny-teacher)": lambda: vision_transformer(teacher),
                "student tiny_resnet": lambda: resnet_student(student_lib.TINY_RESNET, 32, 128),
            },
        )
    if group == "paper":
        prompts = dict(vision_prompt_length=4, vision_prompt_depth=9)
        teacher = CLIPConfig.preset("ViT-L/14", **prompts)
        return (
            224,
            1000,
            {
                "teacher ViT-L/14": lambda: vision_transformer(teacher),
                "student ViT-B/16": lambda: student_lib.clip_student(
                    CLIPConfig.preset("ViT-B/16"),
                    768,
                    prompt_length=4,
                    prompt_depth=9,
                    use_adapter=True,
                ),  # fmt: skip
                "student ResNet-18 (keras-hub)": lambda: resnet_student(RESNET18, 224, 768),
            },
        )
    raise ValueError(f"Unknown group {group!r}. Valid groups: demo, paper.")


def measure_group(group: str, rounds: int, folder: Path) -> list[dict]:
    import onnxruntime

    image_size, num_classes, builders = group_models(group)
    rows, sessions = [], []
    for name, build in builders.items():
        keras.utils.set_random_seed(0)
        encoder = build()
        embed_dim = 768 if group == "paper" else 128
        classifier = classifier_of(encoder, embed_dim, num_classes, image_size)
        row = {"group": group, "model": name, "image_size": image_size, "classes": num_classes}
        row["params_millions"] = classifier.count_params() / 1e6
        row["gflops_per_image"] = (
            student_lib.measured_flops(classifier, (image_size, image_size, 3)) / 1e9
        )
        start = time.perf_counter()
        path = folder / f"{group}_{len(rows)}.onnx"
        size = (image_size, image_size)
        model = export.deployment_model(classifier, size)
        export.export_onnx(model, export.deployment_metadata(classifier, size), path)
        row["export_seconds"] = time.perf_counter() - start
        row["onnx_megabytes"] = path.stat().st_size / 1e6
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 2
        sessions.append(
            onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        )
        rows.append(row)
        del classifier, encoder, model
        print(json.dumps({"built": name, **row}), flush=True)
    image = np.random.RandomState(0).randint(0, 256, (1, image_size, image_size, 3), np.uint8)
    times = [[] for _ in sessions]
    for session in sessions:  # warm up
        session.run(None, {"images": image})
    for _ in range(rounds):
        for session, samples in zip(sessions, times, strict=True):
            start = time.perf_counter()
            session.run(None, {"images": image})
            samples.append(time.perf_counter() - start)
    for row, samples in zip(rows, times, strict=True):
        row["latency_ms_batch1"] = 1e3 * float(np.median(samples))
        row["rounds"] = rounds
    teacher = rows[0]
    for row in rows:
        print(json.dumps(row), flush=True)
    for row in rows[1:]:
        ratios = {
            key: teacher[key] / row[key]
            for key in (
                "params_millions",
                "onnx_megabytes",
                "gflops_per_image",
                "latency_ms_batch1",
            )
        }
        print(json.dumps({"group": group, "teacher_over": row["model"], **ratios}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default="demo,paper")
    parser.add_argument("--rounds", type=int, default=20, help="timed runs per model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mtkd_cost.") as folder:
        for group in args.groups.split(","):
            measure_group(group, args.rounds, Path(folder))


if __name__ == "__main__":
    main()
