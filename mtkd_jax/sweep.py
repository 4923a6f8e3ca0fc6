"""Runs MTKD over a grid of datasets and seeds and tabulates mean ± std, as the paper's tables.

    python -m mtkd_jax.sweep --datasets=oxford_pets,dtd --seeds=1,2,3 \\
        --flagfile=flags/paper.flags --workdir_root=runs/sweep [--dry_run] \\
        [--launcher=runs/sweep/jobs.txt [--launch_prefix='srun -N2']] \\
        [--output=runs/sweep/table.md] [-- --epochs=5]

Each (dataset, seed) runs `python -m mtkd_jax.main --flagfile=... --dataset=D --seed=S
--workdir=<root>/<D>/seed<S> --resume --nooverwrite [extra flags]` as its own process, so one
failure does not stop the grid; its output goes to `<workdir>/log.txt`. A workdir that already
holds a finished `results.json` is skipped; an interrupted one continues from its last
checkpoint (`--resume`). A `results.json` counts as finished unless it says `"finished": false`
(which a run may write while it runs). At the end every finished `results.json` under the root
is aggregated (`mtkd_jax.report`) into a markdown table, printed and written to `--output`;
failed runs are listed with their logs.

With `--launcher=FILE` the sweep runs nothing: it writes one shell line per unfinished run to
FILE, so a scheduler's job array runs the grid points side by side, each on its own hosts
(`--launch_prefix`, e.g. `srun ...`, goes before each command); running the sweep again
afterwards skips the finished runs and writes the table.

`--flagfile` here is not absl's: the sweep keeps it (and everything after `--`) for the runs.
Run from the repository root: absl reads nested `--flagfile=flags/paper.flags` lines relative
to the current directory.

The grid is a library too: `plan_jobs`, `run_jobs` (with any runner, e.g. a fake one in tests)
and `collect_results`.
"""

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags
from tqdm import tqdm

from mtkd_jax import atomic, report

RESULTS_FILE = "results.json"
LOG_FILE = "log.txt"

