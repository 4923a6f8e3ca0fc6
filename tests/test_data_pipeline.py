"""Batches: padded evaluation, host sharding, unlabeled stage-1 batches, corrupt images."""

import logging
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from mtkd_jax.data import CLIP_MEAN, CLIP_STD, Split, load_dataset
from mtkd_jax.data.pipeline import make_batches, steps_per_epoch
from mtkd_jax.errors import InputError


def _indexed_split(n: int, size: int = 8) -> Split:
    """In-memory images whose red channel encodes the example index (and label = index % 5)."""
    images = np.zeros((n, size, size, 3), np.uint8)
    images[..., 0] = np.arange(n, dtype=np.uint8)[:, None, None]
    return Split(labels=np.arange(n) % 5, images=images)


def _indices_of(batch) -> np.ndarray:
    red = batch["images"][..., 0].mean(axis=(1, 2))
    pixel = (red * CLIP_STD[0] + CLIP_MEAN[0]) * 255.0
    return np.rint(pixel).astype(int)


def test_every_eval_image_is_counted_exactly_once_with_a_padded_last_batch():
    split = _indexed_split(23)
    batches = list(make_batches(split, image_size=8, batch_size=10, training=False))
    assert len(batches) == 3 == steps_per_epoch(23, 10, training=False, process_count=1)
    assert [b["mask"].sum() for b in batches] == [10, 10, 3]
    for b in batches:
        assert b["images"].shape == (10, 8, 8, 3) and b["images"].dtype == np.float32
        assert b["labels"].shape == (10,) and b["labels"].dtype == np.int32
    seen = np.concatenate([_indices_of(b)[b["mask"]] for b in batches])
    labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(seen, np.arange(23))
    np.testing.assert_array_equal(labels, np.arange(23) % 5)
    assert not batches[-1]["mask"][3:].any()


def test_hosts_read_disjoint_shards_and_yield_the_same_number_of_batches():
    split = _indexed_split(23)
    per_host = [
        list(
            make_batches(
                split,
                image_size=8,
                batch_size=6,
                training=False,
                process_index=p,
                process_count=3,
            )
        )
        for p in range(3)
    ]
    assert len({len(b) for b in per_host}) == 1  # same number of steps on every host
    assert all(b["images"].shape[0] == 2 for batches in per_host for b in batches)
    seen = np.concatenate([_indices_of(b)[b["mask"]] for batches in per_host for b in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(23))


def test_training_hosts_take_disjoint_slices_of_one_shared_permutation():
    split = _indexed_split(24)
    kwargs = dict(image_size=8, batch_size=8, training=True, seed=3, process_count=2)
    epoch = [
        np.concatenate([_order_key(b) for b in make_batches(split, process_index=p, **kwargs)])
        for p in range(2)
    ]
    assert len(epoch[0]) == len(epoch[1]) == 12
    assert set(epoch[0]).isdisjoint(epoch[1])


def test_hosts_blocks_of_each_training_batch_make_the_single_host_batch():
    # 3 processes x 2 rows = the single host's 6 rows, in process order, augmentation included,
    # across an epoch boundary (10 examples, batches of 6): any number of hosts trains alike.
    split = _indexed_split(10)
    kwargs = dict(image_size=8, batch_size=6, training=True, seed=5, epochs=3)
    single = list(make_batches(split, process_index=0, process_count=1, **kwargs))
    per_host = [
        list(make_batches(split, process_index=p, process_count=3, **kwargs)) for p in range(3)
    ]
    assert len(single) == 3 * 1 and all(len(batches) == len(single) for batches in per_host)
    for step, batch in enumerate(single):
        for key in ("images", "labels"):
            joined = np.concatenate([batches[step][key] for batches in per_host])
            np.testing.assert_array_equal(joined, batch[key])


def _order_key(batch):
    # Random crops of a constant image keep its value: the index survives augmentation.
    return _indices_of(batch)


def test_training_batches_are_full_seeded_and_reshuffled_each_epoch():
    split = _indexed_split(10)
    run = lambda seed: [  # noqa: E731
        _order_key(b)
        for b in make_batches(split, image_size=8, batch_size=4, training=True, seed=seed, epochs=3)
    ]
    a, b, c = run(0), run(0), run(1)
    assert len(a) == 3 * steps_per_epoch(10, 4, training=True, process_count=1) == 6
    assert all(len(x) == 4 for x in a)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    stream = np.concatenate(a)
    # The stream walks whole permutations: the first 10 are one epoch, the next 10 another.
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10].tolist() != stream[10:20].tolist()


def test_a_split_smaller_than_a_batch_still_gives_full_training_batches():
    batches = list(make_batches(_indexed_split(3), image_size=8, batch_size=8, training=True))
    assert len(batches) == 1 and batches[0]["mask"].all() and len(batches[0]["images"]) == 8


def test_unlabeled_batches_have_no_labels_key_at_all():
    for training in (True, False):
        batches = make_batches(
            _indexed_split(7), image_size=8, batch_size=4, training=training, labeled=False
        )
        for batch in batches:
            assert set(batch) == {"images", "mask"}


def _write_jpegs(folder, n, size=(40, 30)):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img_{i}.jpg")
        Image.new("RGB", size, (10 * i, 50, 200)).save(path, quality=95)
        paths.append(path)
    return paths


