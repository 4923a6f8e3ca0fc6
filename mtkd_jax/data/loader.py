"""`load_dataset(name, source=...)`: picks the source of a dataset and returns a FewShotDataset.

Sources: "coop" (CoOp split files, or class folders for the medical sets and `folder:` roots,
under the data root), "tfds" (TensorFlow Datasets in `tfds_data_dir`, downloaded and prepared by
TFDS itself when missing and the machine is online), "auto" (the CoOp layout if present, else a
prepared TFDS copy; never downloads; logs its choice). "shapes" is generated in memory by
`mtkd_jax.data.shapes` and ignores the source.

When nothing is found, one `FileNotFoundError` says where it looked and how to get the data.
"""

import logging
import os

import numpy as np

from mtkd_jax.data import coop_source, fewshot, folder_source, tfds_source
from mtkd_jax.data.dataset import FewShotDataset, Split
from mtkd_jax.data.registry import DatasetSpec, get_spec
from mtkd_jax.errors import InputError

logger = logging.getLogger(__name__)

SOURCES = ("auto", "tfds", "coop")


def default_data_root() -> str:
    """`$MTKD_DATA_ROOT`, else `./DATA` (the CoOp family's folder name)."""
    return os.environ.get("MTKD_DATA_ROOT") or "DATA"


def load_dataset(
    name: str,
    *,
    source: str = "auto",
    root: str | None = None,
    tfds_data_dir: str | None = None,
    seed: int = 1,
    strict: bool = False,
    cache_dir: str | None = None,
    reference_data: bool = False,
) -> FewShotDataset:
    """Loads a dataset by name from the chosen source.

    Args:
      name: one of `registry.DATASET_NAMES` (e.g. "oxford_pets", "bach", "shapes"), or
        "folder:/path/to/class/folders".
      source: "auto", "tfds" or "coop" (class-folder sets count as "coop").
      root: the CoOp `DATA` folder (default `$MTKD_DATA_ROOT` or `./DATA`).
      tfds_data_dir: TFDS data dir (default: TFDS's own, `$TFDS_DATA_DIR` or
        `~/tensorflow_datasets`).
      seed: seed of the generated shapes world (the other sets' splits are fixed).
      strict: fail on listed images that are missing instead of skipping them with a warning.
      cache_dir: root of the few-shot cache (default `$MTKD_CACHE_DIR` or `~/.cache/mtkd_jax`).
      reference_data: read the authors' data files when present (`mtkd_jax.data.reference`):
        Dassl's few-shot pickles and the MTKD medical split files with folder class names.

    Raises:
      ValueError: unknown name or source.
      FileNotFoundError: the dataset is not where the source looks; the message says where it
        looked and how to get it.
    """
    spec = get_spec(name)
    if source not in SOURCES:
        raise InputError(f"Valid data sources: {SOURCES}. Received: source={source!r}")
    cache_dir = cache_dir or fewshot.default_cache_dir()
    if spec.layout == "generated":
        return _load_shapes(spec, seed, cache_dir)
    root = root if root is not None else default_data_root()
    folders = spec.layout == "class_folders"
    coop_ok = spec.coop_dir is not None and (
        folder_source.is_present(spec, root) if folders else coop_source.is_present(spec, root)
    )
    if source == "coop" or (source == "auto" and coop_ok):
        if not coop_ok:
            raise _not_found(spec, source, root, tfds_data_dir)
        if source == "auto":
            logger.info("Data source for %s: CoOp layout under %s", name, root)
        if folders:
            splits, classnames = folder_source.load(
                spec, root, strict=strict, cache_dir=cache_dir, reference=reference_data
            )
        else:
            splits, classnames = coop_source.load(spec, root, strict=strict)
        kind = "folders" if folders else "coop"
    elif source == "tfds" or tfds_source.is_present(spec, tfds_data_dir):
        if spec.tfds_name is None:
            raise _not_found(spec, source, root, tfds_data_dir)
        if source == "auto":
            logger.info("Data source for %s: TFDS %s", name, spec.tfds_name)
        if source == "tfds":
            try:
                tfds_source.prepare(spec, tfds_data_dir)
            except Exception as error:
                # TFDS raises assorted errors (no network, checksums, manual download) when it
                # cannot prepare the data; to the user they all mean "not found, get it so".
                raise _not_found(spec, source, root, tfds_data_dir, error) from None
        splits, classnames = tfds_source.load(spec, tfds_data_dir)
        kind = "tfds"
    else:
        raise _not_found(spec, source, root, tfds_data_dir)
    return FewShotDataset(
        name=name,
        source=kind,
        classnames=classnames,
        templates=list(spec.templates),
        splits=splits,
        cache_dir=cache_dir,
        reference_fewshot_dir=(
            os.path.join(root, spec.coop_dir) if reference_data and kind != "tfds" else None
        ),
    )


def _not_found(
    spec: DatasetSpec, source: str, root: str, tfds_data_dir: str | None, cause=None
) -> FileNotFoundError:
    looked, how = [], []
    if source in ("auto", "coop") and spec.coop_dir is not None:
        hint = (folder_source if spec.layout == "class_folders" else coop_source).layout_hint(
            spec, os.path.abspath(root)
        )
        looked.append(f"folder layout: {hint}")
        how.append(
            f"put the files in that layout (or pass the folder that holds "
            f"'{spec.coop_dir}' as the data root)"
        )
    if source in ("auto", "tfds") and spec.tfds_name is not None:
        where = tfds_data_dir or "TFDS's default data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
        looked.append(f"TFDS '{spec.tfds_name}' prepared in {where}")
        how.append(
            f"prepare it with `{tfds_source.build_command(spec, tfds_data_dir)}` on a machine "
            "that is online (or run with the tfds data source there)"
        )
    if not looked:
        looked.append(f"nothing: {spec.name!r} is not served by the {source!r} source")
        how.append("choose another data source (" + ", ".join(SOURCES) + ")")
    lines = [f"Dataset {spec.name!r} not found (data source {source!r})."]
    lines += ["Looked for:"] + [f"  - {x}" for x in looked]
    lines += ["How to get it:"] + [f"  - {x}" for x in how]
    if cause is not None:
        lines.append(f"TFDS said: {type(cause).__name__}: {str(cause).splitlines()[0][:300]}")
    return FileNotFoundError("\n".join(lines))


def _load_shapes(spec: DatasetSpec, seed: int, cache_dir: str) -> FewShotDataset:
    from mtkd_jax.data import shapes  # noqa: PLC0415 - optional, generated world

    splits = {}
    for split in ("train", "val", "test"):
        images, labels, _ = shapes.render_split(split, shapes.default_split_sizes[split], seed)
        splits[split] = Split(labels=np.asarray(labels, np.int32), images=images)
    return FewShotDataset(
        name="shapes",
        source=f"generated-seed{seed}",
        classnames=list(shapes.CLASSNAMES),
        templates=list(shapes.TEMPLATES),
        splits=splits,
        cache_dir=cache_dir,
    )
