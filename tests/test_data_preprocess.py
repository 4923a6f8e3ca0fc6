"""CLIP transforms against independent PIL/numpy references and torchvision's crop rules."""

import math

import numpy as np
import pytest
from PIL import Image

from mtkd_jax.data import CLIP_MEAN, CLIP_STD, preprocess
from mtkd_jax.data.tf_setup import import_tensorflow

tf = import_tensorflow()


def _smooth_image(h, w, seed=0):
    """A photo-like (smooth) uint8 image, so resampling differences stay small."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def _pil_clip_eval(image: np.ndarray, size: int) -> np.ndarray:
    """CLIP's torchvision preprocess written with PIL and numpy only."""
    h, w = image.shape[:2]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    crop = resized[top : top + size, left : left + size].astype(np.float32) / 255.0
    return (crop - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (64, 64), (40, 90)])
def test_eval_transform_matches_pil_clip_preprocess(shape):
    image = _smooth_image(*shape)
    got = preprocess.eval_transform(tf.constant(image), 56).numpy()
    want = _pil_clip_eval(image, 56)
    assert got.shape == want.shape == (56, 56, 3)
    # TF's antialiased bicubic and PIL's differ by rounding: within two grey levels.
    pixel_std = np.asarray(CLIP_STD, np.float32)
    diff_levels = np.abs(got - want) * pixel_std * 255.0
    assert diff_levels.mean() < 0.5
    assert diff_levels.max() <= 3.0


def test_eval_transform_of_an_image_already_at_size_is_just_normalisation():
    image = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    got = preprocess.eval_transform(tf.constant(image), 32).numpy()
    want = (image / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(got, want, atol=1e-5)


def _window(h, w, seed):
    top, left, ch, cw = preprocess.random_crop_window(
        tf.constant(h), tf.constant(w), tf.constant(seed, tf.int64)
    )
    return int(top), int(left), int(ch), int(cw)


def test_random_crop_windows_follow_torchvision_rules():
    h, w = 375, 500
    areas, ratios = [], []
    for i in range(300):
        top, left, ch, cw = _window(h, w, [7, i])
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        areas.append(ch * cw / (h * w))
        ratios.append(cw / ch)
    areas, ratios = np.asarray(areas), np.asarray(ratios)
    # Area fraction in [0.08, 1] and aspect in [3/4, 4/3], up to rounding of the sides.
    assert areas.min() >= 0.08 * 0.9 and areas.max() <= 1.0
    assert ratios.min() >= 0.75 * 0.9 and ratios.max() <= (4 / 3) * 1.1
    # Uniform area draws: mean near the middle of the range (the largest may be refused).
    assert 0.4 < areas.mean() < 0.6
    # Log-uniform ratios: the log-mean is near 0.
    assert abs(np.log(ratios).mean()) < 0.05


def test_min_crop_scale_bounds_the_crop_area():
    h, w = 375, 500
    areas = []
    for i in range(200):
        seed = tf.constant([11, i], tf.int64)
        top, left, ch, cw = (int(v) for v in preprocess.random_crop_window(h, w, seed, 0.9))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        areas.append(ch * cw / (h * w))
    assert min(areas) >= 0.9 * 0.97 and max(areas) <= 1.0
    assert np.mean(areas) > 0.9


def test_random_crop_falls_back_to_a_centre_crop_for_extreme_aspect_ratios():
    # 10 x 1000: no draw fits, torchvision takes the centre crop with the ratio clamped to 4/3.
    top, left, ch, cw = _window(10, 1000, [0, 3])
    assert (ch, cw) == (10, round(10 * 4 / 3))
    assert top == 0 and left == (1000 - cw) // 2


def test_train_transform_is_a_pure_function_of_its_seed():
    image = tf.constant(_smooth_image(120, 160))
    a = preprocess.train_transform(image, 32, tf.constant([1, 2], tf.int64)).numpy()
    b = preprocess.train_transform(image, 32, tf.constant([1, 2], tf.int64)).numpy()
    c = preprocess.train_transform(image, 32, tf.constant([1, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (32, 32, 3)
    lo = (0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    hi = (1 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    assert np.all(a >= lo - 1e-5) and np.all(a <= hi + 1e-5)


def test_horizontal_flip_happens_about_half_the_time():
    # A left-dark/right-bright image: flipped crops have a brighter left half.
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 255
    flipped = 0
    for i in range(60):
        out = preprocess.train_transform(tf.constant(image), 16, tf.constant([5, i], tf.int64))
        left, right = out[:, :8].numpy().mean(), out[:, 8:].numpy().mean()
        flipped += int(left > right)
    assert 15 <= flipped <= 45, flipped
    assert math.isfinite(flipped)
