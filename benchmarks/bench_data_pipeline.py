"""Throughput of the input pipeline: read + decode + augment + batch, on ~500x375 JPEGs.

    .venv/bin/python benchmarks/bench_data_pipeline.py --num_images=256 --image_size=224

Writes photo-like JPEGs (500x375 and 375x500, quality 90) to a temporary folder, then times
`make_batches` for training (random resized crop + flip) and evaluation (resize + centre crop)
after one warm-up pass, and prints images/s in total and per CPU core the process may use.
Not a test: numbers depend on the machine and its load.
"""

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from mtkd_jax.data import Split
from mtkd_jax.data.pipeline import make_batches


def write_jpegs(folder: str, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (500, 375) if i % 2 == 0 else (375, 500)
        coarse = rng.integers(0, 256, size=(h // 25, w // 25, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 8, size=(h, w, 3))
        pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def time_pass(split: Split, training: bool, image_size: int, batch_size: int) -> float:
    start = time.perf_counter()
    count = 0
    for batch in make_batches(
        split, image_size=image_size, batch_size=batch_size, training=training, seed=0
    ):
        count += int(batch["mask"].sum())
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(folder, args.num_images)
        split = Split(labels=np.zeros(len(paths), np.int32), paths=paths)
        for training in (True, False):
            time_pass(split, training, args.image_size, args.batch_size)  # warm-up
            rate = time_pass(split, training, args.image_size, args.batch_size)
            mode = "train (RandomResizedCrop+flip)" if training else "eval (resize+centre crop)"
            print(
                f"{mode:32s} {args.num_images} JPEGs 500x375 -> {args.image_size}: "
                f"{rate:7.1f} images/s, {rate / cores:7.1f} images/s per core ({cores} cores)"
            )


if __name__ == "__main__":
    main()
