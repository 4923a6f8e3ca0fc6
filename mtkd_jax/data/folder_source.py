"""Datasets given as one folder per class: the medical sets and `folder:/path` roots.

Layout: `DATA/<name>/images/<class>/<image>` for bach, brain and eyedr; `<root>/<class>/<image>`
for `folder:<root>`. Classes are the sub-folders sorted by name (label = position). On first use
each class is split 50/20/30 into train/val/test with a fixed seed, and the split is saved beside
the data (`DATA/<name>/split_mtkd_<name>.json`, or `<root>/split_mtkd.json`) in the CoOp split
format, so every later run, on any machine with the same files, uses the same split. If that
folder is read-only the split goes to `<cache_dir>/splits/` instead.

This module imports neither TensorFlow nor Keras.
"""

import logging
import os

import numpy as np

from mtkd_jax import atomic
from mtkd_jax.data import coop_source, fewshot
from mtkd_jax.data.registry import DatasetSpec
from mtkd_jax.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_FRACTIONS = (0.5, 0.2, 0.3)
_SPLIT_SEED = ("mtkd_jax class-folder split", 1)


def images_root(spec: DatasetSpec, root: str) -> str:
    return os.path.join(root, spec.coop_dir, spec.image_dir)


def split_path(spec: DatasetSpec, root: str) -> str:
    return os.path.join(root, spec.coop_dir, spec.split_file)


def _fallback_split_path(spec: DatasetSpec, cache_dir: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in spec.name)
    return os.path.join(cache_dir, "splits", f"{safe}.json")


def is_present(spec: DatasetSpec, root: str) -> bool:
    folder = images_root(spec, root)
    return os.path.isdir(folder) and any(
        entry.is_dir() and not entry.name.startswith(".") for entry in os.scandir(folder)
    )


def layout_hint(spec: DatasetSpec, root: str) -> str:
    return (
        f"{images_root(spec, root).rstrip('/')}/<class name>/<image files> (one folder per "
        f"class; the split {split_path(spec, root)} is created on first use)"
    )


def make_split(folder: str) -> dict:
    """Scans `folder`'s class folders and splits each class 50/20/30 (CoOp split format)."""
    classes = sorted(
        e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")
    )
    rel, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            os.path.relpath(os.path.join(d, f), folder)
            for d, _, fs in os.walk(os.path.join(folder, name))
            for f in fs
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        )
        if not files:
            raise InputError(
                f"The class folder {os.path.join(folder, name)!r} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder."
            )
        rel += files
        labels += [label] * len(files)
    if not classes:
        raise InputError(f"No class folders found in {folder!r}.")
    labels = np.asarray(labels)
    parts = fewshot.split_per_class(
        labels, len(classes), SPLIT_FRACTIONS, fewshot.stable_rng(*_SPLIT_SEED)
    )
    return {
        split: [[rel[i], int(labels[i]), classes[labels[i]]] for i in part]
        for split, part in zip(("train", "val", "test"), parts, strict=True)
    }


def load(spec: DatasetSpec, root: str, *, strict: bool, cache_dir: str, reference: bool = False):
    """Splits and readable class names; creates and saves the split on first use.

    With `reference`, the authors' split file (`spec.reference_split_file`, e.g.
    `DATA/bach/split_BACH.json`) is read when present, with its class names as written there
    (the folder names) instead of ours.
    """
    folder = images_root(spec, root)
    if reference and spec.reference_split_file:
        theirs = os.path.join(root, spec.coop_dir, spec.reference_split_file)
        if os.path.isfile(theirs):
            return coop_source.load_split_json(theirs, folder, strict=strict)
        logger.warning("No reference split file %s; using ours.", theirs)
    path = split_path(spec, root)
    fallback = _fallback_split_path(spec, cache_dir)
    if not os.path.exists(path) and os.path.exists(fallback):
        path = fallback
    if not os.path.exists(path):
        payload = make_split(folder)
        try:
            atomic.write_json(path, payload, indent=1)
        except OSError as error:
            logger.warning("Cannot write %s (%s); saving the split to %s.", path, error, fallback)
            path = fallback
            atomic.write_json(path, payload, indent=1)
        logger.info(
            "Created the 50/20/30 split of %s (%s) and saved it to %s.",
            spec.name,
            ", ".join(f"{s}: {len(v)}" for s, v in payload.items()),
            path,
        )
    splits, raw = coop_source.load_split_json(path, folder, strict=strict)
    return splits, [spec.classname(name) for name in raw]
