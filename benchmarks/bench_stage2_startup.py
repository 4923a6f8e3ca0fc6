"""Time from `python -m mtkd_jax.main --stage=2 ...` to its first training step, per checkout.

    .venv/bin/python benchmarks/bench_stage2_startup.py \\
        --checkouts=before=/tmp/before,after=/work/main --output=stage2_startup.json
    .venv/bin/python benchmarks/bench_stage2_startup.py --models=tiny     # smoke run, CPU

What `--stage=2` does before its first step depends on the code: a driver that rebuilds stage
1's world loads the teacher, recomputes its class text features, evaluates it on the whole test
split and loads a pretrained student only to overwrite it with the stage-1 weights; one that
reads what stage 1 wrote needs none of that. This script measures it end to end, as a user
meets it, for each checkout named in `--checkouts` (any commit of the project: each runs in a
child process with `PYTHONPATH=<checkout>`, from a scratch folder, with this interpreter):

1. Models, built once and shared by every checkout (`<scratch>/models`, reused when the
   settings match): with `--models=paper`, a ViT-L/14 teacher and a ViT-B/16 student with the
   architecture numbers of OpenAI's `openai/clip-vit-large-patch14` / `-base-patch16` Hugging
   Face configs, random weights (seeded `transformers.CLIPModel`, saved with `save_pretrained`
   as `model.safetensors`) and the standard CLIP vocabulary as `vocab.json` + `merges.txt`.
   Only the sizes matter for the time; the values do not. `--models=tiny` builds two small
   CLIPs for a smoke run.
2. A generated class-folder dataset (`folder:<scratch>/data`, 4 classes, so 2 base and 2 novel)
   whose split file the script writes itself: the train and val lists never change; the test
   list is `--test_per_class` images per class ("small") or `--large_test_per_class` ("large").
3. Per checkout: stage 1 (plain-CLIP teacher, `--teacher_prompt_length=0`, so no stage 0; 1
   epoch) into `<scratch>/runs/<name>/stage1`, on the small test split. Untimed.
4. Per checkout and test split (all checkouts in turn, `--repeats` times): a copy of that
   finished stage-1 workdir, then `--stage=2` in it; the clock starts just before the child
   process does and stops when the first `"stage": "stage2"` train line reaches
   `<workdir>/metrics.jsonl` (`--log_every=1`); then the child is stopped. Every stdout line
   is kept with its time since the start, so the report shows where the time went (e.g. the
   `[eval] teacher` line and its own duration).

The difference between the large and the small test split, per extra test image, is what each
test image costs before the first step (the teacher's evaluation, where there is one): times
3,669 it extrapolates to Oxford Pets' test split. Prints a table (seconds to the first step,
ratio to the first checkout) and writes every number and timeline to `--output` (JSON).

Not a test: numbers depend on the machine and its load; state the machine and what else ran
(`--note`) with them. Needs torch and transformers (the `torch` extra) to build the models.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGE2_STAGE = "stage2"
CLASSES = ("amber_disc", "blue_square", "green_stripes", "violet_ring")  # label = position
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2
IMAGE_FILE_SIZE = 256  # px, square JPEGs; the pipeline resizes to the models' 224
OXFORD_PETS_TEST_IMAGES = 3669

# The architecture numbers of OpenAI's CLIP checkpoints as Hugging Face writes them
# (`openai/clip-vit-large-patch14` and `openai/clip-vit-base-patch16` config.json); every other
# field is transformers' CLIPConfig default, which equals those files' values.
_TEXT_COMMON = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)  # fmt: skip
_VISION_COMMON = dict(image_size=224, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)
MODEL_CONFIGS = {
    "paper": {
        "teacher": dict(  # ViT-L/14
            projection_dim=768,
            logit_scale_init_value=2.6592,
            text_config=dict(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, projection_dim=768, **_TEXT_COMMON,
            ),
            vision_config=dict(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, patch_size=14, projection_dim=768, **_VISION_COMMON,
            ),
        ),
        "student": dict(  # ViT-B/16
            projection_dim=512,
            logit_scale_init_value=2.6592,
            text_config=dict(
                hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, projection_dim=512, **_TEXT_COMMON,
            ),
            vision_config=dict(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, patch_size=16, projection_dim=512, **_VISION_COMMON,
            ),
        ),
    },
    # Smoke runs: two small CLIPs with the real vocabulary (the tokenizer's ids must fit).
    "tiny": {
        "teacher": dict(
            projection_dim=64,
            logit_scale_init_value=2.6592,
            text_config=dict(
                hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, projection_dim=64, **_TEXT_COMMON,
            ),
            vision_config=dict(
                hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, patch_size=8, projection_dim=64,
                **{**_VISION_COMMON, "image_size": 32},
            ),
        ),
        "student": dict(
            projection_dim=32,
            logit_scale_init_value=2.6592,
            text_config=dict(
                hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, projection_dim=32, **_TEXT_COMMON,
            ),
            vision_config=dict(
                hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, patch_size=8, projection_dim=32,
                **{**_VISION_COMMON, "image_size": 32},
            ),
        ),
    },
}  # fmt: skip


# Flags that the model sizes need: the tiny student has 2 layers, fewer than the paper's prompt
# depth of 9 (the paper's sizes take the defaults: student prompts of length 4, depth 9).
MODEL_FLAGS = {"paper": [], "tiny": ["--student_prompt_depth=2"]}


def hf_config_dict(models: str, role: str) -> dict:
    """The Hugging Face `config.json` content of one model: `model_type` "clip" and the numbers
    of `MODEL_CONFIGS[models][role]` (`role`: "teacher" or "student")."""
    values = json.loads(json.dumps(MODEL_CONFIGS[models][role]))  # a deep copy
    return {"model_type": "clip", **values}


# ---------------------------------------------------------------------------------------------
# Setup: models and data, built once


def build_models(directory: Path, models: str, seed: int) -> dict[str, Path]:
    """`{"teacher": dir, "student": dir}`: random `CLIPModel`s saved with `save_pretrained`
    (safetensors) plus `vocab.json` / `merges.txt`; reused when `directory` holds the same
    settings already (`settings.json`, written last)."""
    settings = {"models": models, "seed": seed, "configs": MODEL_CONFIGS[models]}
    marker = directory / "settings.json"
    paths = {role: directory / role for role in ("teacher", "student")}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        print(f"[setup] reusing the models in {directory}", flush=True)
        return paths
    import torch
    import transformers

    from mtkd_jax.clip.tokenizer import CLIPTokenizer  # the standard CLIP vocabulary

    shutil.rmtree(directory, ignore_errors=True)
    for offset, (role, path) in enumerate(paths.items()):
        started = time.perf_counter()
        torch.manual_seed(seed + offset)
        values = MODEL_CONFIGS[models][role]
        config = transformers.CLIPConfig(
            text_config=values["text_config"],
            vision_config=values["vision_config"],
            projection_dim=values["projection_dim"],
            logit_scale_init_value=values["logit_scale_init_value"],
        )
        with torch.no_grad():
            model = transformers.CLIPModel(config).eval()
        model.save_pretrained(str(path), safe_serialization=True)
        CLIPTokenizer().save_assets(path)
        parameters = sum(p.numel() for p in model.parameters())
        del model
        print(f"[setup] {role}: {parameters / 1e6:.1f}M parameters in {path} "
              f"({time.perf_counter() - started:.0f}s)", flush=True)  # fmt: skip
    marker.write_text(json.dumps(settings))
    return paths


def make_images(directory: Path, images_per_class: int, seed: int) -> dict[str, list[str]]:
    """Writes `images_per_class` JPEGs per class into `directory/<class>/` (class-coloured noise,
    seeded); returns each class's relative paths in file order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = {}
    for label, name in enumerate(CLASSES):
        (directory / name).mkdir(parents=True, exist_ok=True)
        colour = np.array([(label * 80) % 256, (label * 150 + 60) % 256, 255 - label * 60])
        files[name] = []
        for i in range(images_per_class):
            rel = f"{name}/{i:03d}.jpg"
            noise = rng.normal(0, 40, (IMAGE_FILE_SIZE, IMAGE_FILE_SIZE, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            if not (directory / rel).is_file():
                Image.fromarray(pixels).save(directory / rel, quality=90)
            files[name].append(rel)
    return files


def split_payload(files: dict[str, list[str]], test_per_class: int) -> dict:
    """The CoOp split file of the dataset: fixed train and val lists; the first
    `test_per_class` of the remaining images of each class as the test list."""
    payload = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        paths = files[name]
        if len(paths) < TRAIN_PER_CLASS + VAL_PER_CLASS + test_per_class:
            raise ValueError(f"{name} has {len(paths)} images; {test_per_class} test ones asked")
        cut = TRAIN_PER_CLASS + VAL_PER_CLASS
        for split, chosen in (
            ("train", paths[:TRAIN_PER_CLASS]),
            ("val", paths[TRAIN_PER_CLASS:cut]),
            ("test", paths[cut : cut + test_per_class]),
        ):
            payload[split] += [[rel, label, name] for rel in chosen]
    return payload


def use_test_split(data_dir: Path, files, test_per_class: int) -> int:
    """Points the dataset's split file at `test_per_class` test images per class; returns the
    number of test images."""
    payload = split_payload(files, test_per_class)
    (data_dir / "split_mtkd.json").write_text(json.dumps(payload, indent=1))
    return len(payload["test"])


# ---------------------------------------------------------------------------------------------
# Running a checkout


@dataclasses.dataclass
class Settings:
    scratch: Path
    teacher: Path
    student: Path
    data_dir: Path
    shots: int
    batch_size: int
    eval_batch_size: int
    extra_flags: list[str]
    stage2_flags: list[str]
    timeout_s: float


def common_flags(settings: Settings, workdir: Path) -> list[str]:
    """The flags of both stages: the shared models and data, small batches, 1 epoch."""
    return [
        f"--dataset=folder:{settings.data_dir}",
        f"--teacher={settings.teacher}",
        f"--student=clip:{settings.student}",
        "--teacher_prompt_length=0",  # distil the plain CLIP: no stage 0 needed
        f"--shots={settings.shots}",
        "--seed=1",
        "--epochs=1",
        f"--batch_size={settings.batch_size}",
        f"--eval_batch_size={settings.eval_batch_size}",
        "--log_every=1",
        "--baselines=",
        f"--workdir={workdir}",
        *settings.extra_flags,
    ]


def child_env(checkout: Path, scratch: Path, name: str) -> dict[str, str]:
    """The child's environment: the checkout first on the path, unbuffered output, its own
    few-shot cache, no network, no persistent compilation cache."""
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.update(
        PYTHONPATH=str(checkout),
        PYTHONUNBUFFERED="1",
        MTKD_CACHE_DIR=str(scratch / "cache" / name),
        HF_HUB_OFFLINE="1",
        KERAS_BACKEND="jax",
    )
    return env


def git_commit(checkout: Path) -> str | None:
    completed = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return completed.stdout.strip() if completed.returncode == 0 else None


def _reader(stream, name: str, started: float, lines: list, echo) -> None:
    """Appends `(seconds since start, stream, line)` for every line (tqdm's `\\r` too)."""
    buffer = ""
    for chunk in iter(lambda: stream.read1(65536) if hasattr(stream, "read1") else b"", b""):
        buffer += chunk.decode("utf-8", errors="replace")
        *complete, buffer = re.split(r"[\r\n]", buffer)
        now = time.perf_counter() - started
        for line in complete:
            if line.strip():
                lines.append((round(now, 3), name, line))
                echo(name, line)
    if buffer.strip():
        lines.append((round(time.perf_counter() - started, 3), name, buffer))


def first_stage2_step(metrics: Path) -> dict | None:
    """The first `"stage": "stage2"`, `"kind": "train"` record of `metrics.jsonl`, if any."""
    if not metrics.is_file():
        return None
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("stage") == STAGE2_STAGE and record.get("kind") == "train":
            return record
    return None


def run_child(args: list[str], env, cwd: Path, log: Path, *, timeout_s: float, stop_when=None,
              verbose: bool = False) -> dict:  # fmt: skip
    """Runs `python -m mtkd_jax.main ARGS`; returns its timeline and end.

    `stop_when()` (polled every 50 ms) returning a value stops the child (SIGTERM to its
    process group, SIGKILL after 30 s) and records the time and that value.
    """
    command = [sys.executable, "-m", "mtkd_jax.main", *args]
    lines: list = []

    def echo(stream, line):
        if verbose or stream == "stdout":
            print(f"    {time.perf_counter() - started:8.1f}s {stream}: {line[:200]}", flush=True)

    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    readers = [
        threading.Thread(target=_reader, args=(pipe, name, started, lines, echo), daemon=True)
        for pipe, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))
    ]
    for thread in readers:
        thread.start()
    stopped_at, found = None, None
    while process.poll() is None:
        elapsed = time.perf_counter() - started
        if stop_when is not None:
            found = stop_when()
            if found is not None:
                stopped_at = elapsed
                break
        if elapsed > timeout_s:
            break
        time.sleep(0.05)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for thread in readers:
        thread.join(10)
    seconds = time.perf_counter() - started
    log.write_text(
        "$ " + " ".join(command) + "\n"
        + "".join(f"{t:9.3f} {s}: {line}\n" for t, s, line in lines)
    )  # fmt: skip
    return {
        "returncode": process.returncode,
        "seconds": round(seconds, 3),
        "stopped_at_s": None if stopped_at is None else round(stopped_at, 3),
        "found": found,
        "stdout": [(t, line) for t, s, line in lines if s == "stdout"],
        "tail": [line for _, _, line in lines[-15:]],
    }


