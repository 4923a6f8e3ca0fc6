"""Checkpoints: atomic save, strict restore, the latest of a stage, and the workdir guard.

A checkpoint is ONE `.npz` file (numpy's zip of `.npy` arrays, read back with
`allow_pickle=False`, so no pickle is ever written or executed):

- one array per leaf of the saved pytree, keyed by its tree path (`jax.tree_util.keystr`, e.g.
  `.trainable[3]` or `.opt_state.hyperparams['learning_rate']`);
- `__metadata__`: the JSON metadata (step, epoch, stage, rng, flags, ...) as UTF-8 bytes.

Files are named `ckpt-<stage>-<step, 9 digits>.npz` in the checkpoint directory
(`<workdir>/checkpoints`). Saving writes a hidden temporary file in the same directory, fsyncs it
and renames it over the final name (`mtkd_jax.atomic.replacing(..., durable=True)`), so a crash
mid-write leaves the previous checkpoint as the latest and no partial file under a checkpoint
name.

A stage that ends writes a marker `<stage>.finished.json` next to its checkpoints;
`guard_workdir` uses the markers and checkpoints to refuse silently reusing a workdir.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mtkd_jax import atomic, errors

CHECKPOINT_SUBDIR = "checkpoints"
FORMAT_VERSION = 1
# Checkpoints of a stage that `save` keeps by default (older ones are deleted); `train.fit` uses it.
KEEP_PER_STAGE = 3
_METADATA_KEY = "__metadata__"
_NAME_PATTERN = re.compile(r"^ckpt-(?P<stage>.+)-(?P<step>\d{9})\.npz$")
# numpy cannot store these natively; they are saved as same-width unsigned ints and viewed back.
_VIEWED_DTYPES = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}


class CheckpointError(errors.InputError):
    """A checkpoint file that cannot be read, or does not match what it is restored into."""


class StateMismatchError(CheckpointError):
    """A readable checkpoint whose arrays do not match the state it is restored into."""


class CheckpointWriteError(errors.UserError, OSError):
    """A checkpoint could not be written (disk full, file-size limit, permissions)."""


class WorkdirInUseError(errors.UserError, RuntimeError):
    """A workdir already holds this stage's checkpoints and the run did not ask to resume."""


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    """Where a run's checkpoints live: `<workdir>/checkpoints`."""
    return Path(workdir) / CHECKPOINT_SUBDIR


def checkpoint_name(stage: str, step: int) -> str:
    """The file name of the checkpoint of `stage` after `step` optimizer steps."""
    _check_stage(stage)
    return f"ckpt-{stage}-{int(step):09d}.npz"


def flatten_with_keys(tree: Any) -> dict[str, Any]:
    """The leaves of `tree` keyed by their tree paths (`jax.tree_util.keystr`), in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def save(
    directory: str | os.PathLike,
    state: Any,
    metadata: Mapping[str, Any],
    *,
    keep: int | None = KEEP_PER_STAGE,
) -> Path:
    """Writes `state` and `metadata` atomically as one `.npz`; keeps the last `keep` of the stage.

    Args:
        directory: the checkpoint directory (created if missing).
        state: a pytree of arrays (numpy or fully addressable / replicated `jax.Array`).
        metadata: JSON-serialisable dict; must hold `stage` (str) and `step` (int).
        keep: how many checkpoints of this stage to keep (older ones are deleted after the new
            one is in place); None keeps all.

    Returns:
        The path of the written checkpoint.
    """
    for key in ("stage", "step"):
        if key not in metadata:
            raise ValueError(
                f"Checkpoint metadata must contain {key!r}. Received keys: {sorted(metadata)!r}"
            )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stage, step = str(metadata["stage"]), int(metadata["step"])

    arrays, stored_as = {}, {}
    for key, leaf in flatten_with_keys(state).items():
        array = _to_host(leaf)
        if array.dtype.name in _VIEWED_DTYPES:
            stored_as[key] = array.dtype.name
            array = array.view(_VIEWED_DTYPES[array.dtype.name])
        arrays[key] = array
    full_metadata = dict(metadata, format_version=FORMAT_VERSION, stored_dtypes=stored_as)
    try:
        encoded = json.dumps(full_metadata, sort_keys=True).encode("utf-8")
    except TypeError as error:
        raise ValueError(
            f"Checkpoint metadata must be JSON-serialisable ({error}). Received: {metadata!r}"
        ) from None
    arrays[_METADATA_KEY] = np.frombuffer(encoded, dtype=np.uint8)

    final_path = directory / checkpoint_name(stage, step)
    previous = latest(directory, stage)
    try:
        with atomic.replacing(final_path, suffix=".npz", durable=True) as temporary:
            with open(temporary, "wb") as file:
                np.savez(file, allow_pickle=False, **arrays)
    except OSError as error:
        kept = f"the latest is still {previous}" if previous else "no earlier one exists"
        raise CheckpointWriteError(
            f"Could not write the checkpoint {final_path} ({error.strerror or error}); nothing "
            f"was written under its name and {kept}. Free disk space (or raise the file-size "
            "or quota limit) and rerun with --resume to continue from the latest checkpoint."
        ) from error
    # Temporary files of writes killed mid-way (one writer per workdir: none is in progress).
    for stale in directory.glob(f".ckpt-{stage}-*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    if keep is not None:
        for old in list_checkpoints(directory, stage)[:-keep]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    return final_path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint file."""
    with _open_npz(path) as archive:
        return _metadata_of(archive, path)


