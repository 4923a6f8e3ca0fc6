"""The launch flags and the single-process behaviour of `mtkd_jax.distributed`.

The multi-process behaviour itself is tested end to end in tests/test_multiprocess.py.
"""

import ast
import re
from pathlib import Path

import pytest

from mtkd_jax import config as config_lib
from mtkd_jax import distributed

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"process_id": 1, "num_processes": 2}, "needs --multihost"),
        ({"coordinator_address": "localhost:1234"}, "needs --multihost"),
        ({"multihost": True, "num_processes": 2, "process_id": 2}, "below --num_processes=2"),
        ({"multihost": True, "num_processes": -1}, "--num_processes must be >= 1"),
        ({"multihost": True, "coordinator_address": "localhost"}, "HOST:PORT"),
    ],
)
def test_bad_launch_flags_get_one_clear_error(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.demo_config(**settings).validate()


def test_launch_flags_with_multihost_are_valid():
    config_lib.demo_config(
        multihost=True, coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3
    ).validate()
    config_lib.demo_config(multihost=True).validate()  # JAX detects the cluster


def test_launch_flags_are_flags_of_main():
    from absl import flags

    from mtkd_jax import main  # noqa: F401  (defines the flags)

    for name in ("multihost", "coordinator_address", "num_processes", "process_id"):
        assert name in flags.FLAGS, name
    assert flags.FLAGS["local_device_ids"].default == []


def test_on_one_process_the_helpers_are_plain_calls():
    assert distributed.process_count() == 1 and distributed.is_primary()
    assert distributed.on_primary(lambda: 7, what="x") == 7
    assert distributed.primary_first(lambda: 8, what="x") == 8
    distributed.barrier("nothing to wait for")
    with pytest.raises(KeyError):
        distributed.on_primary(lambda: {}["missing"], what="x")


def test_docs_recipes_name_the_flags_the_multiprocess_test_uses():
    docs = (REPO / "docs" / "training.md").read_text()
    test = (REPO / "tests" / "test_multiprocess.py").read_text()  # its launch flags
    for flag in ("--multihost", "--coordinator_address=", "--num_processes=", "--process_id="):
        assert flag in test and flag in docs, flag
    assert "--xla_force_host_platform_device_count=2" in docs
    (flags_of_test,) = [
        ast.literal_eval(node.value)
        for node in ast.parse(test).body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "FLAGS"
    ]
    assert all(flag in docs for flag in flags_of_test), flags_of_test
    assert "gcloud compute tpus tpu-vm ssh" in docs and "--worker=all" in docs
    assert "srun" in docs and "--launcher=" in docs