def run_stage1(checkout: Path, name: str, settings: Settings, verbose: bool) -> Path:
    """The finished stage-1 workdir of `checkout` (made once)."""
    workdir = settings.scratch / "runs" / name / "stage1"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] stage 1 (untimed) into {workdir}", flush=True)
    result = run_child(
        ["--stage=1", *common_flags(settings, workdir)],
        child_env(checkout, settings.scratch, name),
        settings.scratch,
        workdir.parent / "stage1.log",
        timeout_s=settings.timeout_s,
        verbose=verbose,
    )
    if result["returncode"] != 0:
        raise SystemExit(
            f"Stage 1 of {name} ({checkout}) failed with exit code {result['returncode']}; see "
            f"{workdir.parent / 'stage1.log'}. Last lines:\n  " + "\n  ".join(result["tail"])
        )
    print(f"[{name}] stage 1 took {result['seconds']:.0f}s", flush=True)
    return workdir


EVAL_LINE = re.compile(
    r"\[eval\] (?P<method>\S+):.*\((?P<images>\d+) test images, (?P<s>[\d.]+)s\)"
)


def time_stage2(checkout: Path, name: str, stage1: Path, label: str, settings: Settings,
                verbose: bool) -> dict:  # fmt: skip
    """Seconds from starting `--stage=2` (in a copy of `stage1`) to its first train line."""
    workdir = settings.scratch / "runs" / name / f"stage2_{label}"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(stage1, workdir)
    metrics = workdir / "metrics.jsonl"
    print(f"[{name}] stage 2, {label} test split: timing", flush=True)
    result = run_child(
        ["--stage=2", *common_flags(settings, workdir), *settings.stage2_flags],
        child_env(checkout, settings.scratch, name),
        settings.scratch,
        workdir.parent / f"stage2_{label}.log",
        timeout_s=settings.timeout_s,
        stop_when=lambda: first_stage2_step(metrics),
        verbose=verbose,
    )
    if result["stopped_at_s"] is None:
        raise SystemExit(
            f"Stage 2 of {name} ({checkout}) logged no step (exit code {result['returncode']}); "
            f"see {workdir.parent / f'stage2_{label}.log'}. Last lines:\n  "
            + "\n  ".join(result["tail"])
        )
    evaluations = [
        {"method": m["method"], "test_images": int(m["images"]), "seconds": float(m["s"]),
         "printed_at_s": t}
        for t, line in result["stdout"]
        if (m := EVAL_LINE.search(line))
    ]  # fmt: skip
    print(f"[{name}] first stage-2 step after {result['stopped_at_s']:.1f}s", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)  # a copy of stage 1's checkpoints: big
    return {
        "seconds_to_first_step": result["stopped_at_s"],
        "first_step": result["found"],
        "evaluations_before_first_step": evaluations,
        "timeline": result["stdout"],
    }