def restore(path: str | os.PathLike, target: Any) -> tuple[Any, dict[str, Any]]:
    """Reads a checkpoint into the structure of `target`, strictly.

    Args:
        path: a checkpoint file written by `save`.
        target: a pytree with the expected structure; its leaves only give shapes and dtypes
            (arrays or `jax.ShapeDtypeStruct`).

    Returns:
        `(tree, metadata)`: `tree` has `target`'s structure with numpy leaves.

    Raises:
        CheckpointError: the file is not a readable pickle-free checkpoint, or it does not match
            `target`; the message lists every missing, unexpected, mis-shaped and mis-typed leaf.
    """
    expected = flatten_with_keys(target)
    with _open_npz(path) as archive:
        metadata = _metadata_of(archive, path)
        stored_as = metadata.get("stored_dtypes", {})
        found = [key for key in archive.files if key != _METADATA_KEY]
        problems = [f"missing from the file: {key}" for key in expected if key not in found]
        problems += [f"unexpected in the file: {key}" for key in found if key not in expected]
        values = {}
        for key, leaf in expected.items():
            if key not in found:
                continue
            array = _read_array(archive, key, path)
            if key in stored_as:
                array = array.view(np.dtype(stored_as[key]))
            want_shape, want_dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
            if array.shape != want_shape:
                problems.append(f"shape of {key}: file {array.shape}, expected {want_shape}")
            elif array.dtype != want_dtype:
                problems.append(f"dtype of {key}: file {array.dtype}, expected {want_dtype}")
            values[key] = array
    if problems:
        listing = "\n  ".join(problems)
        raise StateMismatchError(
            f"The checkpoint {str(path)!r} does not match the state it is restored into "
            f"({len(problems)} problem(s)):\n  {listing}\nRestore it with the same model and "
            "optimizer settings that wrote it, or start a new --workdir."
        )
    treedef = jax.tree_util.tree_structure(target)
    return jax.tree_util.tree_unflatten(treedef, [values[key] for key in expected]), metadata


