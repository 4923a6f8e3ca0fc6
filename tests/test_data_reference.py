"""The authors' data files: Dassl few-shot pickles (read safely) and MTKD's medical splits."""

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
from PIL import Image

from mtkd_jax.data import load_dataset
from mtkd_jax.data.reference import read_dassl_fewshot

CLASSES = ("Benign Tumor", "In Situ Carcinoma", "Invasive Carcinoma", "Normal")


def _bach(root, per_class=6):
    """DATA/bach/images/<class>/<i>.png and the reference's split_BACH.json (folder names)."""
    entries = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        os.makedirs(root / "bach" / "images" / name)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * label, 10 * i, 0)).save(
                root / "bach" / "images" / name / f"{i}.png"
            )
            split = "train" if i < 3 else ("val" if i < 4 else "test")
            entries[split].append([f"{name}/{i}.png", label, name])
    (root / "bach" / "split_BACH.json").write_text(json.dumps(entries))
    return entries


def _dassl_pickle(path, train, val):
    """A few-shot file as Dassl writes it: Datum objects of dassl.data.datasets.base_dataset."""
    names = ("dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset")
    modules = {name: types.ModuleType(name) for name in names}

    class Datum:
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

    Datum.__module__, Datum.__qualname__ = names[-1], "Datum"
    modules[names[-1]].Datum = Datum
    sys.modules.update(modules)
    try:
        data = {"train": [Datum(*item) for item in train], "val": [Datum(*item) for item in val]}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            pickle.dump(data, file, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        for name in names:
            del sys.modules[name]


def test_reference_medical_split_and_folder_class_names(tmp_path):
    entries = _bach(tmp_path)
    ours = load_dataset("bach", source="coop", root=str(tmp_path), cache_dir=str(tmp_path))
    theirs = load_dataset(
        "bach", source="coop", root=str(tmp_path), cache_dir=str(tmp_path), reference_data=True
    )
    assert theirs.classnames == list(CLASSES)
    assert ours.classnames != theirs.classnames  # ours renames ("Normal" -> "normal tissue")
    for split in ("train", "val", "test"):
        tails = ["/".join(p.split("/")[-2:]) for p in theirs.split(split).paths]
        assert tails == [e[0] for e in entries[split]]


def test_dassl_fewshot_pickle_gives_the_reference_shots(tmp_path):
    _bach(tmp_path)
    authors = "/home/author/DATA/bach/images"
    train = [(f"{authors}/{name}/{2 - (label % 2)}.png", label, name)
             for label, name in enumerate(CLASSES)]  # fmt: skip
    val = [(f"{authors}/{name}/3.png", label, name) for label, name in enumerate(CLASSES)]
    _dassl_pickle(tmp_path / "bach" / "split_fewshot" / "shot_1-seed_7.pkl", train, val)
    dataset = load_dataset(
        "bach", source="coop", root=str(tmp_path), cache_dir=str(tmp_path), reference_data=True
    )
    shots, held_out = dataset.few_shot(1, 7)
    assert ["/".join(p.split("/")[-2:]) for p in shots.paths] == [
        "/".join(t[0].split("/")[-2:]) for t in train
    ]
    np.testing.assert_array_equal(shots.labels, [0, 1, 2, 3])
    assert [p.split("/")[-1] for p in held_out.paths] == ["3.png"] * 4
    # Without the flag, our own sample (deterministic, but other images).
    ours = load_dataset("bach", source="coop", root=str(tmp_path), cache_dir=str(tmp_path))
    assert ours.few_shot(1, 7)[0].paths.tolist() != shots.paths.tolist()


def test_a_pickle_naming_anything_but_a_datum_is_refused_unrun(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"train": [Payload()], "val": []}))
    with pytest.raises(ValueError, match="not a Dassl few-shot file"):
        read_dassl_fewshot(str(path))
    assert not (tmp_path / "ran").exists()
    path.write_bytes(pickle.dumps({"train": [1, 2], "val": []}))
    with pytest.raises(ValueError, match="list of Datum records"):
        read_dassl_fewshot(str(path))


def test_a_reference_image_missing_here_is_named(tmp_path):
    _bach(tmp_path)
    _dassl_pickle(
        tmp_path / "bach" / "split_fewshot" / "shot_1-seed_1.pkl",
        [("/x/images/Normal/99.png", 3, "Normal")],
        [],
    )
    dataset = load_dataset("bach", source="coop", root=str(tmp_path), reference_data=True)
    with pytest.raises(ValueError, match="Normal/99.png"):
        dataset.few_shot(1, 1)
