"""Writing files so that readers see the old file or the complete new one, never half of one.

Everything is written to a temporary name in the destination's folder and renamed over the
destination (`os.replace`, atomic on POSIX); on any error the temporary file is removed. The
file gets the permissions of any newly created file (0666 less the user's umask), not the 0600
of the temporary file, so results shared with a group stay readable by it.
Imports neither Keras nor TensorFlow.
"""

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(
    path: str | os.PathLike, suffix: str = ".tmp", *, durable: bool = False
) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it over `path` when the block succeeds.

    `suffix` lets writers that insist on an extension (`.npz`, `.weights.h5`, `.keras`) keep it.
    `durable=True` also flushes the file and the rename to disk (`fsync`) before returning, for
    what must survive a power cut (checkpoints and their markers).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(descriptor)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # Elsewhere: set and restore (not thread-safe, but brief).
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike) -> None:
    """fsync of a file or folder; a no-op where the system cannot open or sync it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_json(
    path: str | os.PathLike, payload, *, indent: int | None = 2, durable: bool = False, **dump
) -> None:
    """Writes `payload` as JSON to `path`, atomically (`dump`: more `json.dump` arguments)."""
    with replacing(path, durable=durable) as tmp, open(tmp, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=indent, **dump)
        file.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path`, atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
