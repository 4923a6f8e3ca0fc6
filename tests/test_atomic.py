"""Atomic writes: the destination is either the old file or the complete new one."""

import json

import pytest

from mtkd_jax import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    atomic.write_json(path, {"run": 1})
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        tmp.write_text('{"run": 2, "half')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_finished_write_replaces_the_file_and_keeps_the_suffix(tmp_path):
    path = tmp_path / "sub" / "student.keras"
    with atomic.replacing(path, suffix=".keras") as tmp:
        assert tmp.suffix == ".keras" and tmp.parent == path.parent
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["student.keras"]
