"""Atomic writes: the destination is either the old file or the complete new one."""

import json
import os
import stat

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


@pytest.mark.parametrize("durable", [False, True])
def test_durable_writes_sync_the_file_and_its_folder(tmp_path, monkeypatch, durable):
    synced = []
    real_fsync = atomic.os.fsync

    def recording_fsync(descriptor):
        synced.append(atomic.os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    path = tmp_path / "ckpt.npz"
    with atomic.replacing(path, suffix=".npz", durable=durable) as tmp:
        tmp.write_bytes(b"data")
    assert path.read_bytes() == b"data"
    if durable:
        assert len(synced) == 2
        assert synced[0].endswith(".npz") and synced[0] != str(path)  # the file, before renaming
        assert synced[1] == str(tmp_path)  # then the folder, which makes the rename durable
    else:
        assert synced == []


def test_write_text_and_compact_sorted_json(tmp_path):
    atomic.write_text(tmp_path / "table.md", "| a |\n")
    atomic.write_json(tmp_path / "marker.json", {"b": 1, "a": 2}, indent=None, sort_keys=True)
    assert (tmp_path / "table.md").read_text() == "| a |\n"
    assert (tmp_path / "marker.json").read_text() == '{"a": 2, "b": 1}\n'


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_follow_the_umask_like_any_newly_created_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic.write_json(tmp_path / "results.json", {"run": 1})
        atomic.write_text(tmp_path / "flags.txt", "x")
        with atomic.replacing(tmp_path / "w.weights.h5", suffix=".weights.h5", durable=True) as tmp:
            with open(tmp, "wb") as file:  # as h5py/numpy do: reopen the temporary file
                file.write(b"w")
        open(tmp_path / "plain", "w").close()  # what an ordinary write gets
        assert atomic.current_umask() == umask
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == expected
    for name in ("results.json", "flags.txt", "w.weights.h5"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == expected, name
