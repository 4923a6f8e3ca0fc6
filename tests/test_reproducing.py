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


def _lines(workdir, stage, kind):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["stage"] == stage and r["kind"] == kind]


@pytest.fixture(scope="module")
def small_split_run(tmp_path_factory):
    """Every stage and baseline on splits smaller than the batch (1 shot of 36 classes: 36
    unlabeled and 18 base images, batch 64), selecting epochs on the validation images."""
    workdir = tmp_path_factory.mktemp("small")
    config = _smoke(
        workdir,
        shots=1,
        batch_size=64,
        epochs=2,
        supervised_epochs=1,
        baselines=("supervised", "instance_only"),
        epoch_selection="val",
        eval_every=2,
    )
    return workdir, experiment.run(config)


def test_splits_smaller_than_the_batch_train_every_stage(small_split_run):
    workdir, results = small_split_run
    assert results["finished"]
    for stage in ("stage0", "stage1", "stage1_instance_only", "stage2", "supervised"):
        lines = _lines(workdir, stage, "train")
        # One masked partial batch per epoch.
        assert [line["step"] for line in lines] == list(range(1, len(lines) + 1)), stage
        assert all(np.isfinite(line["loss"]) for line in lines), stage
    for method in ("student_stage1", "student_stage2", "student_supervised"):
        assert 0.0 <= results["methods"][method]["all"] <= 1.0


def test_stage1_variants_start_from_the_same_weights_and_batches(small_split_run):
    """The first step's unweighted loss terms (computed before any update, from the initial
    weights and the first batch) are equal for stage 1 with all levels and for the instance-only
    baseline of the same run. (The ablation flag files run stage 1 under its own name, so they
    read the same data stream and build the student from the same seed.)"""
    workdir, _ = small_split_run
    reference = _first_train_line(workdir, "stage1")
    first = _first_train_line(workdir, "stage1_instance_only")
    for level in LEVELS:
        np.testing.assert_array_equal(first[level], reference[level], err_msg=level)
    # The weights differ in the loss, so the totals do (else the check above proves nothing).
    assert first["loss"] != pytest.approx(reference["loss"])


def test_epochs_are_selected_on_validation_images_and_evaluated_every_n(small_split_run):
    workdir, results = small_split_run
    selected = results["epoch_selection"]
    assert set(selected) == {"stage1", "stage1_instance_only", "stage2", "supervised"}
    for stage, summary in selected.items():
        evals = _lines(workdir, stage, "eval")
        assert [line["epoch"] for line in evals] == list(range(len(evals))), stage
        best = max(evals, key=lambda line: (line["val"], -line["epoch"]))
        assert summary["criterion"] == "val" and summary["epoch"] == best["epoch"], stage
        assert summary["score"] == pytest.approx(best["val"])
    # --eval_every=2: test accuracies at the second epoch of stage 1, not at the first.
    stage1 = _lines(workdir, "stage1", "eval")
    assert "all" not in stage1[0] and {"base", "novel", "hm", "all"} <= set(stage1[1])


def test_reference_classes_shots_and_test_selection(tmp_path, monkeypatch):
    """--stage2_classes=all trains stage 2 on every class's shots against every class's text;
    --stage1_shots sizes stage 1's pool alone; --epoch_selection=test_base scores base test
    accuracy each epoch."""
    seen = {}
    original = experiment.fit_stage

    def spy(ctx, stage, model, loss_fn, frozen, split, **kwargs):
        seen[stage] = (len(split), set(split.labels.tolist()), frozen.get("text"))
        return original(ctx, stage, model, loss_fn, frozen, split, **kwargs)

    monkeypatch.setattr(experiment, "fit_stage", spy)
    config = _smoke(
        tmp_path, shots=2, stage1_shots=1, stage2_classes="all", epoch_selection="test_base"
    )
    results = experiment.run(config)
    classes = 36
    assert seen["stage0"][0] == 2 * classes // 2  # base classes only, K=2
    assert seen["stage1"][0] == 1 * classes  # --stage1_shots=1
    size, labels, text = seen["stage2"]
    assert size == 2 * classes and labels == set(range(classes)) and text.shape[0] == classes
    assert results["epoch_selection"]["stage2"]["criterion"] == "test_base"
    assert "test_base" in _lines(tmp_path, "stage2", "eval")[0]
