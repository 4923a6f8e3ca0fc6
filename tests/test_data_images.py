"""Bad and unusual images in dataset folders (CoOp layout and folder:): valid formats decode to
the right upright RGB; broken files stop the run naming the file, or, opted in, are skipped and
listed in the log and in results.json. Nothing is dropped silently."""

import io
import json
import logging
import os
import types

import numpy as np
import pytest
from PIL import Image

from mtkd_jax import errors
from mtkd_jax.data import images, load_dataset
from mtkd_jax.data.dataset import Split
from mtkd_jax.data.pipeline import make_batches
from mtkd_jax.data.preprocess import decode_rgb


def _decoded(path) -> np.ndarray:
    """What the pipeline's TensorFlow decoder makes of the file: uint8 [H, W, 3]."""
    return decode_rgb(images.encoded_rgb(str(path))).numpy()


def _two_colours(width=40, height=20) -> np.ndarray:
    """Left half red, right half blue: orientation is visible."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (220, 30, 30)
    pixels[:, width // 2 :] = (30, 30, 220)
    return pixels


def test_grayscale_rgba_and_palette_pngs_decode_as_pil_converts_them(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    palette = Image.fromarray(rgba[..., :3], "RGB").quantize(colors=16)
    palette.save(tmp_path / "palette.png", transparency=0)
    np.testing.assert_array_equal(_decoded(tmp_path / "rgba.png"), rgba[..., :3])
    np.testing.assert_array_equal(_decoded(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, 2))
    np.testing.assert_array_equal(
        _decoded(tmp_path / "palette.png"), np.asarray(palette.convert("RGB"))
    )


def test_a_16_bit_png_is_scaled_to_8_bits(tmp_path):
    values = np.linspace(0, 65535, 12 * 10).reshape(12, 10).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # mode I;16
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(
        _decoded(tmp_path / "deep.png"), np.repeat(expected[..., None], 3, 2)
    )


def test_cmyk_and_grayscale_jpegs_decode_to_their_colours(tmp_path):
    source = _two_colours()
    Image.fromarray(source).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(source).convert("L").save(tmp_path / "gray.jpg", quality=95)
    cmyk = _decoded(tmp_path / "cmyk.jpg").astype(int)
    assert cmyk.shape == source.shape
    assert np.abs(cmyk[:, 2:18] - source[:, 2:18]).max() <= 12  # away from the colour edge
    assert np.abs(cmyk[:, 22:38] - source[:, 22:38]).max() <= 12
    gray = _decoded(tmp_path / "gray.jpg")
    assert gray.shape == source.shape and np.array_equal(gray[..., 0], gray[..., 2])


@pytest.mark.parametrize("orientation, expected_turn", [(3, 2), (6, -1), (8, 1)])
def test_an_exif_rotated_jpeg_is_turned_upright(tmp_path, orientation, expected_turn):
    stored = _two_colours()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    upright = np.rot90(stored, k=expected_turn)  # np.rot90: k=1 is a quarter turn left
    decoded = _decoded(path).astype(int)
    assert decoded.shape == upright.shape
    assert np.abs(decoded - upright).mean() < 4


def test_a_large_image_decodes_and_one_above_the_pixel_limit_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(tmp_path / "big.png")
    assert _decoded(tmp_path / "big.png").shape == (2000, 3000, 3)
    monkeypatch.setattr(images, "MAX_PIXELS", 3000 * 2000 - 1)
    with pytest.raises(images.BadImageError, match="big.png.*3000x2000.*above the limit"):
        images.encoded_rgb(str(tmp_path / "big.png"))


def _broken_files(folder) -> dict[str, str]:
    """{file name: the reason that must be given}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("these are my notes, not a photo\n")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
        buffer, format="JPEG"
    )
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return {"empty.jpg": "empty", "notes.jpg": "not an image", "truncated.jpg": "truncated"}