flags.DEFINE_list("datasets", None, "Datasets of the grid, comma-separated (e.g. oxford_pets,dtd).")
flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds of the grid, comma-separated integers.")
flags.DEFINE_string("workdir_root", "runs/sweep", "Runs go to <root>/<dataset>/seed<seed>.")
flags.DEFINE_string("output", "", "Where the markdown table goes (default: <root>/table.md).")
flags.DEFINE_list("methods", None, "Methods shown in the table (default: all found).")
flags.DEFINE_bool("dry_run", False, "Print the commands of the grid and run nothing.")
flags.DEFINE_string(
    "launcher",
    "",
    "Write the commands of the unfinished runs to this file, one shell line per run (line i is "
    "run i of a job array), and run nothing here; run the sweep again afterwards for the table.",
)
flags.DEFINE_string(
    "launch_prefix",
    "",
    "With --launcher: put this before every run's python command (e.g. 'srun --nodes=2 "
    "--ntasks-per-node=1', with -- --multihost for the runs), so each run gets its own hosts.",
)
flags.DEFINE_bool(
    "resume_runs",
    True,
    "Pass --resume to every run, so an interrupted run continues where it stopped.",
)


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of the grid: its dataset, seed, workdir and the command that runs it."""

    dataset: str
    seed: int
    workdir: Path
    command: tuple[str, ...]

    @property
    def results_path(self) -> Path:
        return self.workdir / RESULTS_FILE

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_FILE

    @property
    def name(self) -> str:
        return f"{self.dataset} seed {self.seed}"

    def is_finished(self) -> bool:
        return is_finished_results(self.results_path)


def _read_results(path: Path) -> dict:
    """The results dict in `path`; ValueError or OSError when it is not one."""
    with open(path, encoding="utf-8") as stream:
        results = json.load(stream)
    if not isinstance(results, dict) or "methods" not in results:
        raise ValueError('no "methods" key')
    return results


def is_finished_results(path: str | os.PathLike) -> bool:
    """Whether `path` holds the results of a finished run: a readable results.json that does
    not say `"finished": false` (a run may write its results so far while it runs, marked so)."""
    try:
        return _read_results(Path(path)).get("finished", True) is not False
    except (OSError, ValueError):
        return False


# A runner runs one job to its end and returns the exit status (0: success).
Runner = Callable[[Job], int]


@dataclasses.dataclass
class SweepOutcome:
    """What `run_jobs` did with each job: `failed` pairs a job with the reason."""

    finished: list[Job] = dataclasses.field(default_factory=list)
    skipped: list[Job] = dataclasses.field(default_factory=list)
    failed: list[tuple[Job, str]] = dataclasses.field(default_factory=list)


def workdir_name(dataset: str) -> str:
    """A dataset name as one folder name (`folder:/data/x` -> `folder__data_x`)."""
    return dataset.replace(":", "_").replace("/", "_").replace(os.sep, "_")


def plan_jobs(
    datasets: Sequence[str],
    seeds: Sequence[int],
    *,
    flagfiles: Sequence[str] = (),
    workdir_root: str | os.PathLike = "runs/sweep",
    extra_args: Sequence[str] = (),
    resume: bool = True,
    python: str = sys.executable,
) -> list[Job]:
    """The jobs of the grid, dataset-major: for each dataset, each seed.

    Args:
        datasets: `--dataset` values.
        seeds: `--seed` values.
        flagfiles: flag files every run reads first (later flags override theirs).
        workdir_root: the root under which each run gets `<dataset>/seed<seed>`.
        extra_args: flags appended to every command, after the grid's own (so they win).
        resume: add `--resume` so a run interrupted earlier continues from its checkpoint.
            Every command also gets `--nooverwrite`: the sweep never deletes a workdir (and the
            log it writes there); pass `-- --overwrite` yourself to start runs afresh.
        python: the interpreter that runs `-m mtkd_jax.main`.
    """
    if not datasets:
        raise ValueError(f"The grid needs at least one dataset. Received: datasets={datasets!r}")
    if not seeds:
        raise ValueError(f"The grid needs at least one seed. Received: seeds={seeds!r}")
    for flagfile in flagfiles:
        if not Path(flagfile).is_file():
            raise FileNotFoundError(
                f"No flag file at {flagfile!r} (from {os.getcwd()}). Paths are relative to the "
                "current directory: run the sweep from the repository root."
            )
    root = Path(workdir_root)
    jobs = []
    for dataset in datasets:
        for seed in seeds:
            workdir = root / workdir_name(dataset) / f"seed{seed}"
            command = [python, "-m", "mtkd_jax.main"]
            command += [f"--flagfile={flagfile}" for flagfile in flagfiles]
            command += [f"--dataset={dataset}", f"--seed={seed}", f"--workdir={workdir}"]
            command += ["--resume"] if resume else []
            command += ["--nooverwrite"]  # An --overwrite from a flag file would delete the log.
            command += list(extra_args)
            jobs.append(Job(dataset, int(seed), workdir, tuple(command)))
    return jobs


def subprocess_runner(job: Job) -> int:
    """Runs `job.command` in a child process, its stdout and stderr going to `job.log_path`."""
    job.workdir.mkdir(parents=True, exist_ok=True)
    with open(job.log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(job.command)}\n")
        log.flush()
        return subprocess.run(job.command, stdout=log, stderr=subprocess.STDOUT).returncode


def _log_exception(job: Job, error: Exception) -> None:
    """Appends the runner's traceback to the job's log, so the log path we report explains it."""
    try:
        job.workdir.mkdir(parents=True, exist_ok=True)
        with open(job.log_path, "a", encoding="utf-8") as log:
            log.write("".join(traceback.format_exception(error)))
    except OSError:
        pass


def run_jobs(jobs: Sequence[Job], runner: Runner = subprocess_runner, *, progress: bool = True):
    """Runs every job not finished yet, one after the other; a failing job does not stop the rest.

    A job counts as finished when its workdir holds a finished `results.json` (before: skipped;
    after: done). A runner that raises, returns non-zero, or leaves none fails that job.

    Returns:
        A `SweepOutcome`.
    """
    outcome = SweepOutcome()
    bar = tqdm(jobs, desc="sweep", unit="run", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job.name)
        if job.is_finished():
            outcome.skipped.append(job)
            tqdm.write(f"{job.name}: skipped (finished)")
            continue
        start = time.perf_counter()
        try:
            status = runner(job)
        except Exception as error:  # One broken run must not stop the grid.
            reason = f"the runner raised {type(error).__name__}: {error}"
            _log_exception(job, error)
        else:
            if status != 0:
                reason = f"exit status {status}"
            elif not job.is_finished():
                reason = f"exit status 0 but no finished {RESULTS_FILE} in {job.workdir}"
            else:
                reason = ""
        seconds = time.perf_counter() - start
        if reason:
            outcome.failed.append((job, reason))
            tqdm.write(f"{job.name}: FAILED after {seconds:.0f}s ({reason}); log: {job.log_path}")
        else:
            outcome.finished.append(job)
            tqdm.write(f"{job.name}: done in {seconds:.0f}s")
    return outcome


def launcher_lines(
    jobs: Sequence[Job], *, prefix: str = "", cwd: str | os.PathLike | None = None
) -> list[str]:
    """One shell line per unfinished job, for a job array (line i runs job i on its own hosts).

    Each line changes to `cwd` (default: the current directory, where the flag files' relative
    paths hold), creates the run's workdir and runs `prefix` + the job's command, its output
    appended to `<workdir>/log.txt` as the sweep's own runner does. Finished jobs get no line.
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)
    lines = []
    for job in jobs:
        if job.is_finished():
            continue
        workdir, log = shlex.quote(str(job.workdir)), shlex.quote(str(job.log_path))
        command = f"{prefix.strip()} {shlex.join(job.command)}".strip()
        lines.append(f"cd {shlex.quote(str(cwd))} && mkdir -p {workdir} && {command} >> {log} 2>&1")
    return lines


