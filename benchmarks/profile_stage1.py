"""Where our stage-1 step spends its time on the CPU: by phase, and by XLA op class.

    .venv/bin/python benchmarks/profile_stage1.py --batch_size=2         # paper sizes
    .venv/bin/python benchmarks/profile_stage1.py --teacher=B32 --student=B32 --batch_size=2

Builds the step of `bench_vs_torch.py` (teacher `--teacher` without prompts, student
`--student` with deep prompts 4 x depth 9, the real `objectives.distillation_loss` inside
`train.make_train_step`) and prints JSON lines:

- `phases`: median seconds of the teacher's forward pass alone, the student's forward pass
  alone, and the whole step (the rest is the student's backward pass, the loss and the update);
- `op_classes`: the whole step under `jax.profiler`, each executed XLA thunk classified from
  the compiled HLO (matrix products: dot / convolution, or fusions containing one; reductions;
  elementwise fusions; copies and transposes; other), with its share of the thunk time.

Not a test: numbers depend on the machine and its load. Findings: docs/training.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import tempfile
import time

import jax
import numpy as np
from bench_vs_torch import CLASSES, PRESETS, TEACHER_DIM, jax_stage1

from mtkd_jax import objectives, train


def classify_hlo(hlo_text: str) -> dict[str, str]:
    """`{instruction name: op class}` for every instruction of the compiled module."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            computations[current] = []
        elif current is not None and "=" in line:
            computations[current].append(line)
    opcode_of = {}
    calls_of = {}
    for lines in computations.values():
        for line in lines:
            match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z\-]+)\(", line)
            if match:
                opcode_of[match.group(1)] = match.group(2)
                called = re.search(r"calls=%?([\w.\-]+)", line)
                if called:
                    calls_of[match.group(1)] = called.group(1)

    def inner_opcodes(computation: str, depth: int = 0) -> set[str]:
        found = set()
        for line in computations.get(computation, []):
            match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z\-]+)\(", line)
            if match:
                found.add(match.group(2))
                called = re.search(r"calls=%?([\w.\-]+)", line)
                if called and depth < 3:
                    found |= inner_opcodes(called.group(1), depth + 1)
        return found

    classes, contents = {}, {}
    for name, opcode in opcode_of.items():
        ops = {opcode} | (inner_opcodes(calls_of[name]) if name in calls_of else set())
        contents[name] = sorted(ops - {"parameter", "constant", "fusion"})
        if ops & {"dot", "convolution"}:
            classes[name] = "matmul (dot, convolution)"
        elif "custom-call" in ops:
            classes[name] = "custom call"
        elif ops & {"reduce", "reduce-window"}:
            classes[name] = "reduction"
        elif ops <= {"copy", "transpose", "bitcast", "reshape", "parameter", "constant", "fusion"}:
            classes[name] = "copy, transpose"
        elif opcode == "fusion":
            classes[name] = "elementwise fusion"
        else:
            classes[name] = "other"
    return classes, contents


def profile_step(run, hlo_text: str, steps: int) -> dict:
    classes, contents = classify_hlo(hlo_text)
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        for _ in range(steps):
            run()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    totals, per_thunk = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") != "X":
            continue
        name = event["name"]
        op_class = classes.get(name) or classes.get(name.removeprefix("%"))
        if op_class is None:
            continue
        totals[op_class] += event.get("dur", 0) / 1e6
        per_thunk[name.removeprefix("%")] += event.get("dur", 0) / 1e6
    total = sum(totals.values())
    return {
        "thunk_seconds_per_step": round(total / steps, 3),
        "shares": {k: round(v / total, 3) for k, v in totals.most_common()},
        "top_thunks": [
            [name, classes[name], round(v / total, 3), " ".join(contents[name])[:160]]
            for name, v in per_thunk.most_common(12)
        ],
    }


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="L14", choices=sorted(PRESETS))
    parser.add_argument("--student", default="B16", choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hlo_dump", default="", help="write the compiled step's HLO here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch_size, 224, 224, 3)).astype(np.float32)
    text = rng.normal(size=(CLASSES, TEACHER_DIM)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    args.rounds = max(args.rounds, 1)

    run, parts = jax_stage1(args, images, text, return_parts=True)
    teacher, student, step, state, batch = parts
    teacher_forward = jax.jit(
        lambda variables, x: objectives.teacher_logits_fn(teacher)(variables, x, text, 4.6)
    )
    teacher_variables = train.model_variables(teacher)
    student_variables = train.model_variables(student)
    student_forward = jax.jit(
        lambda variables, x: student.stateless_call(*variables, x, training=True)[0]
    )
    phases = {
        "teacher_forward_s": median_seconds(
            lambda: jax.block_until_ready(teacher_forward(teacher_variables, images)), args.rounds
        ),
        "student_forward_s": median_seconds(
            lambda: jax.block_until_ready(student_forward(student_variables, images)), args.rounds
        ),
        "step_s": median_seconds(run, args.rounds),
    }
    phases["student_backward_loss_update_s"] = (
        phases["step_s"] - phases["teacher_forward_s"] - phases["student_forward_s"]
    )
    print(json.dumps({"phases": {k: round(v, 3) for k, v in phases.items()}, **vars(args)}))
    hlo = step._jitted.lower(state[0], batch, step._frozen).compile().as_text()
    print(json.dumps({"op_classes": profile_step(run, hlo, args.rounds)}), flush=True)
    if args.hlo_dump:
        with open(args.hlo_dump, "w") as file:
            file.write(hlo)


if __name__ == "__main__":
    main()