def list_checkpoints(directory: str | os.PathLike, stage: str) -> list[Path]:
    """The complete checkpoints of `stage` in `directory`, oldest (lowest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME_PATTERN.match(path.name)
        if match and match["stage"] == stage and path.is_file():
            found.append((int(match["step"]), path))
    return [path for _, path in sorted(found)]


def restore_latest_readable(
    directory: str | os.PathLike, stage: str, target: Any
) -> tuple[Path, Any, dict[str, Any]] | None:
    """Restores the newest checkpoint of `stage` that reads back whole, newest first.

    A truncated or corrupt checkpoint is skipped with a warning naming it and the reason, and
    the one before it is tried, so a crash or a bad disk block costs at most the epochs since
    the last good checkpoint.

    Returns:
        `(path, tree, metadata)` of the checkpoint used, or None when the stage has none.

    Raises:
        CheckpointError: every checkpoint of `stage` is unreadable (all are named), or the
            newest readable one does not match `target`.
    """
    found = list_checkpoints(directory, stage)
    failures = []
    for path in reversed(found):
        try:
            tree, metadata = restore(path, target)
        except StateMismatchError:
            raise
        except CheckpointError as error:
            failures.append(f"{path}: {error}")
            print(
                f"warning: the checkpoint {path} is unreadable ({error}); trying the one before "
                "it.",
                file=sys.stderr,
            )
            continue
        return path, tree, metadata
    if failures:
        raise CheckpointError(
            f"No checkpoint of {stage} in {str(directory)!r} can be read:\n  "
            + "\n  ".join(failures)
            + "\nStart this stage afresh with --overwrite (or move the files away)."
        )
    return None


def latest(directory: str | os.PathLike, stage: str) -> Path | None:
    """The checkpoint of `stage` with the highest step in `directory`, or None."""
    found = list_checkpoints(directory, stage)
    return found[-1] if found else None


def finished_marker(workdir: str | os.PathLike, stage: str) -> Path:
    """The file that says `stage` ran to its end in `workdir`."""
    _check_stage(stage)
    return checkpoint_dir(workdir) / f"{stage}.finished.json"


def mark_finished(workdir: str | os.PathLike, stage: str, info: Mapping[str, Any]) -> Path:
    """Writes (atomically) the marker that `stage` finished, with `info` (JSON) in it."""
    marker = finished_marker(workdir, stage)
    atomic.write_json(marker, dict(info, stage=stage), indent=None, durable=True, sort_keys=True)
    return marker


def is_finished(workdir: str | os.PathLike, stage: str) -> bool:
    """Whether `stage` wrote its end marker in `workdir`."""
    return finished_marker(workdir, stage).is_file()


def guard_workdir(
    workdir: str | os.PathLike, stage: str, *, resume: bool, resume_flag: str = "--resume"
) -> Path | None:
    """Decides whether a run of `stage` may use `workdir`; never overwrites silently.

    Returns:
        The latest checkpoint of `stage` to resume from when `resume` is set and one exists;
        None when the workdir holds nothing of this stage (a fresh start).

    Raises:
        WorkdirInUseError: the workdir holds this stage's checkpoints (finished or not) and
            `resume` is not set; the message names `resume_flag`.
    """
    found = latest(checkpoint_dir(workdir), stage)
    finished = is_finished(workdir, stage)
    if resume or (found is None and not finished):
        return found
    state = "finished" if finished else "started but did not finish"
    raise WorkdirInUseError(
        f"The workdir {str(workdir)!r} already holds a run of {stage} that {state} "
        f"(latest checkpoint: {str(found) if found else 'none'}). Nothing is overwritten "
        f"silently: pass {resume_flag} to continue it (a finished stage is then reused as is), "
        "or choose a new --workdir."
    )


def _check_stage(stage: str) -> None:
    if not isinstance(stage, str) or not re.fullmatch(r"[A-Za-z0-9_.]+", stage):
        raise ValueError(
            "A stage name must be a non-empty string of letters, digits, '_' or '.'. "
            f"Received: stage={stage!r}"
        )


def _to_host(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            raise ValueError(
                "Checkpoints hold replicated state; this array is sharded across hosts. "
                f"Received: shape={leaf.shape}, sharding={leaf.sharding}"
            )
        leaf = leaf.addressable_data(0)
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


@contextlib.contextmanager
def _open_npz(path):
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise CheckpointError(
            f"Cannot read {str(path)!r} as a checkpoint ({error}). Checkpoints are .npz files "
            "written by mtkd_jax.checkpoint.save."
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointError(
            f"{str(path)!r} is a single .npy array, not a checkpoint (.npz written by "
            "mtkd_jax.checkpoint.save)."
        )
    with archive:
        yield archive


def _read_array(archive, key, path) -> np.ndarray:
    try:
        return archive[key]
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise CheckpointError(
            f"Cannot read the entry {key!r} of the checkpoint {str(path)!r} ({error}): the file "
            "is truncated or corrupt."
        ) from None
    except ValueError as error:
        raise CheckpointError(
            f"Refusing to load {str(path)!r}: entry {key!r} is not a plain array ({error}). "
            "Checkpoints never contain pickled objects; this file was not written by "
            "mtkd_jax.checkpoint.save and may execute code if unpickled."
        ) from None


def _metadata_of(archive, path) -> dict[str, Any]:
    if _METADATA_KEY not in archive.files:
        raise CheckpointError(
            f"{str(path)!r} has no {_METADATA_KEY!r} entry: it is not a checkpoint written by "
            "mtkd_jax.checkpoint.save."
        )
    raw = _read_array(archive, _METADATA_KEY, path)
    try:
        return json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"The metadata of {str(path)!r} is not valid JSON ({error})."
        ) from None
