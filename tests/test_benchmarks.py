"""The step benchmarks run, time the step they say they time, and report numbers that hold
together (tiny sizes, CPU).

What a rate cannot show on a shared CPU, these can: the first loss a benchmark reports is the loss
of its own model on its own batch, computed here without the training step; bfloat16 does run
in bfloat16 (it moves the loss) and stays close to float32; the first, compiling call costs more
than a timed step; the derived numbers agree with the rates they come from.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _json_lines(script, *args):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


def _benchmark_module(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # for its `from step_timing import`
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed_consistently(run, batch_size):
    # The first call traces, compiles and runs one step: it cannot be quicker than a timed step.
    assert run["compile_s"] > 1.0 / run["steps_per_s"], run
    assert np.isclose(run["images_per_s"], run["steps_per_s"] * batch_size, rtol=1e-2), run


def test_stage1_benchmark_compares_precisions_and_attention_in_one_process():
    lines = _json_lines(
        "bench_stage1.py", "--teacher=tiny-teacher", "--student=tiny-student",
        "--teacher_prompt_depth=3", "--student_prompt_depth=2", "--image_size=32",
        "--batch_size=8", "--steps=1", "--dtypes=float32,bfloat16,bfloat16:xla",
    )  # fmt: skip
    runs, (attention_ratio, precision_ratio) = lines[:3], lines[3:]
    assert [(r["dtype"], r["attention"]) for r in runs] == [
        ("float32", "keras"), ("bfloat16", "keras"), ("bfloat16", "xla"),
    ]  # fmt: skip
    for run in runs:
        assert run["trace_count"] == 1, run
        _timed_consistently(run, batch_size=8)
    # Same weights and batch: bfloat16 moves the first loss (so it did run in bfloat16), by well
    # under 1%; the attention implementation (the same math) gives the same bfloat16 loss on a CPU.
    f32, bf16 = runs[0]["first_loss"], runs[1]["first_loss"]
    moved = abs(bf16 - f32) / abs(f32)
    assert 0 < moved < 1e-2, (f32, bf16)
    assert np.isclose(precision_ratio["first_loss_relative_difference"], moved, rtol=1e-2)
    assert runs[1]["first_loss"] == runs[2]["first_loss"]
    keras_over_xla = runs[1]["steps_per_s"] / runs[2]["steps_per_s"]
    assert np.isclose(attention_ratio["keras_over_xla_attention_bfloat16"], keras_over_xla, 1e-2)


def test_train_step_benchmark_reports_the_loss_of_its_own_model_and_batch(monkeypatch):
    (line,) = _json_lines("bench_train_step.py", "--steps=2", "--batch_size=8", "--image_size=32")
    assert line["trace_count"] == 1
    _timed_consistently(line, batch_size=8)

    # The same student (seeded) and batch, the loss computed eagerly, without the jitted step.
    bench = _benchmark_module("bench_train_step", monkeypatch)
    from mtkd_jax.losses import multilevel_kd

    projection, images = bench.make_inputs(batch_size=8, image_size=32, classes=37)
    student = bench.build_student(image_size=32, classes=37, width=32, dtype=None)
    teacher_logits = images.mean(axis=(1, 2)) @ projection * 10.0
    expected, _ = multilevel_kd(np.asarray(student(images)), teacher_logits)
    np.testing.assert_allclose(line["first_loss"], float(expected), rtol=1e-4)
    assert line["final_loss"] != line["first_loss"]  # the timed steps did update the student


def test_level_weights_at_the_paper_sizes_match_docs_reproducing():
    """benchmarks/level_weights.py runs, and what docs/reproducing.md quotes from it holds: at
    batch 8 and 37 classes the instance level is over 99% of the stage-1 loss."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "level_weights.py")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {}
    for line in completed.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("batch 8"):
            rows[(cells[0], cells[1])] = float(cells[3].rstrip("%"))
    assert len(rows) == 12
    assert rows[("batch 8, 37 classes", "instance")] > 99.0
    docs = (ROOT / "docs" / "reproducing.md").read_text()
    share = rows[("batch 8, 37 classes", "instance")]
    assert f"| 37 (Pets) | {share:.1f}%" in docs


def test_profile_classifies_each_compiled_instruction_by_op_class():
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_stage1 import classify_hlo

    def fn(a, b):
        return jnp.tanh(a @ b).sum(), a.T.copy()

    x = jnp.ones((64, 32))
    hlo = jax.jit(fn).lower(x, jnp.ones((32, 16))).compile().as_text()
    classes, contents = classify_hlo(hlo)
    assert set(classes) == set(contents)
    by_class = {}
    for name, op_class in classes.items():
        by_class.setdefault(op_class, []).append(name)
    assert by_class.get("matmul (dot, convolution)"), classes
    dots = [n for n in by_class["matmul (dot, convolution)"] if "dot" in contents[n]]
    assert dots, contents


@pytest.mark.slow  # exports two models to ONNX (~40-70 s on 2 busy cores)
def test_deploy_cost_benchmark_gives_teacher_over_student_ratios():
    lines = _json_lines("bench_deploy_cost.py", "--groups=demo", "--rounds=2")
    (ratios,) = [line for line in lines if "teacher_over" in line]
    assert ratios["params_millions"] > 1 and ratios["gflops_per_image"] > 1
    models = [line for line in lines if "model" in line and "latency_ms_batch1" in line]
    assert [m["model"] for m in models] == [
        "teacher shapes CLIP (tiny-teacher)", "student tiny_resnet",
    ]  # fmt: skip
