"""`Split` (the examples of one split) and `FewShotDataset` (a dataset with its protocol).

A `Split` holds its images in exactly one of three forms, plus int32 labels `[N]`:
  * `paths`: image file paths (decoded by the pipeline, read lazily from disk);
  * `encoded`: encoded image bytes in memory (what the TFDS source produces);
  * `images`: a uint8 array `[N, H, W, 3]` (the generated shapes world).
`ids` names every example stably (relative path, TFDS position, array index) so that cached
few-shot samples stay inspectable and can be checked against the data they were drawn from.

`FewShotDataset` adds the protocol of the paper: `few_shot(k, seed)` (K images per class from
train and min(K, 4) from val, deterministic in (dataset, K, seed), cached as JSON), the
base/novel partition (`base_classes`, `novel_classes`, `class_ids`) and `subsample`, which keeps
the ORIGINAL label ids 0..C-1 so that evaluation uses the matching rows of the text features.

This module imports neither TensorFlow nor Keras.
"""

import dataclasses
import logging
import os

import numpy as np

from mtkd_jax import atomic
from mtkd_jax.data import fewshot

logger = logging.getLogger(__name__)

_WHICH = ("base", "novel", "all")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """The examples of one split.

    Attributes:
      labels: int32 `[N]` label ids in 0..C-1.
      paths: object/str `[N]` image file paths, or None.
      encoded: object `[N]` encoded image bytes, or None.
      images: uint8 `[N, H, W, 3]`, or None.
      ids: str `[N]` stable example names (defaults to the paths, or "#<index>").
    """

    labels: np.ndarray
    paths: np.ndarray | None = None
    encoded: np.ndarray | None = None
    images: np.ndarray | None = None
    ids: np.ndarray | None = None

    def __post_init__(self):
        labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        object.__setattr__(self, "labels", labels)
        given = [k for k in ("paths", "encoded", "images") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "A Split holds its images in exactly one of `paths`, `encoded` or `images`. "
                f"Received: {given or 'none of them'}"
            )
        if self.paths is not None:
            object.__setattr__(self, "paths", np.asarray(self.paths, dtype=object).reshape(-1))
        if self.encoded is not None:
            encoded = np.empty(len(self.encoded), dtype=object)
            encoded[:] = list(self.encoded)
            object.__setattr__(self, "encoded", encoded)
        if self.images is not None:
            images = np.asarray(self.images)
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise ValueError(
                    "In-memory images must be uint8 [N, H, W, 3]. Received: "
                    f"shape={images.shape}, dtype={images.dtype}"
                )
            object.__setattr__(self, "images", images)
        n = len(getattr(self, given[0]))
        if len(labels) != n:
            raise ValueError(
                f"A Split needs one label per image. Received: {n} images, {len(labels)} labels"
            )
        if self.ids is None:
            ids = self.paths if self.paths is not None else [f"#{i}" for i in range(n)]
        else:
            ids = self.ids
        object.__setattr__(self, "ids", np.asarray(ids, dtype=object).reshape(-1))

    @property
    def kind(self) -> str:
        """ "paths", "encoded" or "images"."""
        for kind in ("paths", "encoded", "images"):
            if getattr(self, kind) is not None:
                return kind
        raise AssertionError("unreachable")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions) -> "Split":
        """The examples at `positions` (int `[M]`), in that order, with their original labels."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        data = getattr(self, self.kind)[positions]
        return Split(labels=self.labels[positions], ids=self.ids[positions], **{self.kind: data})


@dataclasses.dataclass(eq=False)
class FewShotDataset:
    """A dataset with its class names, templates, splits and few-shot / base-novel protocol.

    Attributes:
      name: the dataset name (e.g. "oxford_pets", "folder:/data/x", "shapes").
      source: where the splits came from ("tfds", "coop", "folders", "generated-seed<seed>").
      classnames: readable class names, index = label id, `[C]`.
      templates: prompt templates with one `{}` each.
      splits: "train" / "val" / "test" -> Split.
      cache_dir: root of the few-shot cache (samples go to `<cache_dir>/fewshot/`).
      reference_fewshot_dir: the dataset's folder in the authors' DATA/ layout; when set,
        `few_shot` reads Dassl's `split_fewshot/shot_<K>-seed_<S>.pkl` there if it exists
        (`mtkd_jax.data.reference`), so the shots are the reference's own images.
    """

    name: str
    source: str
    classnames: list[str]
    templates: list[str]
    splits: dict[str, Split]
    cache_dir: str | None = None
    reference_fewshot_dir: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> Split:
        """The full "train", "val" or "test" split."""
        if name not in self.splits:
            raise ValueError(f"Valid splits: {sorted(self.splits)}. Received: name={name!r}")
        return self.splits[name]

    @property
    def base_classes(self) -> np.ndarray:
        """Label ids of the base classes: the first ceil(C/2), int32 `[ceil(C/2)]`."""
        return fewshot.base_novel_classes(self.num_classes)[0]

    @property
    def novel_classes(self) -> np.ndarray:
        """Label ids of the novel classes: the remaining floor(C/2), int32."""
        return fewshot.base_novel_classes(self.num_classes)[1]

    def class_ids(self, which: str) -> np.ndarray:
        """Label ids of "base", "novel" or "all" classes (to pick the text-feature rows)."""
        if which == "base":
            return self.base_classes
        if which == "novel":
            return self.novel_classes
        if which == "all":
            return np.arange(self.num_classes, dtype=np.int32)
        raise ValueError(f"Valid values: {_WHICH}. Received: which={which!r}")

    def subsample(self, split: "Split | str", which: str) -> Split:
        """The examples of `split` whose class is in `class_ids(which)`; labels stay 0..C-1."""
        split = self.split(split) if isinstance(split, str) else split
        keep = np.flatnonzero(np.isin(split.labels, self.class_ids(which)))
        return split.subset(keep)

    def few_shot(self, k: int, seed: int, cache_dir: str | None = None) -> tuple[Split, Split]:
        """K images per class from train and min(K, 4) per class from val.

        Deterministic in (dataset, K, seed) on any machine; the chosen examples are written to
        `<cache_dir>/fewshot/<dataset>_<source>_k<K>_seed<seed>.json` (positions and ids) and
        read back on later calls, as long as they still match the split.

        Returns:
          (train Split `[<= K*C]`, val Split `[<= min(K,4)*C]`), labels kept.
        """
        train, val = self.split("train"), self.split("val")
        if self.reference_fewshot_dir:
            from mtkd_jax.data import reference

            pickle_path = reference.dassl_fewshot_path(self.reference_fewshot_dir, k, seed)
            if os.path.isfile(pickle_path):
                records = reference.read_dassl_fewshot(pickle_path)
                return tuple(
                    split.subset(reference.match_records(split, records[key], what=pickle_path))
                    for key, split in (("train", train), ("val", val))
                )
            logger.warning("No reference few-shot file %s; sampling our own.", pickle_path)
        path = self.few_shot_cache_path(k, seed, cache_dir)
        cached = _read_cache(path, train, val)
        if cached is not None:
            train_pos, val_pos = cached
        else:
            train_pos = fewshot.sample_per_class(
                train.labels, k, fewshot.stable_rng(self.name, "train", k, seed), self.classnames
            )
            val_pos = fewshot.sample_per_class(
                val.labels,
                min(k, 4),
                fewshot.stable_rng(self.name, "val", k, seed),
                self.classnames,
                what="val",
            )
            payload = {
                "dataset": self.name,
                "source": self.source,
                "k": k,
                "seed": seed,
                "num_classes": self.num_classes,
                "train": {"positions": train_pos.tolist(), "ids": train.ids[train_pos].tolist()},
                "val": {"positions": val_pos.tolist(), "ids": val.ids[val_pos].tolist()},
            }
            try:
                atomic.write_json(path, payload, indent=1)
            except OSError as error:
                logger.warning("Could not cache the few-shot sample at %s: %s", path, error)
        return train.subset(train_pos), val.subset(val_pos)

    def few_shot_cache_path(self, k: int, seed: int, cache_dir: str | None = None) -> str:
        """Where `few_shot(k, seed)` caches its sample."""
        root = cache_dir or self.cache_dir or fewshot.default_cache_dir()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.name)
        return os.path.join(root, "fewshot", f"{safe}_{self.source}_k{k}_seed{seed}.json")


def _read_cache(path: str, train: Split, val: Split) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached positions when the file exists and its ids still match the splits, else None."""
    if not os.path.exists(path):
        return None
    try:
        payload = fewshot.read_json(path)
        out = []
        for split, entry in ((train, payload["train"]), (val, payload["val"])):
            positions = np.asarray(entry["positions"], dtype=np.int64)
            if positions.size and (positions.max() >= len(split) or positions.min() < 0):
                raise ValueError("position out of range")
            if split.ids[positions].tolist() != list(entry["ids"]):
                raise ValueError("ids differ from the split")
            out.append(positions)
        return out[0], out[1]
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("Ignoring the stale few-shot cache %s (%s); sampling again.", path, error)
        return None
