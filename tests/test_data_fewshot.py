"""Few-shot sampling (deterministic across processes, cached, warnings) and base/novel."""

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mtkd_jax.data import FewShotDataset, Split


def _dataset(counts_train, counts_val=None, cache_dir=None, name="toy"):
    """A dataset whose class c has counts_train[c] train images (interleaved classes)."""

    def split(counts, tag):
        labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
        order = np.random.default_rng(0).permutation(len(labels))
        labels = labels[order]
        return Split(labels=labels, paths=[f"{tag}/{i}.jpg" for i in range(len(labels))])

    counts_val = counts_val or [6] * len(counts_train)
    return FewShotDataset(
        name=name,
        source="coop",
        classnames=[f"class {c}" for c in range(len(counts_train))],
        templates=["a photo of a {}."],
        splits={
            "train": split(counts_train, "train"),
            "val": split(counts_val, "val"),
            "test": split([5] * len(counts_train), "test"),
        },
        cache_dir=cache_dir,
    )


def test_k_per_class_from_train_and_min_k_4_from_val(tmp_path):
    ds = _dataset([20] * 5, cache_dir=str(tmp_path))
    train, val = ds.few_shot(8, seed=1)
    assert np.bincount(train.labels).tolist() == [8] * 5
    assert np.bincount(val.labels).tolist() == [4] * 5
    assert len(set(train.ids)) == 40
    assert set(train.ids) <= set(ds.split("train").ids)
    other, _ = ds.few_shot(8, seed=2)
    assert set(other.ids) != set(train.ids)


_CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_data_fewshot import _dataset
ds = _dataset([30, 12, 25, 17], cache_dir={cache!r})
train, val = ds.few_shot(4, seed=7)
print(json.dumps([train.ids.tolist(), val.ids.tolist()]))
"""


def test_sampling_is_identical_in_separate_processes(tmp_path):
    """Different hash seeds, no shared cache: the sample depends on (dataset, K, seed) only."""
    outputs = []
    for i, hash_seed in enumerate(("1", "2")):
        code = _CHILD.format(tests=os.path.dirname(__file__), cache=str(tmp_path / f"c{i}"))
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    here = _dataset([30, 12, 25, 17], cache_dir=str(tmp_path / "here")).few_shot(4, seed=7)
    assert outputs[0] == outputs[1] == [here[0].ids.tolist(), here[1].ids.tolist()]


def test_the_sample_is_cached_as_inspectable_json_and_reused(tmp_path):
    ds = _dataset([10] * 3, cache_dir=str(tmp_path))
    train, _ = ds.few_shot(2, seed=5)
    path = ds.few_shot_cache_path(2, 5)
    assert path.startswith(str(tmp_path / "fewshot"))
    payload = json.loads(open(path).read())
    assert payload["k"] == 2 and payload["seed"] == 5 and payload["dataset"] == "toy"
    assert payload["train"]["ids"] == train.ids.tolist()
    # An edited (but consistent) cache file is what later calls use.
    split = ds.split("train")
    chosen = [int(np.flatnonzero(split.labels == c)[-1]) for c in range(3)]
    payload["train"] = {"positions": chosen, "ids": split.ids[chosen].tolist()}
    with open(path, "w") as f:
        json.dump(payload, f)
    again, _ = ds.few_shot(2, seed=5)
    assert again.ids.tolist() == split.ids[chosen].tolist()


def test_a_stale_cache_is_ignored(tmp_path, caplog):
    ds = _dataset([10] * 3, cache_dir=str(tmp_path))
    train, _ = ds.few_shot(2, seed=5)
    path = ds.few_shot_cache_path(2, 5)
    payload = json.loads(open(path).read())
    payload["train"]["ids"][0] = "somewhere/else.jpg"
    with open(path, "w") as f:
        json.dump(payload, f)
    with caplog.at_level(logging.WARNING):
        again, _ = ds.few_shot(2, seed=5)
    assert again.ids.tolist() == train.ids.tolist()
    assert any("stale" in r.getMessage() for r in caplog.records)


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MTKD_CACHE_DIR", str(tmp_path / "env"))
    ds = _dataset([4, 4])
    ds.few_shot(1, seed=0)
    assert os.path.exists(tmp_path / "env" / "fewshot" / "toy_coop_k1_seed0.json")


def test_k_larger_than_a_class_takes_all_with_a_warning_naming_it(tmp_path, caplog):
    ds = _dataset([20, 3, 20], cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        train, _ = ds.few_shot(5, seed=0)
    assert np.bincount(train.labels).tolist() == [5, 3, 5]
    assert any("'class 1'" in r.getMessage() and "only 3" in r.getMessage() for r in caplog.records)


def test_a_class_without_images_is_an_error_naming_it(tmp_path):
    ds = _dataset([4, 0, 4], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'class 1'"):
        ds.few_shot(2, seed=0)


@pytest.mark.parametrize("num_classes", [1, 2, 7, 10, 37, 47, 100, 101])
def test_base_novel_partition(num_classes):
    ds = _dataset([2] * num_classes)
    base, novel = ds.base_classes, ds.novel_classes
    assert base.tolist() == list(range(math.ceil(num_classes / 2)))
    assert novel.tolist() == list(range(math.ceil(num_classes / 2), num_classes))
    assert ds.class_ids("all").tolist() == list(range(num_classes))


def test_subsample_keeps_the_original_label_ids():
    ds = _dataset([2] * 5)
    test = ds.split("test")
    for which in ("base", "novel", "all"):
        sub = ds.subsample("test", which)
        assert set(sub.labels.tolist()) == set(ds.class_ids(which).tolist())
        assert len(sub) == int(np.isin(test.labels, ds.class_ids(which)).sum())
    base, novel = ds.subsample(test, "base"), ds.subsample(test, "novel")
    assert sorted(base.ids.tolist() + novel.ids.tolist()) == sorted(test.ids.tolist())
    with pytest.raises(ValueError, match="Received: which='new'"):
        ds.subsample(test, "new")
