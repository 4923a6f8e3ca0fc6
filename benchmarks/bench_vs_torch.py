"""Our stage-1 and stage-2 training steps against the PyTorch ones, side by side in one process.

    .venv/bin/python benchmarks/bench_vs_torch.py --torch_script=../shared/bench/torch_mtkd_step.py
    .venv/bin/python benchmarks/bench_vs_torch.py --torch_script=... --teacher=B32 --student=B32 \\
        --batch_size=2 --rounds=2                                               # smoke run

The PyTorch side is `torch_mtkd_step.py` (Hugging Face CLIP vision towers with random weights,
its `Stage1` / `Stage2` classes), imported from `--torch_script`; ours is `stages.
distillation_loss` / `objectives.classification_loss` inside `train.make_train_step`, the real
steps, with random weights too. The shapes are the same: teacher `--teacher` (no deep prompts,
as the torch teacher has none), student `--student` with visual deep prompts 4 x depth 9 and
the 512 -> 768 projector, 37 classes, the five temperatures, batch `--batch_size` at 224 px,
float32. Stage 2: the frozen prompted student and projector, the residual adapter (768 -> 32 ->
768) trained with cross-entropy.

Both frameworks are warmed up (our compile, one step each), then timed in turns, one step of
each per round, so load from other processes hits both alike; the medians and their ratio
`torch_seconds / jax_seconds` (above 1: ours is faster) are printed as JSON lines. Both use
`--threads` CPU threads: torch `set_num_threads`; XLA's CPU client uses every core it sees,
or one with `--threads=1` (on a machine shared with other work, one thread each is the fairer
race: torch's OpenMP barriers suffer more than XLA's pool from cores taken by others).
Measured: docs/training.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
if "--threads=1" in sys.argv:  # before JAX starts: XLA's CPU client on one thread, like torch
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from mtkd_jax import objectives, train  # noqa: E402
from mtkd_jax.clip import CLIP, CLIPConfig  # noqa: E402
from mtkd_jax.optim import make_optimizer  # noqa: E402
from mtkd_jax.student import clip_student  # noqa: E402

TEMPERATURES = (1.0, 2.0, 3.0, 5.0, 6.0)
PRESETS = {"L14": "ViT-L/14", "B16": "ViT-B/16", "B32": "ViT-B/32"}
CLASSES, TEACHER_DIM, PROMPT_LENGTH, PROMPT_DEPTH = 37, 768, 4, 9


def load_torch_script(path: str):
    spec = importlib.util.spec_from_file_location("torch_mtkd_step", path)
    if spec is None or not Path(path).is_file():
        raise SystemExit(f"No PyTorch step script at {path} (pass --torch_script=...).")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jax_student(name: str, *, adapter: bool):
    config = CLIPConfig.preset(PRESETS[name])
    student = clip_student(
        config, TEACHER_DIM, prompt_length=PROMPT_LENGTH, prompt_depth=PROMPT_DEPTH,
        adapter_reduction=24, use_adapter=adapter,
    )  # fmt: skip
    return student


def jax_stage1(args, images, text, *, return_parts: bool = False):
    """Our stage-1 step: `step()` runs one and waits for it (with `return_parts`, also
    `(teacher, student, train_step, [state], batch)`)."""
    keras.utils.set_random_seed(0)
    teacher_config = CLIPConfig.preset(PRESETS[args.teacher]).replace(embed_dim=TEACHER_DIM)
    teacher = CLIP(teacher_config)
    student = jax_student(args.student, adapter=False)
    mesh = train.make_mesh()
    loss_fn = objectives.distillation_loss(
        student, teacher, temperatures=TEMPERATURES, weights=(1.0, 1.0, 1.0), kd_weight=1.0
    )
    frozen = objectives.DistillationInputs(
        teacher=train.model_variables(teacher),
        text=jax.numpy.asarray(text),
        scale=jax.numpy.float32(np.log(100.0)),
    )
    run, step, state, batch = _stepper(loss_fn, student, mesh, frozen, {"images": images}, args)
    return (run, (teacher, student, step, state, batch)) if return_parts else run


def jax_stage2(args, images, text):
    keras.utils.set_random_seed(0)
    student = jax_student(args.student, adapter=True)
    mesh = train.make_mesh()
    frozen = objectives.ClassificationInputs(
        text=jax.numpy.asarray(text),
        scale=jax.numpy.float32(np.log(100.0)),
        label_map=jax.numpy.arange(CLASSES, dtype=jax.numpy.int32),
    )
    labels = np.random.default_rng(0).integers(0, CLASSES, len(images)).astype(np.int32)
    batch = {"images": images, "labels": labels}
    return _stepper(objectives.classification_loss(student), student, mesh, frozen, batch, args)[0]


def _stepper(loss_fn, student, mesh, frozen, batch, args):
    optimizer = make_optimizer(epochs=2, warmup_epochs=1, steps_per_epoch=args.rounds + 8)
    state = [train.init_train_state(*train.model_variables(student), optimizer, seed=0, mesh=mesh)]
    step = train.make_train_step(loss_fn, optimizer, mesh, frozen=frozen)
    batch = train.shard_batch(batch, mesh)

    def run():
        state[0], measurements = step(state[0], batch)
        return float(jax.block_until_ready(measurements["loss"]))

    return run, step, state, batch


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, jax_step, torch_step, rounds: int) -> dict:
    compile_s = time_once(jax_step)  # trace + compile + one step
    time_once(jax_step)
    time_once(torch_step)
    jax_times, torch_times = [], []
    for _ in range(rounds):
        jax_times.append(time_once(jax_step))
        torch_times.append(time_once(torch_step))
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    return {
        "step": name,
        "jax_s": round(jax_s, 3),
        "torch_s": round(torch_s, 3),
        "torch_over_jax": round(torch_s / jax_s, 3),
        "jax_compile_s": round(compile_s, 1),
        "jax_times": [round(t, 3) for t in jax_times],
        "torch_times": [round(t, 3) for t in torch_times],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch_script", default="../shared/bench/torch_mtkd_step.py")
    parser.add_argument("--teacher", default="L14", choices=sorted(PRESETS))
    parser.add_argument("--student", default="B16", choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps of each framework")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", default="stage1,stage2")
    args = parser.parse_args()

    reference = load_torch_script(args.torch_script)
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch_size, 224, 224, 3)).astype(np.float32)
    text = rng.normal(size=(CLASSES, TEACHER_DIM)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    machine = {"jax": jax.__version__, "torch": torch.__version__, "cpus": os.cpu_count()}
    print(json.dumps({"machine": machine, **vars(args)}), flush=True)
    for name in args.steps.split(","):
        torch.manual_seed(0)
        if name == "stage1":
            ours = jax_stage1(args, images, text)
            theirs = reference.Stage1(
                args.teacher, args.student, args.batch_size, "prompt", PROMPT_LENGTH, PROMPT_DEPTH
            )
        elif name == "stage2":
            ours = jax_stage2(args, images, text)
            theirs = reference.Stage2(args.student, args.batch_size, PROMPT_LENGTH, PROMPT_DEPTH)
        else:
            raise SystemExit(f"Unknown step {name!r}. Valid steps: stage1, stage2.")
        print(json.dumps(compare(name, ours, theirs.step, args.rounds)), flush=True)
        del ours, theirs


if __name__ == "__main__":
    main()
