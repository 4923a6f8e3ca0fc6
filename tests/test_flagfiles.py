"""Every flags/*.flags file parses with the real flags of mtkd_jax.main into a valid RunConfig,
documents itself, and sets what its name promises."""

import copy
from pathlib import Path

import pytest
from absl import flags

from mtkd_jax import main as main_lib
from mtkd_jax.data import registry

REPO = Path(__file__).resolve().parents[1]
FLAGFILES = sorted((REPO / "flags").glob("*.flags"))
DATASET_FILES = [
    "oxford_pets",
    "oxford_flowers",
    "caltech101",
    "dtd",
    "eurosat",
    "fgvc_aircraft",
    "bach",
    "brain",
    "eyedr",
]
ABLATION_WEIGHTS = {
    "ablation_instance_only": (1.0, 0.0, 0.0),
    "ablation_instance_batch": (1.0, 1.0, 0.0),
    "ablation_instance_class": (1.0, 0.0, 1.0),
    "ablation_all_levels": (1.0, 1.0, 1.0),
}


def _config(path, monkeypatch):
    """The RunConfig that `python -m mtkd_jax.main --flagfile=<path>` would run."""
    monkeypatch.chdir(REPO)  # Nested --flagfile paths are relative to the current directory.
    flag_values = copy.deepcopy(flags.FLAGS)  # Fresh values, the real definitions.
    flag_values(["main", f"--flagfile=flags/{path.name}"])
    return main_lib.config_from_flags(flag_values)


def test_the_expected_files_exist():
    names = {path.stem for path in FLAGFILES}
    expected = {"paper", "demo", "smoke", "ablation_no_stage2", *DATASET_FILES, *ABLATION_WEIGHTS}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", FLAGFILES, ids=lambda p: p.name)
def test_flagfile_parses_into_a_valid_config(path, monkeypatch):
    config = _config(path, monkeypatch)
    config.validate()
    assert config.dataset in registry.REGISTRY


@pytest.mark.parametrize("path", FLAGFILES, ids=lambda p: p.name)
def test_flagfile_starts_with_its_command_and_expectations(path):
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert header and header[0].startswith("# Command: python -m mtkd_jax.")
    assert "Expected runtime" in text and "Expected result" in text
    assert all(line.startswith("--") for line in lines[len(header) :] if line.strip())


@pytest.mark.parametrize("name", DATASET_FILES)
def test_dataset_files_name_their_dataset_on_the_paper_settings(name, monkeypatch):
    config = _config(REPO / "flags" / f"{name}.flags", monkeypatch)
    paper = _config(REPO / "flags" / "paper.flags", monkeypatch)
    assert config.dataset == name
    assert config.kd_weight > 0
    assert {
        field: getattr(config, field)
        for field in ("batch_size", "lr", "epochs", "temperatures", "teacher", "student", "shots")
    } == {
        field: getattr(paper, field)
        for field in ("batch_size", "lr", "epochs", "temperatures", "teacher", "student", "shots")
    }


def test_paper_flags_hold_the_papers_settings(monkeypatch):
    config = _config(REPO / "flags" / "paper.flags", monkeypatch)
    assert (config.batch_size, config.optimizer, config.momentum) == (8, "sgd", 0.9)
    assert (config.weight_decay, config.lr, config.epochs) == (5e-4, 0.005, 20)
    assert (config.warmup_epochs, config.warmup_lr) == (1, 1e-5)
    assert config.temperatures == (1.0, 2.0, 3.0, 5.0, 6.0)
    assert config.loss_weights == (1.0, 1.0, 1.0)
    assert (config.reduction, config.residual_ratio, config.image_size) == (24, 0.2, 224)
    assert config.teacher == "keras_hub:clip_vit_large_patch14"
    assert (config.teacher_prompt_length, config.teacher_prompt_depth) == (4, 9)
    assert config.student == "clip:keras_hub:clip_vit_base_patch16"
    assert (config.student_prompt_length, config.student_prompt_depth) == (4, 9)
    assert config.shots == 16


@pytest.mark.parametrize("name", sorted(ABLATION_WEIGHTS))
def test_ablation_files_set_their_loss_levels(name, monkeypatch):
    config = _config(REPO / "flags" / f"{name}.flags", monkeypatch)
    assert config.loss_weights == ABLATION_WEIGHTS[name]
    assert config.stage == "all"


def test_no_stage2_ablation_stops_after_stage_1(monkeypatch):
    config = _config(REPO / "flags" / "ablation_no_stage2.flags", monkeypatch)
    assert config.stage == "1"
    assert config.loss_weights == (1.0, 1.0, 1.0)


def test_demo_and_smoke_run_offline_on_shapes(monkeypatch):
    demo = _config(REPO / "flags" / "demo.flags", monkeypatch)
    smoke = _config(REPO / "flags" / "smoke.flags", monkeypatch)
    assert (demo.dataset, demo.teacher, demo.student) == ("shapes", "shapes", "tiny_resnet")
    # The smoke run keeps the CLIP-student path (a ViT with the paper's kind of student).
    assert (smoke.dataset, smoke.teacher, smoke.student) == ("shapes", "shapes", "tiny_vit")
    assert smoke.epochs_for("0") == smoke.epochs_for("1") == smoke.epochs_for("2") == 1
    assert demo.epochs_for("supervised") == 100 and smoke.epochs_for("supervised") == 1


def test_demo_flags_are_the_run_without_flags(monkeypatch):
    monkeypatch.chdir(REPO)
    no_flags = copy.deepcopy(flags.FLAGS)
    no_flags(["main"])
    assert _config(REPO / "flags" / "demo.flags", monkeypatch) == main_lib.config_from_flags(
        no_flags
    )


@pytest.mark.parametrize("name", DATASET_FILES)
def test_reference_protocol_on_top_of_each_dataset_file(name, monkeypatch):
    """`--flagfile=flags/<dataset>.flags --flagfile=flags/reference.flags`, as each dataset
    file's header says: the dataset and its KD weight stay, the reference's choices are on."""
    monkeypatch.chdir(REPO)
    flag_values = copy.deepcopy(flags.FLAGS)
    flag_values(["main", f"--flagfile=flags/{name}.flags", "--flagfile=flags/reference.flags"])
    config = main_lib.config_from_flags(flag_values)
    own = _config(REPO / "flags" / f"{name}.flags", monkeypatch)
    assert (config.dataset, config.kd_weight) == (name, own.kd_weight)
    assert (config.stage2_classes, config.epoch_selection) == ("all", "test_base")
    assert (config.stage1_shots, config.reference_data) == (5, True)
    assert (own.stage2_classes, own.epoch_selection, own.stage1_shots) == ("base", "last", 0)
    header = (REPO / "flags" / f"{name}.flags").read_text()
    assert "--flagfile=flags/reference.flags" in header
    # Where the KD weight comes from: the reference's README (dtd) or its default.
    source = "README" if name == "dtd" else "train.py extend_cfg"
    assert f"# KD weight: {own.kd_weight:g}" in header and source in header
