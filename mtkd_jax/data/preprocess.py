"""CLIP's image transforms as TensorFlow ops on one image (used inside `tf.data` maps).

Evaluation (as CLIP's `preprocess`): resize the shorter side to `size` with bicubic
interpolation (torchvision's rule: the longer side becomes int(size * long / short)), centre
crop `size` x `size` (top/left = round((extent - size) / 2)), scale to [0, 1], normalise with
CLIP's mean and std. Training (as CoOp / PromptKD): torchvision's RandomResizedCrop (area scale
0.08-1, aspect ratio 3/4-4/3, ten tries then a centre crop), bicubic resize to `size`, random
horizontal flip, the same normalisation. Resizes antialias and round to integers like PIL's
uint8 output, so the result stays close to the PyTorch pipelines.

Randomness is stateless: each image gets its own seed `[2]`, so augmentation does not depend on
thread scheduling, only on (pipeline seed, position in the sample stream).
"""

import math

from mtkd_jax.data.registry import CLIP_MEAN, CLIP_STD
from mtkd_jax.data.tf_setup import import_tensorflow

tf = import_tensorflow()

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_ATTEMPTS = 10


def decode_rgb(encoded):
    """Encoded JPEG/PNG/BMP/GIF bytes (scalar string) -> uint8 `[H, W, 3]` (first GIF frame)."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def resize_bicubic(image, height, width):
    """Bicubic, antialiased resize of `[H, W, 3]` to float32 `[height, width, 3]` in [0, 255],
    rounded like PIL's uint8 output; returns the image unchanged (as float) if already that size."""
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)

    def resize():
        out = tf.image.resize(image, [height, width], method="bicubic", antialias=True)
        return tf.clip_by_value(tf.round(out), 0.0, 255.0)

    same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
    return tf.cond(same, lambda: image, resize)


def normalize(image):
    """`[H, W, 3]` in [0, 255] -> float32 normalised with CLIP's mean and std."""
    mean = tf.constant(CLIP_MEAN, tf.float32)
    std = tf.constant(CLIP_STD, tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def eval_transform(image, size: int):
    """uint8 `[H, W, 3]` -> float32 `[size, size, 3]`: shorter side to `size`, centre crop,
    normalise."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short = tf.minimum(h, w)
    # torchvision's int(size * long / short), exactly, in integers.
    long_side = (size * tf.maximum(h, w)) // short
    new_h = tf.where(h <= w, size, long_side)
    new_w = tf.where(h <= w, long_side, size)
    resized = resize_bicubic(image, new_h, new_w)
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
    cropped = resized[top : top + size, left : left + size]
    return normalize(tf.ensure_shape(cropped, [size, size, 3]))


def random_crop_window(height, width, seed, min_scale: float = CROP_SCALE[0]):
    """torchvision RandomResizedCrop's window (top, left, crop_h, crop_w), int32 scalars.

    Ten draws of (area fraction in [min_scale, 1], log-uniform aspect ratio in CROP_RATIO); the
    first that fits is used, placed uniformly; if none fits, a centre crop with the ratio clamped.
    """
    u = tf.random.stateless_uniform([4, _ATTEMPTS], seed=seed, dtype=tf.float64)
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    area = h * w
    target = area * (min_scale + (CROP_SCALE[1] - min_scale) * u[0])
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
    cw = tf.round(tf.sqrt(target * aspect))
    ch = tf.round(tf.sqrt(target / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    ch_try, cw_try = ch[first], cw[first]
    top_try = tf.floor(u[2, first] * (h - ch_try + 1))
    left_try = tf.floor(u[3, first] * (w - cw_try + 1))

    in_ratio = w / h
    cw_fb = tf.where(
        in_ratio < CROP_RATIO[0],
        w,
        tf.where(in_ratio > CROP_RATIO[1], tf.round(h * CROP_RATIO[1]), w),
    )
    ch_fb = tf.where(in_ratio < CROP_RATIO[0], tf.round(w / CROP_RATIO[0]), h)
    top_fb = tf.floor((h - ch_fb) / 2)
    left_fb = tf.floor((w - cw_fb) / 2)

    ok = tf.reduce_any(fits)
    window = tf.where(
        ok,
        tf.stack([top_try, left_try, ch_try, cw_try]),
        tf.stack([top_fb, left_fb, ch_fb, cw_fb]),
    )
    return tuple(tf.unstack(tf.cast(window, tf.int32)))


def train_transform(image, size: int, seed, min_scale: float = CROP_SCALE[0]):
    """uint8 `[H, W, 3]` -> float32 `[size, size, 3]`: random resized crop, flip, normalise.

    Args:
      seed: int64 `[2]`, the stateless seed of this image.
      min_scale: the smallest crop area, as a fraction of the image (torchvision's 0.08).
    """
    shape = tf.shape(image)
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    top, left, ch, cw = random_crop_window(shape[0], shape[1], seeds[0], min_scale)
    crop = image[top : top + ch, left : left + cw]
    out = resize_bicubic(crop, size, size)
    flip = tf.random.stateless_uniform([], seed=seeds[1]) < 0.5
    out = tf.cond(flip, lambda: tf.reverse(out, axis=[1]), lambda: out)
    return normalize(tf.ensure_shape(out, [size, size, 3]))
