"""One process of the multi-process tests: `python -m mtkd_jax.main`, with what it writes logged.

    python tests/multiprocess_child.py WRITE_LOG WATCHED_DIR [main flags...]

Appends to WRITE_LOG one line per file under WATCHED_DIR that this process creates, replaces,
opens for writing or removes ("write <path>" / "remove <path>"), so a test can check that only
process 0 touches the workdir. With MTKD_TEST_HANG_AFTER=<stage>:<epoch> set, the process stops
(sleeps) right after the checkpoint of that epoch is written, as a job killed at that moment
would be, and writes "<WRITE_LOG>.hung" so the test knows when to kill it.
"""

import builtins
import io
import os
import shutil
import sys
import time


def _watch(log_path: str, root: str) -> None:
    root = os.path.realpath(root)
    real_open, real_replace = io.open, os.replace
    real_unlink, real_rmtree = os.unlink, shutil.rmtree

    def record(kind, path):
        if isinstance(path, int):
            return
        path = os.path.realpath(os.fsdecode(os.fspath(path)))
        if path.startswith(root + os.sep) and not os.path.basename(path).startswith("."):
            with real_open(log_path, "a", encoding="utf-8") as log:
                log.write(f"{kind} {path}\n")

    def replace(src, dst, *args, **kwargs):
        result = real_replace(src, dst, *args, **kwargs)
        record("write", dst)
        return result

    def open_(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            record("write", file)
        return real_open(file, mode, *args, **kwargs)

    def unlink(path, *args, **kwargs):
        record("remove", path)
        return real_unlink(path, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        record("remove", path)
        return real_rmtree(path, *args, **kwargs)

    os.replace, builtins.open, io.open = replace, open_, open_
    os.unlink = os.remove = unlink
    shutil.rmtree = rmtree


def _hang_after(stage_epoch: str, marker: str) -> None:
    from mtkd_jax import checkpoint

    stage, epoch = stage_epoch.split(":")
    real_save = checkpoint.save

    def save(directory, state, metadata, **kwargs):
        path = real_save(directory, state, metadata, **kwargs)
        if metadata["stage"] == stage and int(metadata["epoch"]) == int(epoch):
            with open(marker, "w") as file:
                file.write(str(path))
            time.sleep(3600)  # Until the test kills this process.
        return path

    checkpoint.save = save


if __name__ == "__main__":
    write_log, watched, *flags = sys.argv[1:]
    _watch(write_log, watched)
    if os.environ.get("MTKD_TEST_HANG_AFTER"):
        _hang_after(os.environ["MTKD_TEST_HANG_AFTER"], write_log + ".hung")
    from absl import app

    from mtkd_jax import main

    sys.argv = ["mtkd_jax.main", *flags]
    app.run(main.main)
