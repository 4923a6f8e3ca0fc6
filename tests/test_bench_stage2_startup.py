"""`benchmarks/bench_stage2_startup.py` times what it says: models of the paper's sizes, a dataset
whose test split alone changes between its two timings, and the first stage-2 step.

The model test reads the benchmark's Hugging Face configs with the project's own reader and
compares them with the named architectures (`CLIPConfig.preset`), without building a model. The
end-to-end run with tiny models is `slow`.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mtkd_jax.clip.config import CLIPConfig
from mtkd_jax.clip.convert_hf import hf_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_stage2_startup", ROOT / "benchmarks" / "bench_stage2_startup.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("role, preset", [("teacher", "ViT-L/14"), ("student", "ViT-B/16")])
def test_paper_models_have_the_named_architectures(bench, role, preset):
    read = hf_config(bench.hf_config_dict("paper", role), f"<{role}>")
    assert read == CLIPConfig.preset(preset)
    assert read.activation == "quick_gelu" and read.image_size == 224


def test_only_the_test_split_changes_and_it_holds_base_and_novel_classes(bench, tmp_path):
    from mtkd_jax import data

    files = bench.make_images(tmp_path / "data", 6 + 5, seed=0)
    small, large = bench.split_payload(files, 2), bench.split_payload(files, 5)
    assert small["train"] == large["train"] and small["val"] == large["val"]
    assert small["test"] == [e for e in large["test"] if e in small["test"]]
    assert len(small["test"]) == 8 and len(large["test"]) == 20
    listed = [e[0] for split in large.values() for e in split]
    assert len(listed) == len(set(listed)) == 4 * 11  # no image in two splits

    # Read by the project as the benchmark's runs read it.
    assert bench.use_test_split(tmp_path / "data", files, 2) == 8
    dataset = data.load_dataset(f"folder:{tmp_path / 'data'}", cache_dir=str(tmp_path / "cache"))
    assert len(dataset.split("test")) == 8 and len(dataset.split("train")) == 16
    test_labels = set(dataset.split("test").labels.tolist())
    assert set(dataset.class_ids("base")) < test_labels and set(dataset.class_ids("novel"))


def test_the_clock_stops_at_the_first_stage2_train_line(bench, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert bench.first_stage2_step(metrics) is None
    lines = [
        {"stage": "stage1", "kind": "train", "step": 1, "loss": 1.0},
        {"stage": "stage2", "kind": "eval", "step": 0, "all": 0.5},
    ]
    written = "".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "stage": "sta'
    metrics.write_text(written)
    assert bench.first_stage2_step(metrics) is None  # a line being written is skipped
    with open(metrics, "a") as file:
        file.write(
            'ge2", "step": 1}\n' + json.dumps({"stage": "stage2", "kind": "train", "step": 2})
        )
    assert bench.first_stage2_step(metrics)["step"] == 1


@pytest.mark.slow
def test_tiny_models_end_to_end(bench, tmp_path):
    output = tmp_path / "results.json"
    results = bench.main(
        [f"--checkouts=here={ROOT}", "--models=tiny", f"--scratch={tmp_path / 'scratch'}",
         "--test_per_class=1", "--large_test_per_class=2", "--repeats=1", f"--output={output}"]
    )  # fmt: skip
    assert json.loads(output.read_text())["test_images"] == {"small": 4, "large": 8}
    (entry,) = results["checkouts"]
    assert [r["split"] for r in entry["runs"]] == ["small", "large"]
    for run in entry["runs"]:
        assert run["first_step"]["stage"] == "stage2"
        assert 0 < run["seconds_to_first_step"] < 600
        assert run["timeline"]  # stdout lines with their times
