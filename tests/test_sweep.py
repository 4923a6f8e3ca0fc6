"""Tests of the sweep command: the grid, skipping, pass-through flags, failures, aggregation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtkd_jax import report, sweep

REPO = Path(__file__).resolve().parents[1]


def _accuracy(dataset, seed):
    """The fake runs' base accuracy: differs per dataset and seed."""
    return 0.5 + 0.1 * seed + (0.05 if dataset == "dtd" else 0.0)


class FakeRunner:
    """Writes the results.json a finished run would write, instead of training."""

    def __init__(self, fail=(), crash=(), forget=()):
        self.calls = []
        self.fail, self.crash, self.forget = set(fail), set(crash), set(forget)

    def __call__(self, job):
        self.calls.append(job)
        key = (job.dataset, job.seed)
        if key in self.crash:
            raise RuntimeError("out of memory")
        if key in self.fail:
            return 1
        if key not in self.forget:
            job.workdir.mkdir(parents=True, exist_ok=True)
            base = _accuracy(job.dataset, job.seed)
            results = {
                "dataset": job.dataset,
                "shots": 16,
                "seed": job.seed,
                "config": {"command": list(job.command)},
                "methods": {"student_stage2": report.accuracy_row(base, base - 0.2, base - 0.1)},
            }
            job.results_path.write_text(json.dumps(results))
        return 0


def test_sweep_runs_the_grid_and_writes_the_mean_std_table(tmp_path, capsys):
    runner = FakeRunner()
    status = sweep.sweep(
        ["oxford_pets", "dtd"], [1, 2], workdir_root=tmp_path, runner=runner, progress=False
    )

    assert status == 0
    assert [(job.dataset, job.seed) for job in runner.calls] == [
        ("oxford_pets", 1),
        ("oxford_pets", 2),
        ("dtd", 1),
        ("dtd", 2),
    ]
    assert runner.calls[2].workdir == tmp_path / "dtd" / "seed1"
    table = (tmp_path / "table.md").read_text()
    assert table in capsys.readouterr().out
    base = [_accuracy("dtd", s) for s in (1, 2)]
    expected = f"{100 * np.mean(base):.2f} ± {100 * np.std(base, ddof=1):.2f}"
    dtd_row = next(line for line in table.splitlines() if line.startswith("| dtd |"))
    assert dtd_row.split("|")[2].strip() == expected
    assert any(line.startswith("| Average |") for line in table.splitlines())


def test_commands_carry_flagfiles_grid_flags_and_extra_flags_last(tmp_path):
    flagfile = tmp_path / "x.flags"
    flagfile.write_text("--epochs=3\n")
    (job,) = sweep.plan_jobs(
        ["folder:/data/birds"],
        [7],
        flagfiles=[str(flagfile)],
        workdir_root=tmp_path / "root",
        extra_args=["--epochs=5", "--batch_size=4"],
    )
    workdir = tmp_path / "root" / "folder__data_birds" / "seed7"
    assert job.workdir == workdir
    assert job.command[1:] == (
        "-m",
        "mtkd_jax.main",
        f"--flagfile={flagfile}",
        "--dataset=folder:/data/birds",
        "--seed=7",
        f"--workdir={workdir}",
        "--resume",
        "--nooverwrite",
        "--epochs=5",
        "--batch_size=4",
    )


def test_finished_runs_are_skipped(tmp_path, capsys):
    FakeRunner()(sweep.plan_jobs(["dtd"], [2], workdir_root=tmp_path)[0])  # dtd seed 2 is done
    runner = FakeRunner()
    jobs = sweep.plan_jobs(["dtd"], [1, 2], workdir_root=tmp_path)
    outcome = sweep.run_jobs(jobs, runner, progress=False)

    assert [job.seed for job in runner.calls] == [1]
    assert [job.seed for job in outcome.skipped] == [2]
    assert "dtd seed 2: skipped (finished)" in capsys.readouterr().out


