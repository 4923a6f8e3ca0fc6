"""Checkpoints under faults: a full disk keeps the previous checkpoint as the latest, and a
truncated or corrupt latest checkpoint is named and skipped for the one before it."""

import resource

import numpy as np
import pytest

from mtkd_jax import checkpoint, errors


def _state(value: float, size: int = 4096):
    return {"w": np.full((size,), value, np.float32), "step": np.int32(value)}


def _two_checkpoints(directory):
    first = checkpoint.save(directory, _state(1.0), {"stage": "stage1", "step": 1, "epoch": 0})
    second = checkpoint.save(directory, _state(2.0), {"stage": "stage1", "step": 2, "epoch": 1})
    return first, second


def test_a_full_disk_during_a_write_keeps_the_previous_checkpoint_latest(tmp_path):
    first = checkpoint.save(tmp_path, _state(1.0), {"stage": "stage1", "step": 1, "epoch": 0})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (first.stat().st_size // 2, hard))
    try:
        with pytest.raises(checkpoint.CheckpointWriteError) as raised:
            checkpoint.save(tmp_path, _state(2.0), {"stage": "stage1", "step": 2, "epoch": 1})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(raised.value)
    assert "ckpt-stage1-000000002.npz" in message and str(first) in message
    assert "--resume" in message and isinstance(raised.value, errors.UserError)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    assert checkpoint.latest(tmp_path, "stage1") == first
    tree, metadata = checkpoint.restore(first, _state(0.0))
    assert np.all(tree["w"] == 1.0) and metadata["epoch"] == 0


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, capsys, damage):
    first, second = _two_checkpoints(tmp_path)
    raw = bytearray(second.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # a bad block in the middle of the array data
        middle = len(raw) // 2
        raw[middle : middle + 64] = bytes(64)
    second.write_bytes(bytes(raw))

    path, tree, metadata = checkpoint.restore_latest_readable(tmp_path, "stage1", _state(0.0))

    assert path == first and metadata["epoch"] == 0 and np.all(tree["w"] == 1.0)
    assert str(second) in capsys.readouterr().err


def test_no_readable_checkpoint_stops_naming_each(tmp_path):
    first, second = _two_checkpoints(tmp_path)
    for path in (first, second):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="No checkpoint of stage1") as raised:
        checkpoint.restore_latest_readable(tmp_path, "stage1", _state(0.0))
    assert str(first) in str(raised.value) and str(second) in str(raised.value)
    assert checkpoint.restore_latest_readable(tmp_path, "stage0", _state(0.0)) is None


def test_a_checkpoint_of_another_model_is_not_skipped_but_refused(tmp_path):
    _two_checkpoints(tmp_path)
    with pytest.raises(checkpoint.StateMismatchError, match="shape of"):
        checkpoint.restore_latest_readable(tmp_path, "stage1", _state(0.0, size=8))


def test_a_write_killed_midway_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    first = checkpoint.save(tmp_path, _state(1.0), {"stage": "stage1", "step": 1, "epoch": 0})
    (tmp_path / ".ckpt-stage1-000000002.npz.k1ll3d.npz").write_bytes(b"half")
    (tmp_path / ".ckpt-stage1_instance_only-000000002.npz.x.npz").write_bytes(b"other stage")
    assert checkpoint.latest(tmp_path, "stage1") == first
    second = checkpoint.save(tmp_path, _state(2.0), {"stage": "stage1", "step": 2, "epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.name, second.name, ".ckpt-stage1_instance_only-000000002.npz.x.npz"]
    )
