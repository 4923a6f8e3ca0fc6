"""Reproducible per-class sampling: K-shot subsets, split fractions, and the base/novel partition.

Everything here is a pure function of its arguments. Random streams are numpy PCG64 generators
seeded from a SHA-256 digest of the dataset name plus integers (never Python's `hash()`, which
changes between processes), so the same (dataset, K, seed) picks the same images on any machine.
"""

import hashlib
import json
import logging
import math
import os

import numpy as np

logger = logging.getLogger(__name__)


def stable_rng(*keys: str | int) -> np.random.Generator:
    """A numpy generator seeded by `keys`, identical across processes and machines."""
    digest = hashlib.sha256("\x1f".join(str(k) for k in keys).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def class_indices(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Positions of each class in `labels` (int [N]), in split order; one array per class."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def sample_per_class(
    labels: np.ndarray,
    k: int,
    rng: np.random.Generator,
    classnames: list[str],
    what: str = "train",
) -> np.ndarray:
    """Up to `k` positions per class, drawn without replacement; sorted, int64 [<= k * C].

    A class with fewer than `k` images gives all of them, with a warning naming it.

    Raises:
      ValueError: `k` < 1, or a class has no image at all (the error names it).
    """
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"The number of shots must be a positive integer. Received: k={k!r}")
    chosen = []
    for c, positions in enumerate(class_indices(labels, len(classnames))):
        if len(positions) == 0:
            raise ValueError(
                f"Class {c} ({classnames[c]!r}) has no images in the {what} split, so it cannot "
                "be sampled. Add images for it or remove the class folder."
            )
        if len(positions) < k:
            logger.warning(
                "Class %d (%r) has only %d %s images, fewer than K=%d: taking all of them.",
                c,
                classnames[c],
                len(positions),
                what,
                k,
            )
        chosen.append(rng.permutation(positions)[:k])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_per_class(
    labels: np.ndarray, num_classes: int, fractions: tuple[float, ...], rng: np.random.Generator
) -> list[np.ndarray]:
    """Partitions positions per class by `fractions` (e.g. (0.5, 0.2, 0.3)); sorted int64 parts.

    Per class of n images, part i gets round(n * fractions[i]) images (the last part takes the
    rest), as CoOp's `read_and_split_data` / `split_trainval` do.
    """
    parts = [[] for _ in fractions]
    for positions in class_indices(labels, num_classes):
        shuffled = rng.permutation(positions)
        start = 0
        for i, fraction in enumerate(fractions):
            last = i == len(fractions) - 1
            end = len(shuffled) if last else start + round(len(shuffled) * fraction)
            parts[i].append(shuffled[start:end])
            start = end
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def base_novel_classes(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Label ids of the base classes (the first ceil(C/2)) and of the novel ones (the rest)."""
    num_base = math.ceil(num_classes / 2)
    return np.arange(num_base, dtype=np.int32), np.arange(num_base, num_classes, dtype=np.int32)


def default_cache_dir() -> str:
    """`$MTKD_CACHE_DIR`, else `~/.cache/mtkd_jax`."""
    return os.environ.get("MTKD_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mtkd_jax"
    )


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