def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path, capsys):
    runner = FakeRunner(fail={("dtd", 1)}, crash={("dtd", 2)}, forget={("dtd", 3)})
    status = sweep.sweep(
        ["dtd", "eurosat"], [1, 2, 3], workdir_root=tmp_path, runner=runner, progress=False
    )

    assert status == 1
    assert len(runner.calls) == 6
    captured = capsys.readouterr()
    for seed, reason in [(1, "exit status 1"), (2, "raised RuntimeError: out of memory")]:
        assert f"dtd seed {seed}: " in captured.err and reason in captured.err
        assert str(tmp_path / "dtd" / f"seed{seed}" / "log.txt") in captured.err
    assert "RuntimeError: out of memory" in (tmp_path / "dtd" / "seed2" / "log.txt").read_text()
    assert "dtd seed 3: exit status 0 but no finished results.json" in captured.err
    assert "3 finished, 0 skipped (finished), 3 failed." in captured.out
    table = (tmp_path / "table.md").read_text()
    assert "| eurosat |" in table and "| dtd |" not in table


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, capsys):
    runner = FakeRunner()
    status = sweep.sweep(
        ["dtd"], [1, 2], workdir_root=tmp_path, runner=runner, dry_run=True, extra_args=["--x=1"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and runner.calls == [] and not any(tmp_path.iterdir())
    assert len(lines) == 2
    assert lines[1].endswith(f"--workdir={tmp_path}/dtd/seed2 --resume --nooverwrite --x=1")


def test_missing_flagfile_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="repository root"):
        sweep.plan_jobs(["dtd"], [1], flagfiles=[str(tmp_path / "nope.flags")])


def test_subprocess_runner_logs_the_command_and_its_output(tmp_path):
    job = sweep.Job(
        "dtd", 1, tmp_path / "w", (sys.executable, "-c", "import sys; print('hi'); sys.exit(3)")
    )
    assert sweep.subprocess_runner(job) == 3
    log = job.log_path.read_text()
    assert log.startswith("$ ") and "hi" in log


def test_collect_results_leaves_out_unreadable_files(tmp_path, capsys):
    FakeRunner()(sweep.plan_jobs(["dtd"], [1], workdir_root=tmp_path)[0])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    found = sweep.collect_results(tmp_path)
    assert [r["dataset"] for r in found] == ["dtd"]
    assert "left out" in capsys.readouterr().err


def test_results_marked_unfinished_are_rerun_and_not_aggregated(tmp_path, capsys):
    (job,) = sweep.plan_jobs(["dtd"], [1], workdir_root=tmp_path)
    job.workdir.mkdir(parents=True)
    partial = {"dataset": "dtd", "seed": 1, "finished": False, "methods": {"teacher": {"all": 1}}}
    job.results_path.write_text(json.dumps(partial))  # written by a run that was interrupted
    assert not job.is_finished()
    assert sweep.collect_results(tmp_path) == []
    assert "has not finished" in capsys.readouterr().err

    runner = FakeRunner()
    outcome = sweep.run_jobs([job], runner, progress=False)
    assert runner.calls == [job] and outcome.finished == [job]


def test_command_line_passes_flagfile_and_extra_flags_to_the_runs(tmp_path):
    command = [sys.executable, "-m", "mtkd_jax.sweep", "--datasets=oxford_pets,dtd", "--seeds=3"]
    command += ["--flagfile=flags/smoke.flags", f"--workdir_root={tmp_path}", "--dry_run"]
    command += ["--", "--epochs=5"]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env={**os.environ}, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(
        f"-m mtkd_jax.main --flagfile=flags/smoke.flags --dataset=oxford_pets --seed=3 "
        f"--workdir={tmp_path}/oxford_pets/seed3 --resume --nooverwrite --epochs=5"
    )


def test_launcher_writes_one_runnable_line_per_unfinished_run(tmp_path, capsys):
    jobs = sweep.plan_jobs(["dtd", "eurosat"], [1, 2], workdir_root=tmp_path / "runs")
    FakeRunner()(jobs[1])  # dtd seed 2 finished earlier: no line for it
    launcher = tmp_path / "jobs.txt"
    status = sweep.sweep(
        ["dtd", "eurosat"], [1, 2], workdir_root=tmp_path / "runs", launcher=launcher,
        launch_prefix="srun --nodes=2", extra_args=["--multihost"], runner=FakeRunner(),
    )  # fmt: skip
    lines = launcher.read_text().splitlines()
    assert status == 0 and "3 run(s) of 4 written" in capsys.readouterr().out
    assert len(lines) == 3 and not (tmp_path / "runs" / "eurosat").exists()  # nothing ran
    assert all(f"--seed={s} " in line for line, s in zip(lines, (1, 1, 2), strict=True))
    assert all(" srun --nodes=2 " in line and "--multihost >> " in line for line in lines)
    assert "--dataset=dtd --seed=1" in lines[0] and "--dataset=eurosat --seed=2" in lines[2]

    # A line runs its job from the current directory, its output in the run's log.
    (job,) = sweep.plan_jobs(["dtd"], [7], workdir_root=tmp_path / "runs")
    job = sweep.Job(job.dataset, job.seed, job.workdir,
                    (sys.executable, "-c", "import os; print('ran in', os.getcwd())"))  # fmt: skip
    (line,) = sweep.launcher_lines([job], cwd=tmp_path)
    subprocess.run(["bash", "-c", line], check=True)
    assert f"ran in {tmp_path}" in job.log_path.read_text()
