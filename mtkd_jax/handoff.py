"""What stage 1 leaves in the workdir for stage 2, and how stage 2 reads it back.

Stage 2 (and the supervised baseline) need only:

    text_features.npz            the teacher's class text features [C, D], its logit scale and
                                 the class names they belong to
    student_architecture.json    the student's Keras config (adapter off) and its image size
    student_stage1.weights.h5    the distilled student's weights

so `--stage=2` builds the student from its config and the stage-1 weights, and never loads the
teacher or a pretrained student. The teacher's accuracies stay in `results.json`.
"""

import json
from pathlib import Path

import numpy as np

from mtkd_jax import checkpoint
from mtkd_jax import workdir as workdir_lib
from mtkd_jax.errors import InputError

ARCHITECTURE_FORMAT = 1


def write_text_features(
    workdir: Path, text_features: np.ndarray, logit_scale: float, classnames
) -> None:
    """Stores the teacher's class text features `[C, D]` and logit scale (process 0)."""
    workdir_lib.write_npz(
        Path(workdir) / workdir_lib.TEXT_FEATURES_FILE,
        text_features=np.asarray(text_features, np.float32),
        logit_scale=np.float32(logit_scale),
        classnames=np.asarray(list(classnames), dtype=str),
    )


def read_text_features(workdir: Path, classnames) -> tuple[np.ndarray, float]:
    """`(text_features [C, D] float32, logit_scale)` stored by stage 1, checked against the
    dataset's `classnames`."""
    path = Path(workdir) / workdir_lib.TEXT_FEATURES_FILE
    with np.load(path, allow_pickle=False) as archive:
        text = np.asarray(archive["text_features"], np.float32)
        scale = float(archive["logit_scale"])
        stored = [str(name) for name in archive["classnames"]]
    if stored != list(classnames):
        raise InputError(
            f"{path} holds the text features of other classes ({len(stored)}: "
            f"{', '.join(stored[:3])}, ...) than this run's dataset ({len(classnames)}: "
            f"{', '.join(list(classnames)[:3])}, ...). Run stage 2 with the --dataset of its "
            "stage 1, or run stage 1 again into this workdir."
        )
    return text, scale


def write_architecture(workdir: Path, student, *, image_size: int) -> None:
    """Writes `student_architecture.json`: the student's Keras config (adapter off) and image
    size, from which `read_student` builds it again (process 0)."""
    import keras

    config = keras.saving.serialize_keras_object(student)
    config["config"]["use_adapter"] = False
    workdir_lib.write_json(
        Path(workdir) / workdir_lib.STUDENT_ARCHITECTURE_FILE,
        {"format": ARCHITECTURE_FORMAT, "image_size": int(image_size), "student": config},
    )


def read_architecture(workdir: Path) -> dict:
    """The stored `{"format", "image_size", "student"}` of `student_architecture.json`."""
    path = Path(workdir) / workdir_lib.STUDENT_ARCHITECTURE_FILE
    with open(path) as file:
        stored = json.load(file)
    if stored.get("format") != ARCHITECTURE_FORMAT:
        raise InputError(
            f"{path} has format {stored.get('format')!r}; this mtkd_jax reads format "
            f"{ARCHITECTURE_FORMAT}. Run stage 1 again into this workdir."
        )
    return stored


def read_student(workdir: Path, stage_name: str):
    """The student of `stage_name` (adapter off), built from its stored config and weights.

    No pretrained weights are read: the architecture comes from `student_architecture.json`
    (Keras deserialisation builds it with fresh variables) and every weight from the stage's
    `.weights.h5`.
    """
    import keras

    from mtkd_jax.student import Student

    workdir = Path(workdir)
    student = keras.saving.deserialize_keras_object(read_architecture(workdir)["student"])
    if not isinstance(student, Student):
        raise InputError(f"{workdir / workdir_lib.STUDENT_ARCHITECTURE_FILE} is not a student.")
    student.load_weights(str(workdir / workdir_lib.weights_file(stage_name)))
    return student


def check(workdir: Path, config) -> None:
    """Raises one `InputError` naming the command that makes stage 1 when its outputs are
    missing from `workdir` (before a stage-2 run does any work)."""
    workdir = Path(workdir)
    needed = (
        workdir_lib.weights_file("stage1"),
        workdir_lib.STUDENT_ARCHITECTURE_FILE,
        workdir_lib.TEXT_FEATURES_FILE,
    )
    missing = [name for name in needed if not (workdir / name).is_file()]
    if not checkpoint.is_finished(workdir, "stage1"):
        missing.insert(0, "a finished stage1")
    if missing:
        command = (
            f"python -m mtkd_jax.main --stage=1 --dataset={config.dataset} "
            f"--shots={config.shots} --seed={config.seed} --workdir={workdir}"
        )
        raise InputError(
            f"Stage 2 builds on a finished stage 1 in {workdir}, which is not there (missing: "
            f"{', '.join(missing)}). Make it with:\n  {command}"
        )
