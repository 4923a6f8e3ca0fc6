"""--overwrite removes only what mtkd_jax wrote; an empty workdir never means the current one."""

import os
from pathlib import Path

import pytest

from mtkd_jax import config as config_lib
from mtkd_jax import errors, experiment
from mtkd_jax import workdir as workdir_lib


class _Stop(Exception):
    """Raised in place of loading data: the workdir has been prepared by then."""


@pytest.fixture
def stop_after_workdir(monkeypatch):
    """`experiment.run` up to and including `workdir.prepare`, nothing after."""
    prepared = []
    original = workdir_lib.prepare

    def prepare(config):
        prepared.append(original(config))
        return prepared[-1]

    def load_data(config):
        raise _Stop

    monkeypatch.setattr(workdir_lib, "prepare", prepare)
    monkeypatch.setattr(experiment, "load_data", load_data)
    return prepared


def _populate_run_layout(workdir):
    for name in workdir_lib.OWNED_FILES:
        (workdir / name).write_text("x")
    for name in workdir_lib.OWNED_DIRS:
        (workdir / name).mkdir()
        (workdir / name / "inside").write_text("x")
    (workdir / ".results.json.abc123.tmp").write_text("half")  # a killed atomic write


def test_overwrite_refuses_a_non_empty_folder_it_did_not_create(tmp_path, stop_after_workdir):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    (home / "results.json").write_text("someone else's")
    config = config_lib.demo_config(workdir=str(home), overwrite=True)

    with pytest.raises(errors.UserError, match=f"{home}.*non-empty.*thesis.tex") as raised:
        experiment.run(config)

    assert workdir_lib.MARKER in str(raised.value)
    assert (home / "thesis.tex").read_text() == "precious"
    assert (home / "results.json").read_text() == "someone else's"
    assert sorted(os.listdir(home)) == ["results.json", "thesis.tex"]
    assert not stop_after_workdir


def test_a_run_without_overwrite_refuses_a_folder_of_other_files(tmp_path, stop_after_workdir):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(errors.UserError, match="notes.txt"):
        experiment.run(config_lib.demo_config(workdir=str(tmp_path)))
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_overwrite_removes_the_run_layout_and_keeps_everything_else(tmp_path, stop_after_workdir):
    with pytest.raises(_Stop):
        experiment.run(config_lib.demo_config(workdir=str(tmp_path)))
    assert workdir_lib.is_marked(tmp_path)
    _populate_run_layout(tmp_path)
    (tmp_path / "my_notes.md").write_text("keep")
    (tmp_path / "my_plots").mkdir()
    (tmp_path / "my_plots" / "a.png").write_text("keep")
    (tmp_path / workdir_lib.SWEEP_LOG).write_text("keep")

    with pytest.raises(_Stop):
        experiment.run(config_lib.demo_config(workdir=str(tmp_path), overwrite=True))

    assert sorted(os.listdir(tmp_path)) == sorted(
        [workdir_lib.MARKER, "flags.json", "my_notes.md", "my_plots", workdir_lib.SWEEP_LOG]
    )
    assert (tmp_path / "my_plots" / "a.png").read_text() == "keep"


def test_the_library_api_never_resolves_an_empty_workdir_to_the_current_one(
    tmp_path, monkeypatch, stop_after_workdir
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "analysis.ipynb").write_text("precious")

    with pytest.raises(_Stop):
        experiment.run(config_lib.RunConfig(overwrite=True))

    assert (tmp_path / "analysis.ipynb").read_text() == "precious"
    (prepared,) = stop_after_workdir
    assert prepared.resolve() == (tmp_path / "runs" / "shapes_16shot_seed1").resolve()
    with pytest.raises(errors.UserError, match="current directory"):
        workdir_lib.claim("", overwrite=True)


def test_a_workdir_holding_only_run_files_is_claimed_without_removing_them(tmp_path):
    _populate_run_layout(tmp_path)
    (tmp_path / workdir_lib.SWEEP_LOG).write_text("sweep")
    before = sorted(os.listdir(tmp_path))

    workdir_lib.claim(tmp_path, overwrite=False)

    assert sorted(os.listdir(tmp_path)) == sorted([*before, workdir_lib.MARKER])
    with pytest.raises(errors.UserError, match="not a folder"):
        workdir_lib.claim(tmp_path / "flags.json", overwrite=False)


def test_remove_run_needs_the_marker_and_leaves_symlinked_targets_alone(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.bin").write_text("x")
    run = tmp_path / "run"
    with pytest.raises(errors.UserError, match="marker"):
        run.mkdir() or workdir_lib.remove_run(run)
    workdir_lib.claim(run, overwrite=False)
    (run / "checkpoints").symlink_to(outside, target_is_directory=True)

    workdir_lib.remove_run(run)

    assert (outside / "data.bin").exists()


def test_the_readme_says_exactly_what_overwrite_removes():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("What `--overwrite` removes, exactly") :]
    section = section[: section.index("\n\n")]
    for name in workdir_lib.OWNED_FILES + workdir_lib.OWNED_DIRS:
        shown = name.replace("stage1_instance_only", "<stage>").replace("supervised", "<stage>")
        shown = shown.replace("stage1_best", "<stage>_best").replace("stage2_best", "<stage>_best")
        shown = shown.replace("student_stage1.", "student_<stage>.").replace(
            "student_stage2.", "student_<stage>."
        )
        assert f"`{shown}" in section, name
    assert workdir_lib.MARKER in section


def test_a_sweep_workdir_holding_only_its_log_can_be_overwritten(tmp_path):
    (tmp_path / workdir_lib.SWEEP_LOG).write_text("$ python -m mtkd_jax.main ...\n")
    workdir_lib.claim(tmp_path, overwrite=True)
    assert workdir_lib.is_marked(tmp_path)
    workdir_lib.remove_run(tmp_path)
    assert (tmp_path / workdir_lib.SWEEP_LOG).read_text().startswith("$ python")
