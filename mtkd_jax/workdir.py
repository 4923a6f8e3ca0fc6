"""What a run may do to its workdir: claim it, and remove only what mtkd_jax wrote there.

A workdir that mtkd_jax created, or found empty, gets a marker file, `.mtkd_jax_workdir`
(JSON). `--overwrite` is then allowed there and removes exactly the entries of the run layout
(`OWNED_ENTRIES`, plus the hidden temporary files an interrupted atomic write may leave behind
beside them); any other file or folder in the workdir stays. A non-empty folder without the
marker is never cleared: `--overwrite` into it is refused with a message naming it, so
`--workdir=$HOME --overwrite` deletes nothing.

A folder holding nothing but a sweep's `log.txt` is claimed like an empty one. A non-empty
unmarked folder that holds only names of the run layout (a workdir of an mtkd_jax from before
the marker) is claimed by a run without `--overwrite`, which removes nothing.

This module imports neither Keras nor TensorFlow.
"""

import json
import os
import shutil
from pathlib import Path

from mtkd_jax import atomic, errors

MARKER = ".mtkd_jax_workdir"

# Every entry a run writes directly into its workdir (see the README, "The workdir").
OWNED_FILES = (
    "flags.json",
    "metrics.jsonl",
    "text_features.npz",
    "teacher_prompts.npz",
    "student_stage1.weights.h5",
    "student_stage2.weights.h5",
    "student_stage1_instance_only.weights.h5",
    "student_supervised.weights.h5",
    "results.json",
    "results.png",
    "student.keras",
    # --epoch_selection's best epoch per student stage (mtkd_jax.selection.BEST_FILE).
    "stage1_best_epoch.npz",
    "stage1_instance_only_best_epoch.npz",
    "stage2_best_epoch.npz",
    "supervised_best_epoch.npz",
)
OWNED_DIRS = ("checkpoints", "tensorboard")
OWNED_ENTRIES = OWNED_FILES + OWNED_DIRS
# Written into a workdir by `mtkd_jax.sweep` before the run starts; never removed by a run.
SWEEP_LOG = "log.txt"


def is_marked(workdir: str | os.PathLike) -> bool:
    """Whether `workdir` carries mtkd_jax's workdir marker."""
    return (Path(workdir) / MARKER).is_file()


def _is_temporary_of_owned(name: str) -> bool:
    # `mtkd_jax.atomic.replacing` writes `.<final name>.<random><suffix>` beside the final file.
    return name.startswith(".") and any(name.startswith(f".{owned}.") for owned in OWNED_FILES)


def _only_run_layout(entries: list[str]) -> bool:
    allowed = {*OWNED_ENTRIES, MARKER, SWEEP_LOG}
    return all(name in allowed or _is_temporary_of_owned(name) for name in entries)


def claim(workdir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Makes `workdir` an mtkd_jax workdir (creating it and its marker), or refuses it.

    Raises:
        InputError: `workdir` is empty (it would mean the current directory), is not a
            folder, or is a non-empty folder without the marker that `overwrite` would clear,
            or that holds files of other programs.
    """
    if not str(workdir).strip():
        raise errors.InputError(
            "The workdir is empty, which would mean the current directory. Pass --workdir "
            "(RunConfig.workdir) or build the config with mtkd_jax.config.with_dataset_defaults."
        )
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise errors.InputError(f"--workdir={str(workdir)!r} exists and is not a folder.")
    if is_marked(workdir):
        return workdir
    entries = sorted(os.listdir(workdir)) if workdir.exists() else []
    if set(entries) - {SWEEP_LOG} and (overwrite or not _only_run_layout(entries)):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        action = "--overwrite would remove files from it" if overwrite else "its files"
        raise errors.InputError(
            f"--workdir={str(workdir)!r} is a non-empty folder ({shown}) that mtkd_jax did not "
            f"create (no {MARKER} marker), and {action} are not mtkd_jax's to touch. Choose a "
            f"new or empty --workdir; if it is an mtkd_jax workdir from before the marker "
            f"existed, run `touch {workdir / MARKER}` to claim it."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(workdir / MARKER, json.dumps({"written_by": "mtkd_jax", "version": 1}) + "\n")
    return workdir


def remove_run(workdir: str | os.PathLike) -> list[str]:
    """Removes the run layout's entries from a marked `workdir`; returns their names.

    Nothing else is touched: other files and folders, the marker and a sweep's log stay.
    """
    workdir = Path(workdir)
    if not is_marked(workdir):
        raise errors.InputError(
            f"{str(workdir)!r} has no {MARKER} marker; mtkd_jax removes files only from its "
            "own workdirs."
        )
    removed = []
    for name in sorted(os.listdir(workdir)):
        path = workdir / name
        if name in OWNED_DIRS and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif (name in OWNED_FILES or _is_temporary_of_owned(name)) and not path.is_dir():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed
