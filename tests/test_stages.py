"""The stages as values: one spelling per stage, what each run selects, what each reads first."""

import pytest

from mtkd_jax import config as config_lib
from mtkd_jax import experiment, main, stages
from mtkd_jax import workdir as workdir_lib
from mtkd_jax.errors import InputError


def _names(**settings):
    return [stage.name for stage in stages.selected(config_lib.RunConfig(**settings))]


def test_each_stage_has_one_name_and_derived_keys():
    names = [stage.name for stage in stages.STAGES]
    assert len(names) == len(set(names))
    assert [stages.get(name) for name in names] == list(stages.STAGES)
    methods = {stage.name: stage.method for stage in stages.STAGES}
    assert methods == {
        "zero_shot": "teacher_zero_shot",
        "stage0": "teacher_stage0",
        "stage1": "student_stage1",
        "stage1_instance_only": "student_stage1_instance_only",
        "stage2": "student_stage2",
        "supervised": "student_supervised",
    }
    with pytest.raises(KeyError, match="stage1_instance_only"):
        stages.get("stage3")


def test_command_line_choices_derive_from_the_stages():
    assert config_lib.CHOICES["stage"] == ("0", "1", "2", "all")
    assert set(config_lib.CHOICES["baselines"]) == {"zero_shot", "supervised", "instance_only"}
    assert main.flags.FLAGS["stage"].parser.enum_values == list(config_lib.CHOICES["stage"])
    for stage in stages.STAGES:  # every training stage's files belong to the run layout
        if stage.trains_student:
            assert workdir_lib.weights_file(stage.name) in workdir_lib.OWNED_FILES
            assert workdir_lib.best_epoch_file(stage.name) in workdir_lib.OWNED_FILES


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(), ["stage0", "stage1", "stage2"]),
        (
            dict(baselines=("supervised", "zero_shot", "instance_only")),
            ["zero_shot", "stage0", "stage1", "stage1_instance_only", "stage2", "supervised"],
        ),
        (dict(teacher_prompts="model-best.pth.tar"), ["stage1", "stage2"]),
        (dict(stage="0", teacher_prompts="model-best.pth.tar"), ["stage0"]),
        (dict(stage="1", baselines=("zero_shot", "supervised")), ["zero_shot", "stage1"]),
        (dict(stage="2", baselines=("zero_shot", "supervised")), ["stage2", "supervised"]),
    ],
)
def test_a_run_selects_the_stages_of_its_step_and_baselines_in_order(settings, expected):
    assert _names(**settings) == expected


def test_stages_that_train_have_what_training_needs():
    for stage in stages.STAGES:
        if stage.trains is None:
            assert stage.objective is None and stage.data is None, stage.name
            continue
        assert stage.objective and stage.data and stage.write, stage.name
        assert stage.epochs_flag in {f.name for f in config_lib.dataclasses.fields(
            config_lib.RunConfig)}  # fmt: skip
    config = config_lib.RunConfig(epochs=7, adapter_epochs=3)
    assert stages.STAGE2.epochs(config) == 3 and stages.STAGE1.epochs(config) == 7


def test_ablations_of_stage1_read_stage1s_batches_and_only_stage1s():
    seeds = {s.name: s.epoch_seed(1, 0) for s in stages.STAGES}
    assert seeds["stage1_instance_only"] == seeds["stage1"]
    assert len({seeds[name] for name in ("stage0", "stage1", "stage2", "supervised")}) == 4
    assert stages.STAGE1.epoch_seed(1, 1) != stages.STAGE1.epoch_seed(1, 0)
    assert stages.STAGE1.epoch_seed(2, 0) != stages.STAGE1.epoch_seed(1, 0)


def test_stage1_without_stage0_prompts_names_the_command_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    config = config_lib.demo_config(workdir=str(workdir), stage="1", shots=2)
    with pytest.raises(InputError, match=r"python -m mtkd_jax.main --stage=0 --dataset=shapes"):
        experiment.run(config)
    assert not workdir.exists()
