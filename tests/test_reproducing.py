"""The reference's protocol one flag away, and ablations that differ only in the loss."""

import json

import numpy as np
import pytest

from mtkd_jax import config as config_lib
from mtkd_jax import experiment


def _smoke(workdir, **overrides):
    """tests/test_experiment.py's smoke run: 2 shots of the shapes world, seconds per stage."""
    settings = dict(
        workdir=str(workdir),
        shots=2,
        unlabeled_pool="fewshot",
        epochs=1,
        teacher_epochs=1,
        adapter_epochs=1,
        batch_size=16,
        eval_batch_size=128,
        log_every=1,
        baselines=(),
    )
    settings.update(overrides)
    return config_lib.demo_config(**settings)


def _first_train_line(workdir, stage):
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["stage"] == stage and record["kind"] == "train":
            return record
    raise AssertionError(f"no train line of {stage} in {workdir}")


LEVELS = ("kd_instance", "kd_batch", "kd_class")


def test_stage1_variants_start_from_the_same_weights_and_batches(tmp_path):
    """The first step's unweighted loss terms (computed before any update, from the initial
    weights and the first batch) are equal for stage 1 with all levels and for the instance-only
    baseline of the same run. (The ablation flag files run stage 1 under its own name, so they
    read the same data stream and build the student from the same seed.)"""
    plain_teacher = dict(stage="1", teacher_prompt_length=0, teacher_prompt_depth=0)
    experiment.run(_smoke(tmp_path, baselines=("instance_only",), **plain_teacher))
    reference = _first_train_line(tmp_path, "stage1")
    first = _first_train_line(tmp_path, "stage1_instance_only")
    for level in LEVELS:
        np.testing.assert_array_equal(first[level], reference[level], err_msg=level)
    # The weights differ in the loss, so the totals do (else the check above proves nothing).
    assert first["loss"] != pytest.approx(reference["loss"])
