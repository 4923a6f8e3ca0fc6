"""Image files of a dataset folder, checked and made decodable by TensorFlow as correct RGB.

`encoded_rgb(path)` returns bytes that `tf.io.decode_image(..., channels=3)` decodes into the
image's RGB pixels, upright:

- JPEG (RGB or grayscale), PNG (8-bit RGB, RGBA, gray, palette), BMP and GIF whose EXIF
  orientation (if any) is "upright" are passed through as they are, and TensorFlow decodes them
  in parallel; an alpha channel is dropped as PIL's `convert("RGB")` (the CoOp reference's
  `read_image`) drops it;
- everything else is decoded here with PIL and handed on as a PNG: CMYK/YCCK JPEGs (converted
  by PIL, Adobe inversion included), 16-bit PNGs (scaled to 8 bits: `round(v / 257)`), images
  with an EXIF orientation (rotated/flipped upright, as a camera viewer shows them), and the
  formats TensorFlow does not read (TIFF, WebP, ...).

A file that is not a usable image raises `BadImageError` naming it and why: empty (0 bytes), not
an image (e.g. text named `.jpg`), truncated or corrupt, or above `MAX_PIXELS` (a decompression
bomb guard; PIL's own default limit). Whether a run stops on it (the default) or skips it is
the data pipeline's `strict` setting (`--strict_data`); skipped files are recorded with
`record_skipped` and listed in the log and in `results.json`.

This module imports neither TensorFlow nor Keras.
"""

import io
import logging
import threading

import numpy as np

from mtkd_jax.errors import BadImageError

logger = logging.getLogger(__name__)

MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3
_EXIF_ORIENTATION = 0x0112
_FAST_MODES = {
    "JPEG": ("RGB", "L"),
    "PNG": ("RGB", "RGBA", "L", "LA", "P"),
    "BMP": ("RGB",),
    "GIF": ("P", "L", "RGB"),
}
_WHAT_TO_DO = (
    "Replace or delete the file, or pass --nostrict_data to skip unreadable images (they are "
    "then listed in the log and in results.json)."
)

_skipped: dict[str, str] = {}
_lock = threading.Lock()


def bad_image(path: str, reason: str) -> BadImageError:
    return BadImageError(str(path), reason, _WHAT_TO_DO)


def record_skipped(path: str, reason: str) -> None:
    """Notes an image left out of the run (listed in the log and in results.json)."""
    with _lock:
        _skipped.setdefault(str(path), reason)


def skipped_images() -> dict[str, str]:
    """`{path: reason}` of every image skipped in this process since `reset_skipped()`."""
    with _lock:
        return dict(sorted(_skipped.items()))


def reset_skipped() -> None:
    with _lock:
        _skipped.clear()


def _complete(data: bytes, image_format: str) -> bool:
    """Cheap check that the file is not cut short (where TensorFlow would fail or guess)."""
    tail = data.rstrip(b"\0")[-16:]
    if image_format == "JPEG":
        return tail.endswith(b"\xff\xd9")
    if image_format == "PNG":
        return b"IEND" in tail
    return True


def _to_rgb(image) -> "np.ndarray":
    """A loaded PIL image -> uint8 `[H, W, 3]`, 16-bit and float images scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def encoded_rgb(path: str, *, max_pixels: int | None = None) -> bytes:
    """Bytes of `path` that TensorFlow decodes into its upright RGB pixels (see the module).

    Raises:
        BadImageError: the file is empty, not an image, truncated, corrupt or too large.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise bad_image(path, f"it cannot be read ({error.strerror or error})") from None
    if not data:
        raise bad_image(path, "the file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        start = data[:16]
        raise bad_image(path, f"it is not an image file (it starts with {start!r})") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise bad_image(path, f"its header cannot be read ({error})") from None
    with image:
        width, height = image.size
        if width * height > limit:
            raise bad_image(
                path,
                f"{width}x{height} is {width * height:,} pixels, above the limit of {limit:,} "
                "(a guard against decompression bombs); downscale it",
            )
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
            orientation = 1
        fast_modes = _FAST_MODES.get(image.format, ())
        if image.mode in fast_modes and orientation in (0, 1) and _complete(data, image.format):
            return data
        try:
            image.load()
            upright = ImageOps.exif_transpose(image) if orientation not in (0, 1) else image
            pixels = _to_rgb(upright)
        except Image.DecompressionBombError as error:
            raise bad_image(path, f"it is too large ({error})") from None
        except (OSError, ValueError, SyntaxError) as error:
            raise bad_image(path, f"it is truncated or corrupt ({error})") from None
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