# ---------------------------------------------------------------------------------------------
# Report


def summarise(results: dict) -> None:
    """Adds per checkout: each split's mean seconds to the first step and what each extra test
    image costs, from those totals and from the `[eval]` lines' own durations."""
    images = results["test_images"]
    for entry in results["checkouts"]:
        means, evals = {}, {}
        for label in images:
            runs = [r for r in entry["runs"] if r["split"] == label]
            means[label] = float(np.mean([r["seconds_to_first_step"] for r in runs]))
            for run in runs:
                for e in run["evaluations_before_first_step"]:
                    evals.setdefault(e["method"], {}).setdefault(label, []).append(e["seconds"])
        entry["mean_seconds_to_first_step"] = means
        if "large" not in images:
            continue
        extra = images["large"] - images["small"]
        per_image = (means["large"] - means["small"]) / extra
        entry["seconds_per_extra_test_image"] = per_image
        entry["oxford_pets_extrapolated_s"] = means["small"] + per_image * (
            OXFORD_PETS_TEST_IMAGES - images["small"]
        )
        entry["eval_seconds_per_extra_test_image"] = {
            method: (np.mean(by_split["large"]) - np.mean(by_split["small"])) / extra
            for method, by_split in evals.items()
            if set(by_split) == {"small", "large"}
        }


