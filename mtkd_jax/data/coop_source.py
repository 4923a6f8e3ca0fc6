"""The CoOp / PromptKD folder layout: `DATA/<dir>/<images>/` plus a split file.

Split JSON (e.g. `DATA/oxford_pets/split_zhou_OxfordPets.json`): `{"train": [...], "val": [...],
"test": [...]}`, each entry `[relative image path, label, class name]`, paths relative to the
images folder. FGVC-Aircraft instead has `variants.txt` (one class name per line, label = line
number) and `images_variant_{train,val,test}.txt` (lines "<image id> <variant>", images at
`images/<image id>.jpg`).

Missing image files are found here, when the split is built (one warning with the count, or an
error naming the first ones when `strict`), so that the pipeline never meets them.

This module imports neither TensorFlow nor Keras.
"""

import logging
import os

import numpy as np

from mtkd_jax.data import fewshot, images
from mtkd_jax.data.dataset import Split
from mtkd_jax.data.registry import SPLITS, DatasetSpec
from mtkd_jax.errors import InputError

logger = logging.getLogger(__name__)

COOP_DATASETS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


def dataset_dir(spec: DatasetSpec, root: str) -> str:
    return os.path.join(root, spec.coop_dir)


def image_dir(spec: DatasetSpec, root: str) -> str:
    return os.path.join(dataset_dir(spec, root), spec.image_dir)


def expected_files(spec: DatasetSpec, root: str) -> list[str]:
    """The files whose presence means the layout is there."""
    if spec.layout == "aircraft":
        base = dataset_dir(spec, root)
        return [os.path.join(base, "variants.txt")] + [
            os.path.join(base, f"images_variant_{s}.txt") for s in ("train", "val", "test")
        ]
    return [os.path.join(dataset_dir(spec, root), spec.split_file)]


def is_present(spec: DatasetSpec, root: str) -> bool:
    return spec.coop_dir is not None and all(os.path.isfile(f) for f in expected_files(spec, root))


def layout_hint(spec: DatasetSpec, root: str) -> str:
    """One line describing the expected layout, for not-found errors."""
    if spec.layout == "aircraft":
        return (
            f"{dataset_dir(spec, root)}/ with variants.txt, images_variant_{{train,val,test}}.txt "
            f"and images/<id>.jpg (see {COOP_DATASETS_URL})"
        )
    return (
        f"{expected_files(spec, root)[0]} with the images under {image_dir(spec, root)}/ "
        f"(see {COOP_DATASETS_URL})"
    )


def load_split_json(path: str, images_root: str, *, strict: bool) -> tuple[dict, list[str]]:
    """Reads a CoOp split JSON into path Splits and the label-ordered raw class names.

    Returns:
      ({"train": Split, "val": Split, "test": Split}, raw class names `[C]`).
    """
    payload = fewshot.read_json(path)
    missing_keys = [s for s in SPLITS if s not in payload]
    if missing_keys:
        raise InputError(
            f"The split file {path} must hold the lists {list(SPLITS)}. "
            f"Received keys: {sorted(payload)}"
        )
    names: dict[int, str] = {}
    columns = {}
    for split in SPLITS:
        rel, labels = [], []
        for entry in payload[split]:
            if not (isinstance(entry, list | tuple) and len(entry) == 3):
                raise InputError(
                    f"Entries of {path} must be [relative path, label, class name]. "
                    f"Received: {entry!r} in {split!r}"
                )
            relpath, label, classname = entry
            label = int(label)
            if names.setdefault(label, classname) != classname:
                raise InputError(
                    f"Label {label} has two class names in {path}: {names[label]!r} and "
                    f"{classname!r}"
                )
            rel.append(relpath)
            labels.append(label)
        columns[split] = (rel, labels)
    num_classes = max(names) + 1 if names else 0
    unnamed = sorted(set(range(num_classes)) - set(names))
    if unnamed:
        raise InputError(f"Labels {unnamed} of {path} have no example in any split.")
    splits = {
        split: _path_split(images_root, rel, labels, what=f"{path} [{split}]", strict=strict)
        for split, (rel, labels) in columns.items()
    }
    return splits, [names[c] for c in range(num_classes)]


def load_aircraft(base: str, *, strict: bool) -> tuple[dict, list[str]]:
    """Reads the FGVC-Aircraft variant files into path Splits and the class names."""
    with open(os.path.join(base, "variants.txt"), encoding="utf-8") as f:
        classnames = [line.strip() for line in f if line.strip()]
    label_of = {name: i for i, name in enumerate(classnames)}
    splits = {}
    for split in SPLITS:
        listing = os.path.join(base, f"images_variant_{split}.txt")
        rel, labels = [], []
        with open(listing, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                image_id, _, variant = line.strip().partition(" ")
                if variant not in label_of:
                    raise InputError(
                        f"{listing} names the variant {variant!r}, which variants.txt lacks."
                    )
                rel.append(f"{image_id}.jpg")
                labels.append(label_of[variant])
        splits[split] = _path_split(
            os.path.join(base, "images"), rel, labels, what=listing, strict=strict
        )
    return splits, classnames


def load(spec: DatasetSpec, root: str, *, strict: bool) -> tuple[dict, list[str]]:
    """Splits and readable class names of a CoOp-layout dataset under `root` (the DATA dir)."""
    if spec.layout == "aircraft":
        splits, raw = load_aircraft(dataset_dir(spec, root), strict=strict)
    else:
        splits, raw = load_split_json(
            expected_files(spec, root)[0], image_dir(spec, root), strict=strict
        )
    return splits, [spec.classname(name) for name in raw]


def _path_split(images_root: str, rel: list[str], labels: list[int], *, what: str, strict: bool):
    paths = np.asarray([os.path.join(images_root, r) for r in rel], dtype=object)
    exists = np.fromiter((os.path.isfile(p) for p in paths), dtype=bool, count=len(paths))
    if not exists.all():
        missing = paths[~exists]
        if strict:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {what} do not exist, e.g. "
                f"{', '.join(missing[:3])}. Fix the data or run without strict data checks to "
                "skip them."
            )
        logger.warning(
            "Skipping %d image(s) listed in %s that do not exist:\n  %s",
            len(missing),
            what,
            "\n  ".join(missing),
        )
        for path in missing:
            images.record_skipped(path, f"listed in {what} but missing")
    keep = np.flatnonzero(exists)
    return Split(
        labels=np.asarray(labels, dtype=np.int32)[keep],
        paths=paths[keep],
        ids=np.asarray(rel, dtype=object)[keep],
    )
