"""Fault injection through the command line: `kill -9` mid-epoch and during a checkpoint write,
a full disk during a checkpoint write (RLIMIT_FSIZE in the child), a corrupt latest checkpoint;
each followed by `--resume`, which must end with the results and weights of an uninterrupted
run. The same runs check the quiet start (no accelerator-probing noise on stderr) and that every
file follows the umask.

The default run is one chain on stage 1 (a plain-CLIP teacher, 3 epochs of 9 steps):

    reference: uninterrupted (in parallel with the chain)
    K: killed while writing the epoch-3 checkpoint      -> epochs 1 and 2 stay, epoch 2 latest
    F: --resume, the disk "fills" (RLIMIT_FSIZE) while writing epoch 3 -> clear error, rc 2
    the epoch-2 checkpoint is then truncated (a corrupt latest checkpoint)
    E: --resume: names the corrupt file, falls back to epoch 1, finishes = reference

A slow test does the same through all three stages with kills mid-epoch.
"""

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from smoke_runs import read_weights

from mtkd_jax import checkpoint

REPO = Path(__file__).resolve().parents[1]
UMASK = 0o002

# Runs `python -m mtkd_jax.main` with one fault planted by the test (MTKD_TEST_FAULT):
#   kill-batch:N          SIGKILL at the N-th training batch of this process (mid-epoch)
#   kill-ckpt:STAGE:N     at the N-th checkpoint write of STAGE: half the file, then SIGKILL
#   fsize-ckpt:STAGE:N    at the N-th checkpoint write of STAGE: RLIMIT_FSIZE of 4 KiB (disk full)
CHILD = textwrap.dedent(
    """
    import io, os, resource, signal, sys
    fault = os.environ.get("MTKD_TEST_FAULT", "")
    kind, _, where = fault.partition(":")
    if kind == "kill-batch":
        from mtkd_jax import train
        shard_batch, calls = train.shard_batch, [0]
        def counting(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(where):
                os.kill(os.getpid(), signal.SIGKILL)
            return shard_batch(*args, **kwargs)
        train.shard_batch = counting
    elif kind in ("kill-ckpt", "fsize-ckpt"):
        import numpy as np
        stage, count = where.split(":")
        savez, calls = np.savez, [0]
        def faulty(file, *args, **kwargs):
            if f".ckpt-{stage}-" not in str(getattr(file, "name", "")):
                return savez(file, *args, **kwargs)
            calls[0] += 1
            if calls[0] != int(count):
                return savez(file, *args, **kwargs)
            if kind == "kill-ckpt":
                buffer = io.BytesIO()
                savez(buffer, *args, **kwargs)
                file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
            try:
                return savez(file, *args, **kwargs)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        np.savez = faulty
    from absl import app
    from mtkd_jax import main
    sys.argv[0] = "mtkd_jax.main"
    app.run(main.main)
    """
)

STAGE1_FLAGS = [
    "--flagfile=flags/smoke.flags",
    "--nooverwrite",
    "--baselines=",
    "--stage=1",
    "--teacher_prompt_length=0",
    "--teacher_prompt_depth=0",
    "--epochs=3",
    "--unlabeled_pool=fewshot",
    "--noexport",
    "--eval_batch_size=300",
]
ALL_STAGES_FLAGS = [
    "--flagfile=flags/smoke.flags",
    "--nooverwrite",
    "--baselines=",
    "--epochs=2",
    "--teacher_epochs=2",
    "--adapter_epochs=2",
    "--unlabeled_pool=fewshot",
    "--eval_batch_size=300",
]


def _start(workdir, flags, fault="", resume=False):
    env = dict(os.environ, PYTHONPATH=str(REPO), KERAS_BACKEND="jax", MTKD_TEST_FAULT=fault)
    env.pop("JAX_PLATFORMS", None)  # as a user's shell: JAX probes for accelerators itself
    command = [sys.executable, "-c", CHILD, *flags, f"--workdir={workdir}"]
    command += ["--resume"] if resume else []
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.umask(UMASK),
    )


def _finish(process, timeout=900):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def _run(workdir, flags, fault="", resume=False):
    return _finish(_start(workdir, flags, fault, resume))


def _methods(workdir) -> dict:
    import json

    return json.loads((Path(workdir) / "results.json").read_text())["methods"]


def _assert_same_run(workdir, reference, weight_files):
    assert _methods(workdir) == _methods(reference)
    for name in weight_files:
        ours, theirs = read_weights(Path(workdir) / name), read_weights(Path(reference) / name)
        assert ours.keys() == theirs.keys() and ours
        for key in theirs:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{name}: {key}")


def _ckpt(workdir, stage, step) -> Path:
    return checkpoint.checkpoint_dir(workdir) / checkpoint.checkpoint_name(stage, step)