def write_launcher(jobs: Sequence[Job], path: str | os.PathLike, *, prefix: str = "") -> list[str]:
    """Writes `launcher_lines(jobs, prefix=prefix)` to `path` (atomically); returns them."""
    lines = launcher_lines(jobs, prefix=prefix)
    atomic.write_text(path, "".join(line + "\n" for line in lines))
    return lines


def collect_results(workdir_root: str | os.PathLike) -> list[dict]:
    """Every finished run's `results.json` under `workdir_root`, in path order; unreadable or
    unfinished ones are reported on stderr and left out."""
    found = []
    for path in sorted(Path(workdir_root).rglob(RESULTS_FILE)):
        try:
            results = _read_results(path)
        except (OSError, ValueError) as error:
            print(f"warning: left out {path}: {error}", file=sys.stderr)
            continue
        if results.get("finished", True) is False:
            print(f"warning: left out {path}: the run has not finished", file=sys.stderr)
            continue
        found.append(results)
    return found


def summarize(
    workdir_root: str | os.PathLike, output: str | os.PathLike, methods: Sequence[str] | None
) -> str:
    """Aggregates the results under `workdir_root` into the markdown table, written to `output`
    (atomically) and returned; "" when there are no results yet."""
    results = collect_results(workdir_root)
    if not results:
        return ""
    aggregated = report.aggregate(results)
    table = report.markdown_table(aggregated, methods)
    datasets = sorted({str(r["dataset"]) for r in results})
    caption = (
        f"MTKD sweep over {len(results)} runs ({', '.join(datasets)}); accuracy in percent, "
        "mean ± sample std over seeds."
    )
    text = f"{caption}\n\n{table}\n"
    for dataset, per_method in aggregated.items():  # Per dataset, one row per method.
        text += f"\n{dataset}, every method and metric:\n\n{report.methods_table(per_method)}\n"
    atomic.write_text(output, text)
    return text


