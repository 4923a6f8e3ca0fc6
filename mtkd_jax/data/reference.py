"""The authors' own data files, read so a run uses the same images as their code.

* Dassl's few-shot samples, `DATA/<dataset>/split_fewshot/shot_<K>-seed_<S>.pkl`: a pickle of
  `{"train": [Datum, ...], "val": [Datum, ...]}`, where a Datum (Dassl's
  `dassl.data.datasets.base_dataset.Datum`) holds an image path, a label, a domain and a class
  name. The file is unpickled by `read_dassl_fewshot` with an unpickler that knows that one
  class, maps it onto a plain record here, and refuses every other global (so no code in the
  file can run), then checks that the result is exactly that shape. The records are matched to
  this dataset's examples by the tail of their image path (the authors' absolute paths differ
  from ours) and must carry the same label.
* The MTKD medical split files (`split_BACH.json`, `split_brain.json`, `split_eyedr.json`) are
  CoOp split files; `mtkd_jax.data.folder_source` reads them when asked to.

This module imports neither TensorFlow nor Keras.
"""

import dataclasses
import io
import os
import pickle

import numpy as np

from mtkd_jax.errors import InputError

# Where Dassl defines its record class (the only global a few-shot pickle may name).
_DATUM_GLOBALS = {("dassl.data.datasets.base_dataset", "Datum"), ("dassl.data.datasets", "Datum")}
_DATUM_FIELDS = {"_impath": str, "_label": int, "_domain": int, "_classname": str}


def dassl_fewshot_path(dataset_dir: str, k: int, seed: int) -> str:
    """`<dataset_dir>/split_fewshot/shot_<k>-seed_<seed>.pkl`, as Dassl names it."""
    return os.path.join(dataset_dir, "split_fewshot", f"shot_{k}-seed_{seed}.pkl")


@dataclasses.dataclass
class DatumRecord:
    """What a Dassl Datum holds, without any of its code."""

    impath: str = ""
    label: int = -1
    domain: int = 0
    classname: str = ""

    def __setstate__(self, state):
        if not isinstance(state, dict) or set(state) - set(_DATUM_FIELDS):
            raise pickle.UnpicklingError(f"a Datum with unexpected fields: {state!r:.200}")
        for name, kind in _DATUM_FIELDS.items():
            value = state.get(name, getattr(DatumRecord, name[1:]))
            if not isinstance(value, kind) or isinstance(value, bool):
                raise pickle.UnpicklingError(f"Datum.{name[1:]} is not a {kind.__name__}")
            setattr(self, name[1:], value)


class _DatumOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DATUM_GLOBALS:
            return DatumRecord
        raise pickle.UnpicklingError(f"the file names {module}.{name}, which is not a Dassl Datum")


def read_dassl_fewshot(path: str) -> dict[str, list[DatumRecord]]:
    """`{"train": [...], "val": [...]}` records of a Dassl few-shot pickle, read safely.

    Raises:
      ValueError: the file holds anything but that dict of lists of Datum records (the message
        names what was found; nothing in the file is run).
    """
    with open(path, "rb") as file:
        payload = file.read()
    try:
        data = _DatumOnlyUnpickler(io.BytesIO(payload)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as error:
        raise InputError(
            f"{path} is not a Dassl few-shot file (a pickle of Datum lists only): {error}. "
            "Delete it, or run without --reference_data to sample our own shots."
        ) from None
    if not (isinstance(data, dict) and set(data) == {"train", "val"}):
        raise InputError(
            f"{path} must hold {{'train': [Datum...], 'val': [Datum...]}}. Received "
            f"{type(data).__name__} with keys {sorted(data) if isinstance(data, dict) else '-'}."
        )
    for key, records in data.items():
        if not (isinstance(records, list) and all(isinstance(r, DatumRecord) for r in records)):
            raise InputError(f"{path}: '{key}' must be a list of Datum records.")
    return data


def _tails(path: str, depth: int) -> str:
    parts = str(path).replace("\\", "/").split("/")
    return "/".join(parts[-depth:])


def match_records(split, records: list[DatumRecord], *, what: str) -> np.ndarray:
    """Positions in `split` (a path Split) of the images `records` name; int64 `[len]`.

    An image is matched by the longest tail of its path (up to its last 3 components) that names
    exactly one example of the split; its label must equal the record's.

    Raises:
      ValueError: a record matches no example, or one with another label (names the first).
    """
    if split.paths is None:
        raise InputError(
            f"{what}: the reference's few-shot files name image files, and this dataset's images "
            "are not files (TFDS or generated); use --data_source=coop with the DATA/ layout."
        )
    indexes = []
    for depth in (3, 2, 1):
        index: dict[str, int] = {}
        for position, path in enumerate(split.paths):
            key = _tails(path, depth)
            index[key] = -1 if key in index else position  # -1: ambiguous
        indexes.append((depth, index))
    positions = []
    for record in records:
        found = None
        for depth, index in indexes:
            position = index.get(_tails(record.impath, depth))
            if position is not None and position >= 0:
                found = position
                break
        if found is None:
            raise InputError(
                f"{what}: the reference's image {record.impath!r} is not in this dataset's split. "
                "Are the data the same as the authors' (DATA/ layout and split file)?"
            )
        if int(split.labels[found]) != record.label:
            raise InputError(
                f"{what}: {record.impath!r} has label {record.label} there and "
                f"{int(split.labels[found])} here; the class order differs from the reference's."
            )
        positions.append(found)
    return np.asarray(positions, dtype=np.int64)
