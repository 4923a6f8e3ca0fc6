"""The CoOp layout, the class-folder layout (medical sets, folder:), and the error messages."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from mtkd_jax.data import DATASET_NAMES, load_dataset


def _jpeg(path, colour=(120, 60, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (24, 18), colour).save(path)


def _coop_pets(data_root, per_split=(3, 2, 2), classes=("Abyssinian", "american_bulldog")):
    """A tiny DATA/oxford_pets tree with its split_zhou_OxfordPets.json."""
    base = os.path.join(data_root, "oxford_pets")
    split = {}
    for name, count in zip(("train", "val", "test"), per_split, strict=True):
        entries = []
        for label, cls in enumerate(classes):
            for i in range(count):
                rel = f"{cls}_{name}_{i}.jpg"
                _jpeg(os.path.join(base, "images", rel), (40 * label, 10 * i, 90))
                entries.append([rel, label, cls.lower()])
        split[name] = entries
    with open(os.path.join(base, "split_zhou_OxfordPets.json"), "w") as f:
        json.dump(split, f)
    return split


def test_coop_layout_reads_the_split_file(tmp_path):
    split = _coop_pets(tmp_path)
    ds = load_dataset("oxford_pets", source="coop", root=str(tmp_path), cache_dir=str(tmp_path))
    assert ds.source == "coop"
    assert ds.classnames == ["abyssinian", "american bulldog"]
    assert ds.templates == ["a photo of a {}, a type of pet."]
    for name in ("train", "val", "test"):
        got = ds.split(name)
        assert got.kind == "paths"
        assert got.ids.tolist() == [e[0] for e in split[name]]
        np.testing.assert_array_equal(got.labels, [e[1] for e in split[name]])
        assert all(p.startswith(str(tmp_path / "oxford_pets" / "images")) for p in got.paths)


def test_auto_source_picks_the_coop_layout_and_says_so(tmp_path, caplog):
    _coop_pets(tmp_path)
    with caplog.at_level(logging.INFO):
        ds = load_dataset("oxford_pets", root=str(tmp_path), tfds_data_dir=str(tmp_path / "t"))
    assert ds.source == "coop"
    assert any("CoOp layout" in r.getMessage() for r in caplog.records)


def test_missing_listed_images_are_skipped_or_fail_in_strict_mode(tmp_path, caplog):
    split = _coop_pets(tmp_path)
    os.remove(tmp_path / "oxford_pets" / "images" / split["test"][1][0])
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("oxford_pets", source="coop", root=str(tmp_path))
    assert len(ds.split("test")) == len(split["test"]) - 1
    assert any("do not exist" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError, match=split["test"][1][0]):
        load_dataset("oxford_pets", source="coop", root=str(tmp_path), strict=True)


def test_fgvc_aircraft_variant_files(tmp_path):
    base = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A340-500", "Cessna 172"]
    os.makedirs(base)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for split in ("train", "val", "test"):
        lines = []
        for variant in variants:
            image_id = f"{1000000 + n}"
            _jpeg(str(base / "images" / f"{image_id}.jpg"))
            lines.append(f"{image_id} {variant}")
            n += 1
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset("fgvc_aircraft", source="coop", root=str(tmp_path))
    assert ds.classnames == variants
    assert ds.templates == ["a photo of a {}, a type of aircraft."]
    np.testing.assert_array_equal(ds.split("test").labels, [0, 1, 2])
    assert ds.split("test").paths[2].endswith("1000008.jpg")


def _class_folders(folder, counts):
    for cls, count in counts.items():
        for i in range(count):
            _jpeg(os.path.join(folder, cls, f"{i:03d}.png"))


def test_medical_class_folders_are_split_50_20_30_once_and_reused(tmp_path):
    counts = {"Benign": 10, "InSitu": 20, "Invasive": 7, "Normal": 10}
    _class_folders(tmp_path / "bach" / "images", counts)
    ds = load_dataset("bach", source="coop", root=str(tmp_path), cache_dir=str(tmp_path))
    assert ds.source == "folders"
    assert ds.classnames == [
        "benign tumour",
        "in situ carcinoma",
        "invasive carcinoma",
        "normal tissue",
    ]
    split_file = tmp_path / "bach" / "split_mtkd_bach.json"
    saved = json.loads(split_file.read_text())
    for label, count in enumerate(counts.values()):
        sizes = [sum(1 for e in saved[s] if e[1] == label) for s in ("train", "val", "test")]
        assert sizes == [
            round(count * 0.5),
            round(count * 0.2),
            count - round(count * 0.5) - round(count * 0.2),
        ]
    all_files = sorted(e[0] for s in saved.values() for e in s)
    assert len(all_files) == len(set(all_files)) == sum(counts.values())
    # Reused: a new image does not change the split, the file is not rewritten.
    mtime = split_file.stat().st_mtime_ns
    _jpeg(str(tmp_path / "bach" / "images" / "Normal" / "999.png"))
    again = load_dataset("bach", source="coop", root=str(tmp_path))
    assert split_file.stat().st_mtime_ns == mtime
    assert again.split("train").ids.tolist() == ds.split("train").ids.tolist()
    # Stable: recreating it from the same files gives the same split.
    os.remove(tmp_path / "bach" / "images" / "Normal" / "999.png")
    os.remove(split_file)
    load_dataset("bach", source="coop", root=str(tmp_path))
    assert json.loads(split_file.read_text()) == saved


def test_folder_source_and_empty_class_error(tmp_path):
    root = tmp_path / "my_set"
    _class_folders(root, {"sea_lion": 5, "walrus": 4})
    ds = load_dataset(f"folder:{root}", cache_dir=str(tmp_path))
    assert ds.classnames == ["sea lion", "walrus"]
    assert ds.templates == ["a photo of a {}."]
    assert sum(len(ds.split(s)) for s in ("train", "val", "test")) == 9
    os.makedirs(tmp_path / "other" / "empty_class")
    _class_folders(tmp_path / "other", {"full": 2})
    with pytest.raises(ValueError, match="empty_class"):
        load_dataset(f"folder:{tmp_path / 'other'}")


def test_not_found_names_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("oxford_pets", root=str(tmp_path), tfds_data_dir=str(tmp_path / "tfds"))
    message = str(info.value)
    assert str(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json") in message
    assert f"tfds build oxford_iiit_pet --data_dir={tmp_path / 'tfds'}" in message
    assert "Traceback" not in message
    with pytest.raises(FileNotFoundError, match=r"bach/images/<class name>"):
        load_dataset("bach", root=str(tmp_path))


def test_unknown_names_and_sources_list_the_valid_ones():
    with pytest.raises(ValueError, match="oxford_pets.*Received: name='pets'"):
        load_dataset("pets")
    assert "eurosat" in DATASET_NAMES and "bach" in DATASET_NAMES
    with pytest.raises(ValueError, match="Valid data sources"):
        load_dataset("dtd", source="kaggle")
