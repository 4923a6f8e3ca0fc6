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

This module imports neither Keras nor TensorFlow. It names every file of the run layout.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

from mtkd_jax import atomic, checkpoint, errors, stages

MARKER = ".mtkd_jax_workdir"
FLAGS_FILE = "flags.json"
METRICS_FILE = "metrics.jsonl"
TEXT_FEATURES_FILE = "text_features.npz"  # the teacher's class text features (mtkd_jax.handoff)
STUDENT_ARCHITECTURE_FILE = "student_architecture.json"  # the student's Keras config (handoff)
TEACHER_PROMPTS_FILE = "teacher_prompts.npz"  # the stage-0 deep prompts (mtkd_jax.teacher)
RESULTS_FILE = "results.json"
PLOT_FILE = "results.png"
EXPORT_FILE = "student.keras"


def weights_file(stage_name: str) -> str:
    """The student weights a student stage writes: `student_<stage>.weights.h5`."""
    return f"student_{stage_name}.weights.h5"


def best_epoch_file(stage_name: str) -> str:
    """`--epoch_selection`'s best epoch of a student stage (`mtkd_jax.selection`)."""
    return f"{stage_name}_best_epoch.npz"


# Every entry a run writes directly into its workdir (see the README, "The workdir").
OWNED_FILES = (
    FLAGS_FILE,
    METRICS_FILE,
    TEXT_FEATURES_FILE,
    STUDENT_ARCHITECTURE_FILE,
    TEACHER_PROMPTS_FILE,
    *(weights_file(stage.name) for stage in stages.STAGES if stage.trains_student),
    RESULTS_FILE,
    PLOT_FILE,
    EXPORT_FILE,
    *(best_epoch_file(stage.name) for stage in stages.STAGES if stage.trains_student),
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


def prepare(config) -> Path:
    """Claims `config.workdir` and records the flags; never overwrites finished work silently.

    A workdir that already holds checkpoints of the stages this run would train is refused
    before anything is written, unless `--resume` (continue, reusing finished stages) or
    `--overwrite` (start those stages afresh: `--stage=all` removes the run layout's files, a
    single stage removes only its own checkpoints). Only a workdir that carries the marker is
    ever cleared, and only of what mtkd_jax writes. Other stages' work (stage 1 when running
    stage 2) is what this run builds on and is left alone.
    """
    workdir = claim(config.workdir, overwrite=config.overwrite)
    names = [stage.name for stage in stages.selected(config) if stage.trains]
    directory = checkpoint.checkpoint_dir(workdir)
    if config.overwrite and config.stage == "all":
        removed = remove_run(workdir)
        if removed:
            print(f"--overwrite: removed {', '.join(removed)} from {workdir}")
    elif config.overwrite:
        print(f"--overwrite: removing the checkpoints of {', '.join(names)} in {workdir}")
        for name in names:
            for path in checkpoint.list_checkpoints(directory, name):
                path.unlink()
            checkpoint.finished_marker(workdir, name).unlink(missing_ok=True)
    elif not config.resume:
        used = [
            name
            for name in names
            if checkpoint.latest(directory, name) is not None
            or checkpoint.is_finished(workdir, name)
        ]
        if used:
            raise FileExistsError(
                f"{workdir} already holds {', '.join(used)} of an earlier run. Nothing is "
                "overwritten silently: pass --resume to continue it (finished stages are reused), "
                "--overwrite to start afresh, or choose another --workdir."
            )
    atomic.write_json(workdir / FLAGS_FILE, dataclasses.asdict(config))
    return workdir


def write_npz(path: Path, **arrays) -> None:
    """`np.savez` (no pickles) to `path`, atomically; by process 0 of a multi-process run."""
    import numpy as np

    from mtkd_jax import distributed

    arrays = {k: np.asarray(v) for k, v in arrays.items()}

    def write():
        with atomic.replacing(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)

    distributed.on_primary(write, what=f"writing {path}")


def write_weights(model, path: Path) -> None:
    """`model.save_weights` (Keras .weights.h5) to `path`, atomically; by process 0."""
    from mtkd_jax import distributed

    def write():
        with atomic.replacing(path, suffix=".weights.h5") as tmp:
            model.save_weights(str(tmp))

    distributed.on_primary(write, what=f"writing {path}")


def write_json(path: Path, value) -> None:
    """JSON to `path`, atomically; by process 0."""
    from mtkd_jax import distributed

    distributed.on_primary(lambda: atomic.write_json(path, value), what=f"writing {path}")


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
