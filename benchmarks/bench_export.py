"""The exported student on the demo's test images: each format and int8 against the Keras file.

    make demo    # writes runs/shapes_4shot_seed1/student.keras
    .venv/bin/python benchmarks/bench_export.py --model=runs/shapes_4shot_seed1/student.keras

Exports `--model` to ONNX, LiteRT and SavedModel, float32 and int8 (dynamic range) for ONNX
and LiteRT, into a temporary folder, and runs every file in its own runtime on the shapes
world's whole test split (uint8 images in; the preprocessing is in each graph). Prints one
JSON line per file: accuracy (all classes), its change against the Keras student, top-1
agreement with it, the largest logit difference, and the file size. Measured: docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from mtkd_jax import export
from mtkd_jax.data import load_dataset, preprocess


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def run_in_batches(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate(
        [np.asarray(model(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a student.keras written by the demo")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    classifier = export.load_classifier(args.model)
    test = load_dataset(args.dataset, seed=args.seed).split("test")
    if test.images is None:
        raise SystemExit("This benchmark needs an in-memory dataset (the shapes world).")
    images, labels = test.images, np.asarray(test.labels)
    size = classifier.image_size
    normalised = np.stack([preprocess.eval_transform(image, size).numpy() for image in images])
    reference = run_in_batches(classifier, normalised)
    keras_accuracy = float(np.mean(reference.argmax(1) == labels))
    print(
        json.dumps(
            {"file": "keras", "accuracy": keras_accuracy, "bytes": size_of(Path(args.model))}
        )
    )
    with tempfile.TemporaryDirectory() as folder:
        paths = export.export_formats(classifier, folder, int8=True)
        for kind, path in paths.items():
            logits = run_in_batches(export.ExportedClassifier(path), images)
            accuracy = float(np.mean(logits.argmax(1) == labels))
            print(
                json.dumps(
                    {
                        "file": kind,
                        "accuracy": accuracy,
                        "accuracy_change_points": round(100 * (accuracy - keras_accuracy), 2),
                        "top1_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
                        "max_abs_logit_difference": float(np.abs(logits - reference).max()),
                        "bytes": size_of(path),
                        "images": len(labels),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