def sweep(
    datasets: Sequence[str],
    seeds: Sequence[int],
    *,
    flagfiles: Sequence[str] = (),
    workdir_root: str | os.PathLike = "runs/sweep",
    output: str | os.PathLike = "",
    extra_args: Sequence[str] = (),
    methods: Sequence[str] | None = None,
    resume: bool = True,
    dry_run: bool = False,
    runner: Runner = subprocess_runner,
    progress: bool = True,
    launcher: str | os.PathLike = "",
    launch_prefix: str = "",
) -> int:
    """The whole command: plan, run (or print, or write a job array's `launcher` file),
    aggregate, report. Returns the exit status: 0 when every run finished (or was skipped, or
    the launcher file was written), 1 when any failed."""
    jobs = plan_jobs(
        datasets,
        seeds,
        flagfiles=flagfiles,
        workdir_root=workdir_root,
        extra_args=extra_args,
        resume=resume,
    )
    if dry_run:
        for job in jobs:
            prefix = "# skipped (finished): " if job.is_finished() else ""
            print(prefix + shlex.join(job.command))
        return 0
    if launcher:
        lines = write_launcher(jobs, launcher, prefix=launch_prefix)
        print(
            f"{len(lines)} run(s) of {len(jobs)} written to {launcher}, one per line "
            f"({len(jobs) - len(lines)} finished). Run line i as job i of an array, e.g.\n"
            f'  sbatch --array=1-{max(1, len(lines))} --wrap \'sed -n "${{SLURM_ARRAY_TASK_ID}}p" '
            f"{launcher} | bash'\nthen run this sweep again (without --launcher) for the table."
        )
        return 0
    outcome = run_jobs(jobs, runner, progress=progress)
    output = output or Path(workdir_root) / "table.md"
    text = summarize(workdir_root, output, methods)
    print(
        f"\n{len(outcome.finished)} finished, {len(outcome.skipped)} skipped (finished), "
        f"{len(outcome.failed)} failed."
    )
    if text:
        print(f"\n{text}\nTable written to {output}")
    else:
        print(f"No {RESULTS_FILE} under {workdir_root}: no table.")
    if outcome.failed:
        print("\nFailed runs (see their logs):", file=sys.stderr)
        for job, reason in outcome.failed:
            print(f"  {job.name}: {reason}\n    log: {job.log_path}", file=sys.stderr)
        return 1
    return 0


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """What the sweep's own parser hands to `main`: the runs' flag files and extra flags."""

    flagfiles: tuple[str, ...]
    extra_args: tuple[str, ...]
    positional: tuple[str, ...]


def parse_command_line(argv: Sequence[str]) -> CommandLine:
    """Takes `--flagfile` and everything after `--` out of `argv` for the runs, and parses the
    rest as the sweep's flags (absl's usage errors on a bad one)."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv[1:]:
        split = argv.index("--", 1)
        argv, extra = argv[:split], argv[split + 1 :]
    own, flagfiles = [argv[0]], []
    rest = iter(argv[1:])
    for arg in rest:
        if arg.startswith(("--flagfile=", "-flagfile=")):
            flagfiles.append(arg.split("=", 1)[1])
        elif arg in ("--flagfile", "-flagfile"):
            value = next(rest, None)
            if value is None:
                raise app.UsageError("--flagfile needs a path: --flagfile=flags/paper.flags")
            flagfiles.append(value)
        else:
            own.append(arg)
    positional = app.parse_flags_with_usage(own)
    return CommandLine(tuple(flagfiles), tuple(extra), tuple(positional[1:]))


def main(command_line: CommandLine) -> None:
    if command_line.positional:
        raise app.UsageError(
            f"Unexpected arguments: {' '.join(command_line.positional)}. Flags for the runs go "
            "after '--' (e.g. -- --epochs=5)."
        )
    FLAGS = flags.FLAGS
    if not FLAGS.datasets:
        raise app.UsageError("--datasets is required, e.g. --datasets=oxford_pets,dtd")
    try:
        seeds = [int(seed) for seed in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(
            f"--seeds takes comma-separated integers. Received: {','.join(FLAGS.seeds)}"
        ) from None
    try:
        status = sweep(
            FLAGS.datasets,
            seeds,
            flagfiles=command_line.flagfiles,
            workdir_root=FLAGS.workdir_root,
            output=FLAGS.output,
            extra_args=command_line.extra_args,
            methods=FLAGS.methods,
            resume=FLAGS.resume_runs,
            dry_run=FLAGS.dry_run,
            launcher=FLAGS.launcher,
            launch_prefix=FLAGS.launch_prefix,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_command_line)