def test_corrupt_and_missing_images_are_skipped_counted_and_reported_once(tmp_path, caplog):
    paths = _write_jpegs(tmp_path / "imgs", 6)
    with open(paths[1], "wb") as f:
        f.write(b"this is not an image")
    with open(paths[4], "rb") as f:
        head = f.read(200)
    with open(paths[4], "wb") as f:  # truncated JPEG
        f.write(head)
    os.remove(paths[5])
    split = Split(labels=np.arange(6), paths=paths)
    it = make_batches(split, image_size=16, batch_size=4, training=False)
    with caplog.at_level(logging.WARNING):
        batches = list(it)
    assert len(batches) == 2
    assert sum(int(b["mask"].sum()) for b in batches) == 3
    assert sorted(it.skipped) == sorted([paths[1], paths[4], paths[5]])
    warnings = [r for r in caplog.records if "Skipped 3" in r.getMessage()]
    assert len(warnings) == 1
    labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, [0, 2, 3])


def test_strict_mode_fails_naming_the_corrupt_file(tmp_path):
    paths = _write_jpegs(tmp_path / "imgs", 4)
    with open(paths[2], "wb") as f:
        f.write(b"\xff\xd8\xff garbage")
    split = Split(labels=np.zeros(4), paths=paths)
    with pytest.raises(ValueError, match="img_2.jpg"):
        list(make_batches(split, image_size=16, batch_size=2, training=False, strict=True))


def test_tiff_and_grayscale_files_are_decoded(tmp_path):
    tif = tmp_path / "a.tif"
    gray = tmp_path / "b.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tif)
    Image.new("L", (20, 20), 128).save(gray)
    split = Split(labels=[0, 1], paths=[str(tif), str(gray)])
    (batch,) = list(make_batches(split, image_size=20, batch_size=2, training=False))
    pixels = batch["images"] * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN)
    np.testing.assert_allclose(pixels[0, 0, 0], [1, 0, 0], atol=1e-5)
    np.testing.assert_allclose(pixels[1, 0, 0], [128 / 255] * 3, atol=1e-5)


def test_shapes_world_loads_as_in_memory_splits(monkeypatch, tmp_path):
    """A stand-in for mtkd_jax.data.shapes with the interface the loader relies on."""

    def render_split(split, num_images, seed, image_size=32):
        rng = np.random.default_rng([seed, len(split)])
        images = rng.integers(0, 256, (num_images, image_size, image_size, 3), dtype=np.uint8)
        labels = (np.arange(num_images) % 4).astype(np.int32)
        return images, labels, [f"a photo of a thing {y}." for y in labels]

    fake = types.ModuleType("mtkd_jax.data.shapes")
    fake.CLASSNAMES = ["red circle", "blue square", "green star", "red star"]
    fake.TEMPLATES = ["a photo of a {}."]
    fake.default_split_sizes = {"train": 40, "val": 8, "test": 12}
    fake.render_split = render_split
    monkeypatch.setitem(sys.modules, "mtkd_jax.data.shapes", fake)
    import mtkd_jax.data as data_pkg

    monkeypatch.setattr(data_pkg, "shapes", fake, raising=False)

    ds = load_dataset("shapes", seed=3, cache_dir=str(tmp_path))
    assert ds.classnames == fake.CLASSNAMES and ds.templates == fake.TEMPLATES
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [40, 8, 12]
    assert ds.split("test").kind == "images"
    np.testing.assert_array_equal(ds.base_classes, [0, 1])
    train, val = ds.few_shot(2, seed=1)
    assert np.bincount(train.labels).tolist() == [2, 2, 2, 2]
    test = ds.split("test")
    (batch,) = list(make_batches(test, image_size=32, batch_size=12, training=False))
    want = (test.images / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(batch["images"], want, atol=1e-5)
    big = list(make_batches(test, image_size=64, batch_size=12, training=True))
    assert big[0]["images"].shape == (12, 64, 64, 3)


def test_partial_batches_on_several_hosts_are_refused_with_what_to_do():
    """Hosts read blocks of each global batch; a partial batch would need unequal blocks, so a
    split smaller than the batch on 2 hosts is refused naming the batch size that works."""
    with pytest.raises(InputError, match="--batch_size to at most 4"):
        make_batches(
            _indexed_split(5), image_size=8, batch_size=8, training=True, partial_batches=True,
            process_index=0, process_count=2,
        )  # fmt: skip


def test_partial_batches_give_each_example_of_a_small_split_once_per_epoch():
    """EuroSAT's shape at 1 shot: 5 base images, batch 8. One batch per epoch, the 5 real rows
    each once (mask True), the 3 pad rows copies of real ones (mask False)."""
    split = _indexed_split(5)
    batches = list(
        make_batches(
            split, image_size=8, batch_size=8, training=True, epochs=3, partial_batches=True
        )
    )
    assert len(batches) == 3
    for batch in batches:
        assert batch["mask"].tolist() == [True] * 5 + [False] * 3
        indices = _indices_of(batch)
        assert sorted(indices[:5]) == list(range(5))
        assert set(indices[5:]) <= set(indices[:5])
        np.testing.assert_array_equal(batch["labels"][:5], indices[:5] % 5)