def print_table(results: dict) -> None:
    images = results["test_images"]
    small, large = images["small"], images.get("large")
    first = results["checkouts"][0]["mean_seconds_to_first_step"]["small"]
    header = f"{'checkout':<10} {f'to 1st step, {small} test imgs':>25} {'ratio':>6}"
    if large:
        header += f" {f'to 1st step, {large} test imgs':>25} {'s/extra test img':>17}"
        header += f" {'[eval] s/test img':>18} {'Oxford Pets, est.':>18}"
    print("\n" + header)
    for entry in results["checkouts"]:
        means = entry["mean_seconds_to_first_step"]
        row = f"{entry['name']:<10} {means['small']:>24.1f}s {means['small'] / first:>6.2f}"
        if large:
            evals = entry["eval_seconds_per_extra_test_image"]
            shown = ", ".join(f"{m} {v:.2f}" for m, v in evals.items()) or "-"
            row += f" {means['large']:>24.1f}s {entry['seconds_per_extra_test_image']:>17.3f}"
            row += f" {shown:>18} {entry['oxford_pets_extrapolated_s']:>17.0f}s"
        print(row)
    more = OXFORD_PETS_TEST_IMAGES - small
    print(f"(mean of {results['repeats']} run(s) each; Oxford Pets: the small split's time plus "
          f"the s/extra test image times the {more} more test images)")  # fmt: skip
    for entry in results["checkouts"]:
        run = next(r for r in entry["runs"] if r["split"] == "small")
        print(f"\n{entry['name']} ({entry['path']}, commit {entry['commit'] or 'unknown: no git'})"
              f", {small} test images: stdout lines, seconds since the command started, and the "
              "seconds since the previous line")  # fmt: skip
        previous = 0.0
        events = [(t, line) for t, line in run["timeline"] if t <= run["seconds_to_first_step"]]
        for e in run["evaluations_before_first_step"]:
            began = round(e["printed_at_s"] - e["seconds"], 3)
            events.append((began, f"({e['method']} evaluation starts, from its [eval] line)"))
        events.append((run["seconds_to_first_step"], "(first stage2 train line in metrics.jsonl)"))
        for t, line in sorted(events):
            print(f"  {t:7.1f}s {t - previous:+7.1f}s  {line[:130]}")
            previous = t
    machine = results["machine"]
    print(f"\nMachine: {machine['platform']}, {machine['cpu_count']} CPUs, load average "
          f"{machine['load_before']} before, {machine['load_after']} after; note: "
          f"{results['note'] or '-'}")  # fmt: skip


