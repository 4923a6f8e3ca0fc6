"""The reference's protocol one flag away, and ablations that differ only in the loss."""

import json

import numpy as np
import pytest
from smoke_runs import smoke_config

from mtkd_jax import experiment


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


class _FitSpy:
    """Wraps `experiment.fit_stage`, recording what each stage trains on."""

    def __init__(self, original):
        self.original, self.seen = original, {}

    def __call__(self, ctx, stage, model, loss_fn, frozen):
        split = stage.data(ctx)
        self.seen[stage.name] = (
            len(split),
            set(split.labels.tolist()),
            getattr(frozen, "text", None),
        )
        return self.original(ctx, stage, model, loss_fn, frozen)


@pytest.fixture(scope="module")
def small_split_run(tmp_path_factory):
    """Every stage and baseline on splits smaller than the batch (1 shot of 36 classes: 36
    unlabeled and 18 base images, batch 64), stage 2 on all classes, epochs selected on the
    validation images."""
    workdir = tmp_path_factory.mktemp("small")
    config = smoke_config(
        workdir,
        shots=1,
        batch_size=64,
        epochs=2,
        adapter_epochs=2,
        log_every=1,
        supervised_epochs=2,
        baselines=("supervised", "instance_only"),
        stage2_classes="all",
        epoch_selection="val",
        eval_every=1,
    )
    spy = _FitSpy(experiment.fit_stage)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment, "fit_stage", spy)
        results = experiment.run(config)
    return workdir, results, spy.seen


def test_splits_smaller_than_the_batch_train_every_stage(small_split_run):
    workdir, results, _ = small_split_run
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
    workdir, _, _ = small_split_run
    reference = _first_train_line(workdir, "stage1")
    first = _first_train_line(workdir, "stage1_instance_only")
    for level in LEVELS:
        np.testing.assert_array_equal(first[level], reference[level], err_msg=level)
    # The weights differ in the loss, so the totals do (else the check above proves nothing).
    assert first["loss"] != pytest.approx(reference["loss"])


def test_epochs_are_selected_on_validation_images_and_evaluated_every_n(small_split_run):
    workdir, results, _ = small_split_run
    selected = results["epoch_selection"]
    assert set(selected) == {"stage1", "stage1_instance_only", "stage2", "supervised"}
    for stage, summary in selected.items():
        evals = _lines(workdir, stage, "eval")
        assert [line["epoch"] for line in evals] == list(range(len(evals))), stage
        best = max(evals, key=lambda line: (line["val"], -line["epoch"]))
        assert summary["criterion"] == "val" and summary["epoch"] == best["epoch"], stage
        assert summary["score"] == pytest.approx(best["val"])
        # The kept epoch's weights are the ones evaluated after the stage (and saved).
        method = "student_" + stage
        assert results["methods"][method]["all"] == pytest.approx(best["all"]), stage


def test_a_run_with_epoch_selection_writes_only_what_overwrite_removes(small_split_run):
    """Every entry such a run leaves in its workdir is in the run layout that --overwrite
    clears (mtkd_jax.workdir.OWNED_ENTRIES), the best-epoch files included."""
    from mtkd_jax import workdir as workdir_lib

    workdir, _, _ = small_split_run
    entries = {path.name for path in workdir.iterdir()} - {workdir_lib.MARKER}
    assert any(name.endswith("_best_epoch.npz") for name in entries)
    assert entries <= set(workdir_lib.OWNED_ENTRIES), entries - set(workdir_lib.OWNED_ENTRIES)


def test_stage2_on_all_classes_trains_on_every_class_against_every_class(small_split_run):
    """--stage2_classes=all: stage 2 and the supervised baseline take the shots of all 36
    classes and all 36 rows of text features; stage 0 stays on the 18 base classes."""
    _, _, seen = small_split_run
    for stage in ("stage2", "supervised"):
        size, labels, text = seen[stage]
        assert (size, labels, text.shape[0]) == (36, set(range(36)), 36), stage
    assert seen["stage0"][1] == set(range(18))


def test_stage1_shots_and_selection_on_base_test_images(tmp_path, monkeypatch):
    """--stage1_shots sizes stage 1's pool alone; --epoch_selection=test_base scores the base
    classes' test accuracy every epoch."""
    spy = _FitSpy(experiment.fit_stage)
    monkeypatch.setattr(experiment, "fit_stage", spy)
    config = smoke_config(
        tmp_path,
        stage="1",
        teacher_prompt_length=0,
        teacher_prompt_depth=0,
        shots=2,
        stage1_shots=1,
        epochs=2,
        adapter_epochs=1,
        log_every=1,
        epoch_selection="test_base",
        eval_every=2,
    )
    results = experiment.run(config)
    assert spy.seen["stage1"][0] == 36  # 1 shot of 36 classes, not --shots=2
    evals = _lines(tmp_path, "stage1", "eval")
    assert [line["epoch"] for line in evals] == [0, 1]
    # --eval_every=2: test accuracies at the second epoch, not at the first.
    assert "all" not in evals[0] and {"base", "novel", "hm", "all"} <= set(evals[1])
    best = max(evals, key=lambda line: (line["test_base"], -line["epoch"]))
    assert results["epoch_selection"]["stage1"] == {
        "criterion": "test_base",
        "epoch": best["epoch"],
        "score": pytest.approx(best["test_base"]),
    }


def test_epoch_selector_keeps_the_first_best_epoch_and_survives_a_restart(tmp_path):
    from mtkd_jax.selection import EpochSelector

    selector = EpochSelector("val", "stage2", tmp_path)
    weights = lambda x: ([np.full((2, 3), x, np.float32)], [np.full((3,), -x, np.float32)])  # noqa: E731
    for epoch, score in enumerate([0.2, 0.5, 0.5, 0.4]):
        selector.update(epoch, score, *weights(epoch))
    assert (selector.epoch, selector.score) == (1, 0.5)  # a tie keeps the earlier epoch
    restarted = EpochSelector("val", "stage2", tmp_path)
    assert restarted.restore()
    assert (restarted.epoch, restarted.score) == (1, 0.5)
    np.testing.assert_array_equal(restarted.trainable[0], weights(1)[0][0])
    np.testing.assert_array_equal(restarted.non_trainable[0], weights(1)[1][0])
    restarted.discard()
    assert not EpochSelector("val", "stage2", tmp_path).restore()
    with pytest.raises(ValueError, match="val, test_base"):
        EpochSelector("last", "stage2", tmp_path)
