"""Every TFDS-backed dataset under `tfds.testing.mock_data` (nothing downloaded).

mock_data keeps the builders' real class-label features (they ship with TFDS's code), so the
class names are the real ones; the images and labels are random.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mtkd_jax.data import CLIP_MEAN, CLIP_STD, load_dataset, tfds_source
from mtkd_jax.data.pipeline import make_batches
from mtkd_jax.data.registry import REGISTRY

# Class counts of the CoOp protocol (Caltech101 without BACKGROUND_Google and Faces_easy).
NUM_CLASSES = {
    "oxford_pets": 37,
    "oxford_flowers": 102,
    "caltech101": 100,
    "dtd": 47,
    "eurosat": 10,
    "food101": 101,
    "stanford_cars": 196,
    "sun397": 397,
}

EUROSAT_COOP = [
    "Annual Crop Land",
    "Forest",
    "Herbaceous Vegetation Land",
    "Highway or Road",
    "Industrial Buildings",
    "Pasture Land",
    "Permanent Crop Land",
    "Residential Buildings",
    "River",
    "Sea or Lake",
]


def test_every_tfds_dataset_is_covered():
    assert sorted(n for n, s in REGISTRY.items() if s.tfds_name) == sorted(NUM_CLASSES)


@pytest.fixture(scope="module")
def mocked(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    loaded = {}
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        for name in NUM_CLASSES:
            loaded[name] = load_dataset(
                name, source="tfds", tfds_data_dir=str(root), cache_dir=str(root)
            )
    return loaded


@pytest.mark.parametrize("name", sorted(NUM_CLASSES))
def test_tfds_dataset_classes_names_and_splits(mocked, name):
    ds = mocked[name]
    assert ds.source == "tfds"
    assert ds.num_classes == NUM_CLASSES[name]
    assert len(set(ds.classnames)) == ds.num_classes
    for classname in ds.classnames:
        assert classname and classname == classname.strip()
        assert "_" not in classname and not classname.startswith("/")
    assert ds.templates and all("{}" in t for t in ds.templates)
    total = 0
    for split in ("train", "val", "test"):
        s = ds.split(split)
        assert s.kind == "encoded"
        assert s.labels.min(initial=0) >= 0 and s.labels.max(initial=0) < ds.num_classes
        total += len(s)
    assert total > 0


def test_coop_renamings_of_tfds_labels(mocked):
    assert mocked["eurosat"].classnames == EUROSAT_COOP
    # CoOp's Caltech101 order: capitalised folders first, four names singular.
    assert mocked["caltech101"].classnames[:6] == [
        "face",
        "leopard",
        "motorbike",
        "accordion",
        "airplane",
        "anchor",
    ]
    assert "background google" not in mocked["caltech101"].classnames
    assert mocked["oxford_pets"].classnames[:2] == ["abyssinian", "american bulldog"]
    assert mocked["oxford_flowers"].classnames[0] == "pink primrose"
    assert "outdoor apartment building" in mocked["sun397"].classnames
    assert mocked["sun397"].classnames[0] == "abbey"


def test_caltech101_tfds_labels_are_mapped_and_background_dropped():
    names = tfds.builder("caltech101").info.features["label"].names
    classnames, table = tfds_source.class_order(REGISTRY["caltech101"], names)
    singular = {"faces": "face", "leopards": "leopard", "motorbikes": "motorbike"}
    singular["airplanes"] = "airplane"
    for tfds_label, raw in enumerate(names):
        if raw in ("background_google", "faces_easy"):
            assert table[tfds_label] == -1
        else:
            assert classnames[table[tfds_label]] == singular.get(raw, raw).replace("_", " ")
    assert sorted(table[table >= 0].tolist()) == list(range(100))


@pytest.mark.parametrize("name", ["oxford_pets", "eurosat"])
def test_tfds_images_through_the_pipeline(mocked, name):
    test = mocked[name].split("test")
    batches = list(make_batches(test, image_size=24, batch_size=8, training=False))
    assert sum(int(b["mask"].sum()) for b in batches) == len(test)
    lo = (0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    hi = (1 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    for b in batches:
        assert b["images"].shape == (8, 24, 24, 3)
        assert np.all(b["images"] >= lo - 1e-5) and np.all(b["images"] <= hi + 1e-5)
        assert b["images"][b["mask"]].std() > 0.1  # real (random) pixels, not padding
