"""Writing files so that readers see the old file or the complete new one, never half of one.

Everything is written to a temporary name in the destination's folder and renamed over the
destination (`os.replace`, atomic on POSIX); on any error the temporary file is removed.
Imports neither Keras nor TensorFlow.
"""

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it over `path` when the block succeeds.

    `suffix` lets writers that insist on an extension (`.npz`, `.weights.h5`, `.keras`) keep it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(descriptor)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, payload, *, indent: int = 2) -> None:
    """Writes `payload` as JSON to `path`, atomically."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=indent)
        file.write("\n")