def test_each_broken_file_is_refused_naming_it_and_why(tmp_path):
    for name, reason in _broken_files(tmp_path).items():
        with pytest.raises(errors.UserError, match=f"{name}.*{reason}.*--nostrict_data"):
            images.encoded_rgb(str(tmp_path / name))


def _folder_dataset(root):
    """folder:<root> with two classes of good images and the broken files in class 'b'."""
    for label, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        os.makedirs(root / label)
        for i in range(6):
            Image.new("RGB", (16, 12), colour).save(root / label / f"good{i}.png")
    return _broken_files(root / "b")


def _all_paths(dataset):
    return {
        str(path): name for name in ("train", "val", "test") for path in dataset.split(name).paths
    }


def test_folder_dataset_stops_on_a_broken_image_by_default_and_skips_when_asked(tmp_path, caplog):
    broken = _folder_dataset(tmp_path / "set")
    dataset = load_dataset(f"folder:{tmp_path / 'set'}", cache_dir=str(tmp_path / "cache"))
    paths = _all_paths(dataset)
    assert {os.path.basename(p) for p in paths} >= set(broken)  # listed, not dropped silently
    split = Split(labels=np.zeros(len(paths), np.int32), paths=sorted(paths))
    with pytest.raises(images.BadImageError) as raised:
        list(make_batches(split, image_size=8, batch_size=4, training=False, strict=True))
    assert os.path.basename(raised.value.path) in broken and str(tmp_path) in str(raised.value)

    images.reset_skipped()
    iterator = make_batches(split, image_size=8, batch_size=4, training=False, strict=False)
    with caplog.at_level(logging.WARNING):
        batches = list(iterator)
    assert sum(int(b["mask"].sum()) for b in batches) == len(paths) - len(broken)
    skipped = images.skipped_images()
    assert {os.path.basename(p) for p in skipped} == set(broken)
    log = "\n".join(r.getMessage() for r in caplog.records)
    for path, reason in skipped.items():
        assert f"{path}: {reason}" in log


def test_an_empty_class_folder_stops_naming_it(tmp_path):
    _folder_dataset(tmp_path / "set")
    os.makedirs(tmp_path / "set" / "c_empty")
    with pytest.raises(errors.UserError, match="c_empty.*holds no images"):
        load_dataset(f"folder:{tmp_path / 'set'}", cache_dir=str(tmp_path / "cache"))


def test_coop_layout_stops_on_a_broken_listed_image(tmp_path):
    base = tmp_path / "oxford_pets"
    broken = _broken_files(base / "images")
    good = []
    for i in range(4):
        Image.new("RGB", (16, 12), (0, 90, 0)).save(base / "images" / f"good{i}.jpg")
        good.append([f"good{i}.jpg", i % 2, ["abyssinian", "beagle"][i % 2]])
    listed = good + [[name, 0, "abyssinian"] for name in broken]
    (base / "split_zhou_OxfordPets.json").write_text(
        json.dumps({"train": good, "val": good, "test": listed})
    )
    dataset = load_dataset("oxford_pets", source="coop", root=str(tmp_path), strict=True)
    with pytest.raises(images.BadImageError, match=str(base / "images")):
        list(make_batches(dataset.split("test"), image_size=8, batch_size=4, training=False,
                          strict=True))  # fmt: skip


def test_results_json_lists_the_skipped_images(tmp_path):
    from mtkd_jax import experiment

    images.reset_skipped()
    images.record_skipped("/data/b/notes.jpg", "it is not an image file")
    ctx = types.SimpleNamespace(workdir=tmp_path, results={"methods": {}})
    experiment.write_results(ctx)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["skipped_images"] == {"/data/b/notes.jpg": "it is not an image file"}


def test_runs_stop_on_bad_images_unless_told_otherwise():
    from mtkd_jax import config as config_lib
    from mtkd_jax import main as main_lib

    assert config_lib.RunConfig().strict_data is True
    assert "--nostrict_data" in main_lib.HELP["strict_data"]
