"""Tests of checkpoint files: round trip, atomicity, strict restore, no pickle, workdir guard."""

import os
import zipfile

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtkd_jax import checkpoint


def make_state(scale=1.0):
    params = [np.full((3, 2), scale, np.float32), np.arange(4, dtype=np.float32)]
    return {
        "trainable": params,
        "opt_state": optax.sgd(0.1, momentum=0.9).init(params),
        "step": np.int32(7),
        "rng": np.array([0, 42], np.uint32),
        "half": jnp.full((2,), 1.5, jnp.bfloat16),
    }


def save_state(directory, state, step, stage="stage1", **kwargs):
    return checkpoint.save(directory, state, {"stage": stage, "step": step, "epoch": 0}, **kwargs)


def assert_trees_equal(a, b):
    flat_a, flat_b = checkpoint.flatten_with_keys(a), checkpoint.flatten_with_keys(b)
    assert list(flat_a) == list(flat_b)
    for key in flat_a:
        assert np.asarray(flat_a[key]).dtype == np.asarray(flat_b[key]).dtype, key
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), key)


def test_save_then_restore_gives_back_every_leaf_and_the_metadata(tmp_path):
    state = make_state(2.0)
    path = checkpoint.save(
        tmp_path, state, {"stage": "stage1", "step": 12, "epoch": 3, "flags": {"lr": 0.005}}
    )
    assert path.name == "ckpt-stage1-000000012.npz"
    restored, metadata = checkpoint.restore(path, make_state(0.0))
    assert_trees_equal(restored, state)
    assert metadata["epoch"] == 3 and metadata["flags"] == {"lr": 0.005}
    # Keys are the tree paths, readable with plain numpy and no pickle.
    with np.load(path, allow_pickle=False) as archive:
        assert "['trainable'][0]" in archive.files
        np.testing.assert_array_equal(archive["['trainable'][0]"], state["trainable"][0])


def test_a_crash_mid_write_keeps_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    first = save_state(tmp_path, make_state(1.0), step=10)

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_state(tmp_path, make_state(5.0), step=20)
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path, "stage1") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no partial file left
    restored, _ = checkpoint.restore(first, make_state(0.0))
    assert_trees_equal(restored, make_state(1.0))


def test_a_partial_temporary_file_is_never_taken_as_latest(tmp_path):
    first = save_state(tmp_path, make_state(1.0), step=10)
    (tmp_path / ".tmp-abc.npz").write_bytes(b"PK\x03\x04 half written")
    (tmp_path / "ckpt-stage1-000000099.npz.partial").write_bytes(b"junk")
    assert checkpoint.latest(tmp_path, "stage1") == first


def test_latest_picks_the_highest_step_of_the_stage_and_keeps_the_last_n(tmp_path):
    for step in (5, 10, 15, 20):
        save_state(tmp_path, make_state(step), step=step, keep=2)
    save_state(tmp_path, make_state(), step=99, stage="stage2")
    kept = checkpoint.list_checkpoints(tmp_path, "stage1")
    assert [p.name for p in kept] == ["ckpt-stage1-000000015.npz", "ckpt-stage1-000000020.npz"]
    assert checkpoint.latest(tmp_path, "stage1") == kept[-1]
    assert checkpoint.latest(tmp_path, "stage0") is None


def test_restore_mismatch_lists_every_problem_in_one_error(tmp_path):
    path = save_state(tmp_path, make_state(), step=1)
    target = make_state()
    target["trainable"][0] = np.zeros((3, 3), np.float32)  # shape
    target["step"] = np.int64(7)  # dtype
    del target["rng"]  # unexpected in the file
    target["extra"] = np.zeros(2, np.float32)  # missing from the file
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.restore(path, target)
    message = str(raised.value)
    assert "4 problem(s)" in message
    assert "missing from the file: ['extra']" in message
    assert "unexpected in the file: ['rng']" in message
    assert "shape of ['trainable'][0]: file (3, 2), expected (3, 3)" in message
    assert "dtype of ['step']: file int32, expected int64" in message


class _Exploit:
    """Unpickling this would create a file: proof that a load would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_a_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = save_state(tmp_path, make_state(), step=3)
    target = make_state()
    # Replace one entry by a pickled object array, keeping the rest of the file intact.
    evil = tmp_path / "evil.npz"
    with np.load(path, allow_pickle=False) as archive:
        entries = {key: archive[key] for key in archive.files}
    entries["['step']"] = np.array([_Exploit(str(marker))], dtype=object)
    np.savez(evil, allow_pickle=True, **entries)
    with pytest.raises(checkpoint.CheckpointError, match="pickled"):
        checkpoint.restore(evil, target)
    assert not marker.exists()


def test_files_that_are_not_checkpoints_give_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(checkpoint.CheckpointError, match="Cannot read"):
        checkpoint.restore(garbage, make_state())
    no_metadata = tmp_path / "plain.npz"
    np.savez(no_metadata, a=np.zeros(2))
    with pytest.raises(checkpoint.CheckpointError, match="__metadata__"):
        checkpoint.read_metadata(no_metadata)
    assert zipfile.is_zipfile(no_metadata)


def test_save_refuses_metadata_without_stage_or_step(tmp_path):
    with pytest.raises(ValueError, match="'step'"):
        checkpoint.save(tmp_path, make_state(), {"stage": "stage1"})


def test_workdir_guard_refuses_a_used_workdir_unless_resuming(tmp_path):
    assert checkpoint.guard_workdir(tmp_path, "stage1", resume=False) is None
    saved = save_state(checkpoint.checkpoint_dir(tmp_path), make_state(), step=4)
    with pytest.raises(checkpoint.WorkdirInUseError, match="did not finish.*--resume"):
        checkpoint.guard_workdir(tmp_path, "stage1", resume=False)
    assert checkpoint.guard_workdir(tmp_path, "stage1", resume=True) == saved
    checkpoint.mark_finished(tmp_path, "stage1", {"epochs": 2})
    with pytest.raises(checkpoint.WorkdirInUseError, match="finished.*--resume"):
        checkpoint.guard_workdir(tmp_path, "stage1", resume=False)
    assert checkpoint.guard_workdir(tmp_path, "stage2", resume=False) is None