# ---------------------------------------------------------------------------------------------


def parse_checkouts(text: str) -> list[tuple[str, Path]]:
    """`NAME=PATH,NAME=PATH` -> [(name, absolute path)], each PATH holding `mtkd_jax/main.py`."""
    checkouts = []
    for item in filter(None, text.split(",")):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--checkouts takes NAME=PATH,NAME=PATH. Received {item!r}.")
        path = Path(path).expanduser().resolve()
        if not (path / "mtkd_jax" / "main.py").is_file():
            raise SystemExit(f"--checkouts: {path} holds no mtkd_jax/main.py (for {name!r}).")
        checkouts.append((name, path))
    if len({name for name, _ in checkouts}) != len(checkouts):
        raise SystemExit(f"--checkouts names must differ. Received {text!r}.")
    return checkouts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkouts",
        default=f"this={ROOT}",
        help="NAME=PATH,... checkouts of the project to time (default: this one)",
    )
    parser.add_argument("--models", choices=sorted(MODEL_CONFIGS), default="paper")
    parser.add_argument(
        "--scratch",
        default="/tmp/mtkd_bench_stage2_startup",
        help="working folder; its models/ are reused across invocations",
    )
    parser.add_argument("--test_per_class", type=int, default=3)
    parser.add_argument(
        "--large_test_per_class", type=int, default=15, help="0: time the small test split only"
    )
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--eval_batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="of the models' and images' values")
    parser.add_argument(
        "--extra_flags",
        default="",
        help="space-separated flags added to both stages of every checkout",
    )
    parser.add_argument(
        "--stage2_flags",
        default="",
        help="space-separated flags added to --stage=2 of every checkout",
    )
    parser.add_argument("--timeout_s", type=float, default=3600.0)
    parser.add_argument("--note", default="", help="what else ran on the machine, recorded")
    parser.add_argument("--output", default="", help="JSON results file")
    parser.add_argument("--verbose", action="store_true", help="echo the children's stderr")
    args = parser.parse_args(argv)
    if not 0 < args.test_per_class < args.large_test_per_class and args.large_test_per_class:
        parser.error(
            "--large_test_per_class must be above --test_per_class (> 0), or 0. Received "
            f"{args.large_test_per_class} and {args.test_per_class}."
        )
    if args.test_per_class <= 0:
        parser.error(f"--test_per_class must be positive. Received {args.test_per_class}.")

    checkouts = parse_checkouts(args.checkouts)
    scratch = Path(args.scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    models = build_models(scratch / "models", args.models, args.seed)
    data_dir = scratch / "data"
    most = max(args.test_per_class, args.large_test_per_class)
    files = make_images(data_dir, TRAIN_PER_CLASS + VAL_PER_CLASS + most, args.seed)
    settings = Settings(
        scratch=scratch,
        teacher=models["teacher"],
        student=models["student"],
        data_dir=data_dir,
        shots=args.shots,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        extra_flags=MODEL_FLAGS[args.models] + args.extra_flags.split(),
        stage2_flags=args.stage2_flags.split(),
        timeout_s=args.timeout_s,
    )
    splits = {"small": args.test_per_class}
    if args.large_test_per_class:
        splits["large"] = args.large_test_per_class
    test_images = {label: len(CLASSES) * k for label, k in splits.items()}

    use_test_split(data_dir, files, args.test_per_class)
    entries = []
    for name, path in checkouts:
        entry = {"name": name, "path": str(path), "commit": git_commit(path), "runs": []}
        entry["stage1_workdir"] = run_stage1(path, name, settings, args.verbose)
        entries.append(entry)
    for repeat in range(args.repeats):
        for label, per_class in splits.items():
            use_test_split(data_dir, files, per_class)
            for entry in entries:
                path, stage1 = Path(entry["path"]), entry["stage1_workdir"]
                run = time_stage2(path, entry["name"], stage1, label, settings, args.verbose)
                entry["runs"].append({"split": label, "repeat": repeat, **run})
    use_test_split(data_dir, files, args.test_per_class)
    for entry in entries:
        entry["stage1_workdir"] = str(entry["stage1_workdir"])

    results = {
        "benchmark": "seconds from `python -m mtkd_jax.main --stage=2` to its first train step",
        "command": " ".join([sys.executable, *sys.argv]) if argv is None else argv,
        "models": args.models,
        "model_configs": MODEL_CONFIGS[args.models],
        "model_config_sha1": hashlib.sha1(
            json.dumps(MODEL_CONFIGS[args.models], sort_keys=True).encode()
        ).hexdigest()[:12],
        "dataset": {
            "classes": len(CLASSES),
            "base": 2,
            "novel": 2,
            "train_per_class": TRAIN_PER_CLASS,
            "val_per_class": VAL_PER_CLASS,
            "image_file_px": IMAGE_FILE_SIZE,
        },
        "test_images": test_images,
        "flags": common_flags(settings, Path("<workdir>")),
        "stage2_flags": settings.stage2_flags,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()],
        },
        "note": args.note,
        "repeats": args.repeats,
        "checkouts": entries,
    }
    summarise(results)
    print_table(results)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1, default=str))
        print(f"\nResults: {args.output}")
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `mtkd_jax.clip.tokenizer` for the vocabulary files
    main()
