"""The command line: user errors are one line saying what to do, bugs keep their traceback, and
every flag that takes a choice refuses a wrong value, naming the valid ones."""

import copy
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from absl import flags

from mtkd_jax import config as config_lib
from mtkd_jax import errors
from mtkd_jax import main as main_lib

REPO = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), KERAS_BACKEND="jax")


def _main_with_run_raising(exception_source: str, tmp_path) -> subprocess.CompletedProcess:
    """`python -m mtkd_jax.main` whose `experiment.run` raises `exception_source` (no Keras)."""
    script = textwrap.dedent(
        f"""
        import errno, sys, types
        import mtkd_jax
        from mtkd_jax import errors
        fake = types.ModuleType("mtkd_jax.experiment")
        def run(config):
            raise {exception_source}
        fake.run = run
        sys.modules["mtkd_jax.experiment"] = mtkd_jax.experiment = fake
        from absl import app
        from mtkd_jax import main
        app.run(main.main)
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script, f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )


def test_an_internal_value_error_keeps_its_traceback_and_asks_for_a_report(tmp_path):
    proc = _main_with_run_raising('ValueError("operands could not be broadcast")', tmp_path)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: operands could not be broadcast" in proc.stderr
    assert main_lib.BUG_REPORT in proc.stderr


@pytest.mark.parametrize(
    "source, message",
    [
        ('errors.InputError("--shots must be positive. Received 0.")', "--shots must be"),
        ('OSError(errno.ENOSPC, "No space left on device", "/x/ckpt.npz")', "No space left"),
    ],
)
def test_a_user_error_is_one_line_without_traceback(tmp_path, source, message):
    proc = _main_with_run_raising(source, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in proc.stderr


def test_user_facing_errors_of_the_library_are_user_errors():
    from mtkd_jax import checkpoint, train
    from mtkd_jax.clip import porting, torch_io

    for cls in (
        checkpoint.CheckpointError,
        checkpoint.WorkdirInUseError,
        train.NonFiniteLossError,
        porting.CheckpointMismatchError,
        torch_io.UnsafeCheckpointError,
    ):
        assert issubclass(cls, errors.UserError), cls
    with pytest.raises(errors.UserError, match="--epochs must be positive"):
        config_lib.demo_config(epochs=0).validate()
    assert ValueError not in main_lib.USER_ERRORS


def _helpfull() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "mtkd_jax.main", "--helpfull"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    return proc.stdout + proc.stderr


def _parse(argv):
    flag_values = copy.deepcopy(flags.FLAGS)
    flag_values(["main", *argv])
    return main_lib.config_from_flags(flag_values)


def test_every_flag_that_takes_a_choice_refuses_a_wrong_value():
    # In --helpfull, a flag that takes one of a fixed set shows it as `<a|b|c>`.
    found = dict(re.findall(r"^\s+--(\w+): <([^>]*\|[^>]*)>", _helpfull(), re.MULTILINE))
    ours = {name for name in found if name in HELP_NAMES}
    assert ours == set(config_lib.CHOICES), found
    for name, listing in found.items():
        valid = listing.split("|")
        assert _parse([f"--{name}={valid[-1]}"])  # a valid value parses
        with pytest.raises(flags.IllegalFlagValueError) as raised:
            _parse([f"--{name}=not_a_{name}"])
        assert listing in str(raised.value), (name, str(raised.value))


HELP_NAMES = set(main_lib.HELP)


def test_a_misspelled_baseline_is_refused_and_the_help_names_every_baseline():
    with pytest.raises(flags.IllegalFlagValueError, match="'instace_only'.*instance_only"):
        _parse(["--baselines=zero_shot,instace_only"])
    assert _parse(["--baselines=zero_shot,supervised"]).baselines == ("zero_shot", "supervised")
    for name in config_lib.CHOICES["baselines"]:
        assert name in main_lib.HELP["baselines"]
    with pytest.raises(errors.InputError, match="baselines.*zero_shot, instance_only, supervised"):
        config_lib.demo_config(baselines=("zero_shot", "supervise")).validate()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperatures=1,two"], "--temperatures takes comma-separated numbers"),
        (["--temperatures=1,-2"], "--temperatures must be positive"),
        (["--loss_weights=1,1"], "--loss_weights takes three numbers"),
    ],
)
def test_numeric_list_flags_refuse_what_is_not_their_numbers(argv, message):
    with pytest.raises(errors.InputError, match=message):
        _parse(argv)


def test_every_command_module_imports_beside_the_others():
    """The commands' absl flags share one global registry: importing the driver, predict,
    export, convert and the sweep in one process (a notebook, a test worker) must not define
    a flag twice (predict's --batch_size once met the driver's)."""
    script = (
        "import mtkd_jax.main, mtkd_jax.predict, mtkd_jax.export, mtkd_jax.convert, mtkd_jax.sweep"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