@pytest.fixture(scope="module")
def stage1_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    reference = _start(root / "reference", STAGE1_FLAGS)
    chain, workdir = {}, root / "chain"
    chain["K"] = _run(workdir, STAGE1_FLAGS, fault="kill-ckpt:stage1:3")
    chain["after_K"] = sorted(p.name for p in checkpoint.checkpoint_dir(workdir).iterdir())
    latest_before = _ckpt(workdir, "stage1", 18)
    chain["latest_bytes"] = latest_before.read_bytes()
    chain["F"] = _run(workdir, STAGE1_FLAGS, fault="fsize-ckpt:stage1:1", resume=True)
    chain["after_F"] = sorted(p.name for p in checkpoint.checkpoint_dir(workdir).iterdir())
    chain["latest_after_F"] = checkpoint.latest(checkpoint.checkpoint_dir(workdir), "stage1")
    chain["latest_bytes_after_F"] = latest_before.read_bytes()
    latest_before.write_bytes(chain["latest_bytes"][: len(chain["latest_bytes"]) // 2])
    chain["E"] = _run(workdir, STAGE1_FLAGS, resume=True)
    chain["reference"] = _finish(reference)
    return root, chain


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_latest(stage1_chain):
    root, chain = stage1_chain
    assert chain["K"][0] == -signal.SIGKILL
    names = chain["after_K"]
    assert "ckpt-stage1-000000018.npz" in names and "ckpt-stage1-000000027.npz" not in names
    assert any(name.startswith(".ckpt-stage1-000000027.npz.") for name in names)  # the half file


def test_a_full_disk_during_a_checkpoint_write_is_one_clear_error(stage1_chain):
    root, chain = stage1_chain
    returncode, _, stderr = chain["F"]
    assert returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: Could not write the checkpoint ")
    assert "ckpt-stage1-000000027.npz" in last and "File too large" in last
    assert f"the latest is still {_ckpt(root / 'chain', 'stage1', 18)}" in last
    assert "--resume" in last and "Traceback" not in stderr
    assert chain["latest_after_F"] == _ckpt(root / "chain", "stage1", 18)
    assert chain["latest_bytes_after_F"] == chain["latest_bytes"]
    assert "ckpt-stage1-000000027.npz" not in chain["after_F"]
    with np.load(_ckpt(root / "reference", "stage1", 18)) as archive:
        expected = {key: archive[key] for key in archive.files if key != "__metadata__"}
    with np.load(BytesIO(chain["latest_bytes_after_F"])) as archive:  # it loads, whole
        loaded = {key: archive[key] for key in archive.files if key != "__metadata__"}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():  # the same state as the reference's epoch 2
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_resume_names_a_corrupt_latest_checkpoint_and_ends_as_an_uninterrupted_run(stage1_chain):
    root, chain = stage1_chain
    returncode, stdout, stderr = chain["E"]
    assert returncode == 0, stderr[-3000:]
    corrupt = _ckpt(root / "chain", "stage1", 18)
    assert f"warning: the checkpoint {corrupt} is unreadable" in stderr
    assert f"resuming from {_ckpt(root / 'chain', 'stage1', 9)}" in stdout
    assert chain["reference"][0] == 0, chain["reference"][2][-3000:]
    _assert_same_run(root / "chain", root / "reference", ["student_stage1.weights.h5"])
    hidden = [p.name for p in checkpoint.checkpoint_dir(root / "chain").iterdir()]
    assert not [name for name in hidden if name.startswith(".")]  # the half-written file is gone


def test_the_first_lines_have_no_accelerator_probing_noise(stage1_chain):
    _, chain = stage1_chain
    stderr = chain["reference"][2]
    for line in stderr.splitlines():
        assert not line.startswith(("E0000", "W0000")), line
        assert "cuInit" not in line and "libtpu" not in line, line
    assert chain["reference"][1].startswith("mtkd_jax: shapes")


def test_every_file_of_a_run_follows_the_umask(stage1_chain):
    root, _ = stage1_chain
    checked = 0
    for path in (root / "reference").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~UMASK
        assert mode == expected, (str(path), oct(mode))
        checked += 1
    assert checked > 10


@pytest.mark.slow
def test_kill_9_mid_epoch_in_every_stage_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = _start(tmp_path / "reference", ALL_STAGES_FLAGS)
    workdir = tmp_path / "chain"
    # Stage 0 has 4 steps an epoch, stage 1 9 and stage 2 4 (8 + 18 + 8 steps in all).
    for fault in ("kill-batch:6", "kill-batch:7", "kill-ckpt:stage2:1", "kill-batch:4"):
        returncode, _, stderr = _run(workdir, ALL_STAGES_FLAGS, fault, resume=workdir.exists())
        assert returncode == -signal.SIGKILL, (fault, stderr[-3000:])
    returncode, _, stderr = _run(workdir, ALL_STAGES_FLAGS, resume=True)
    assert returncode == 0, stderr[-3000:]
    assert _finish(reference)[0] == 0
    _assert_same_run(
        workdir,
        tmp_path / "reference",
        ["student_stage1.weights.h5", "student_stage2.weights.h5"],
    )
    shutil.rmtree(tmp_path)
