"""Every flags/*.flags file parses with the real flags of mtkd_jax.main into a valid RunConfig,
documents itself, and sets what its name promises."""

import copy
import itertools
import re
import shlex
from pathlib import Path

import pytest
from absl import flags

from mtkd_jax import main as main_lib
from mtkd_jax import stages
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


def _header(path):
    """The leading `#` lines of a flag file."""
    lines = path.read_text().splitlines()
    header = list(itertools.takewhile(lambda line: line.startswith("#"), lines))
    return header, lines[len(header) :]


def _field(header, name):
    """The text of `# <name>: ...` (or `# <name> (a note): ...`) and its indented continuation
    lines, joined by spaces; None without such a line."""
    pattern = re.compile(rf"^# {re.escape(name)}(?: \([^)]*\))?:(.*)$")
    for start, line in enumerate(header):
        if found := pattern.match(line):
            rest = itertools.takewhile(lambda line: line.startswith("#   "), header[start + 1 :])
            return " ".join([found[1].strip(), *(line.lstrip("#").strip() for line in rest)])
    return None


DURATION = r"(?:\d+ min )?\d+ s"
MEASURED = re.compile(rf"^measured (?P<times>{DURATION}(?: and {DURATION})*) wall clock\b")
MEASURED_COMMAND = re.compile(
    r"`(?:/usr/bin/time (?:-v )?)?python -m mtkd_jax\.main(?P<args>[^`]*)`"
)
MACHINE = re.compile(r"\bon [^;]*\b(?:CPU|GPU|TPU)\b[^;]*\bmachine\b")


def _runtimes_section():
    """The lines of docs/reporting.md's "Runtimes" section, the table of measured runtimes."""
    lines = (REPO / "docs" / "reporting.md").read_text().splitlines()
    start = lines.index("### Runtimes") + 1
    return list(itertools.takewhile(lambda line: not line.startswith("#"), lines[start:]))


@pytest.mark.parametrize("path", FLAGFILES, ids=lambda p: p.name)
def test_flagfile_starts_with_its_command_and_expectations(path, monkeypatch):
    """The header gives the command, then a runtime that is either measured (the figure, the
    command that ran this file's configuration, the machine, the same figure in the docs'
    table) or says `not measured:` which run's time is missing and where it will be recorded."""
    header, body = _header(path)
    assert header and header[0].startswith("# Command: python -m mtkd_jax.")
    assert all(line.startswith("--") for line in body if line.strip())
    assert _field(header, "Expected result")
    runtime = _field(header, "Expected runtime")
    assert runtime, "no '# Expected runtime:' line"
    config = _config(path, monkeypatch)
    table_rows = [line for line in _runtimes_section() if line.startswith(f"| `{path.name}` |")]
    measured = MEASURED.match(runtime)
    if measured is None:
        assert runtime.startswith("not measured: the wall-clock time of this file's "), runtime
        assert f"`--stage={config.stage}` run" in runtime, (runtime, config.stage)
        assert "docs/reporting.md" in runtime and not table_rows
        return
    command = MEASURED_COMMAND.search(runtime)
    assert command is not None, f"no `python -m mtkd_jax.main ...` command in: {runtime}"
    flag_values = copy.deepcopy(flags.FLAGS)
    flag_values(["main", *shlex.split(command["args"])])
    assert main_lib.config_from_flags(flag_values) == config, (
        "the measured command runs another configuration"
    )
    assert MACHINE.search(runtime), f"no machine (CPU/GPU/TPU ... machine) in: {runtime}"
    (row,) = table_rows
    assert measured["times"] in row and command.group(0) in row, (row, runtime)


def test_the_demo_runtime_in_the_readme_is_the_flag_files():
    header, _ = _header(REPO / "flags" / "demo.flags")
    times = MEASURED.match(_field(header, "Expected runtime"))["times"]
    assert f"One run of the demo takes **{times}** wall clock" in (REPO / "README.md").read_text()


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
    assert {stage.epochs(smoke) for stage in stages.STAGES if stage.trains} == {1}
    assert stages.SUPERVISED.epochs(demo) == 100


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
