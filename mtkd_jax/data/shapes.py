"""The shapes world: a procedurally generated image-caption dataset for the offline demo.

Each image shows one coloured geometric shape (the class is "<colour> <shape>", e.g. "red
triangle") at a random size, position and rotation, on a tinted, noisy background with faint
distractor strokes and shapes in other colours. Every image comes with a caption such as
"a photo of a small red triangle.".

The classes are ordered for base-to-novel evaluation: the first half of the label ids (base)
and the second half (novel) split the shape x colour grid along its diagonals, so each half
holds every shape and every colour, and the novel classes are unseen combinations of seen
shapes and colours.

Rendering uses numpy and PIL only. Everything is deterministic in its arguments on any
machine: random streams are derived from the split name with `zlib.crc32` (never `hash()`),
the seed and the image index, so the train, val, test and caption-corpus streams never share
an image.
"""

import math
import zlib

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]

# Nominal RGB of each colour; every image jitters it slightly.
COLOUR_RGB = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 225),
    "yellow": (235, 215, 35),
    "purple": (140, 45, 185),
    "orange": (245, 135, 20),
}

SIZES = ["small", "medium", "large"]
# Circumradius of the shape as a fraction of the image side, per size word.
SIZE_RADIUS = {"small": (0.15, 0.20), "medium": (0.21, 0.27), "large": (0.28, 0.36)}


def _class_order() -> list[tuple[int, int]]:
    """(shape index, colour index) per label: base cells first, then novel cells.

    Shape s is base with colours s, s+1, s+2 (mod 6) and novel with the other three, so each
    half holds every shape and every colour three times, in a different set per shape.
    """
    cells = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
    base = [(s, c) for s, c in cells if (c - s) % len(COLOURS) < len(COLOURS) // 2]
    novel = [(s, c) for s, c in cells if (c - s) % len(COLOURS) >= len(COLOURS) // 2]
    return base + novel


CLASS_CELLS = _class_order()
CLASSNAMES = [f"{COLOURS[c]} {SHAPES[s]}" for s, c in CLASS_CELLS]
NUM_BASE_CLASSES = math.ceil(len(CLASSNAMES) / 2)

TEMPLATES = ["a photo of a {}."]

# Caption templates of the pretraining corpus: several phrasings so that the text encoder
# learns the words, not one sentence; `{}` is "[size ]colour shape".
CORPUS_TEMPLATES = [
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a picture showing a {}.",
    "a {} on a noisy background.",
]

default_split_sizes = {
    "train": 100 * len(CLASSNAMES),
    "val": 10 * len(CLASSNAMES),
    "test": 25 * len(CLASSNAMES),
}

_SUPERSAMPLE = 4


def _stream_rng(stream: str, seed: int, index: int) -> np.random.Generator:
    """The random generator of image `index` of a stream; stable across machines and runs."""
    return np.random.default_rng([zlib.crc32(stream.encode("utf-8")), int(seed), int(index)])


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Vertices of `shape` (not a circle) of circumradius `r` centred at (cx, cy), rotated."""
    if shape == "square":
        radii, angles = [r] * 4, [math.pi / 4 + k * math.pi / 2 for k in range(4)]
    elif shape == "triangle":
        radii, angles = [r] * 3, [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
    elif shape == "hexagon":
        radii, angles = [r] * 6, [k * math.pi / 3 for k in range(6)]
    elif shape == "star":
        radii = [r if k % 2 == 0 else 0.42 * r for k in range(10)]
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    elif shape == "cross":
        h = 0.34  # half-width of an arm, relative to the arm length
        pts = [(h, 1), (h, h), (1, h), (1, -h), (h, -h), (h, -1)]
        pts += [(-h, -1), (-h, -h), (-1, -h), (-1, h), (-h, h), (-h, 1)]
        # Scaled so that the arm tips' corners lie on the circumradius.
        radii = [r * math.hypot(x, y) / math.hypot(1, h) for x, y in pts]
        angles = [math.atan2(y, x) for x, y in pts]
    else:
        raise ValueError(f"Unknown shape. Valid shapes: {SHAPES}. Received: shape={shape!r}")
    return [
        (cx + rad * math.cos(a + angle), cy + rad * math.sin(a + angle))
        for rad, a in zip(radii, angles, strict=True)
    ]


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def _to_rgb(values) -> tuple[int, int, int]:
    return tuple(min(255, max(0, round(float(v)))) for v in values)


def _jitter(rgb, rng: np.random.Generator, amount: float) -> tuple[int, int, int]:
    return _to_rgb(np.asarray(rgb) + rng.uniform(-amount, amount, size=3))


def _blend(colour, background, alpha: float) -> tuple[int, int, int]:
    return _to_rgb(alpha * c + (1 - alpha) * b for c, b in zip(colour, background, strict=True))


def _render_one(label: int, rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, str]:
    """One image [image_size, image_size, 3] uint8 of class `label` and the phrase describing it."""
    shape_index, colour_index = CLASS_CELLS[label]
    shape, colour = SHAPES[shape_index], COLOURS[colour_index]
    side = image_size * _SUPERSAMPLE

    # Background: a low-saturation tint (a linear gradient is added after downsampling).
    grey = rng.uniform(40, 215)
    tint = tuple(int(v) for v in np.clip(np.round(grey + rng.uniform(-25, 25, size=3)), 0, 255))
    image = Image.new("RGB", (side, side), tint)
    draw = ImageDraw.Draw(image)

    # Distractors: faint strokes and small shapes in the other colours, at low contrast.
    others = [c for c in COLOURS if c != colour]
    for _ in range(int(rng.integers(2, 6))):
        other = COLOUR_RGB[others[int(rng.integers(len(others)))]]
        fill = _blend(other, tint, rng.uniform(0.15, 0.35))
        if rng.random() < 0.5:
            x0, y0, x1, y1 = rng.uniform(0, side, size=4)
            width = int(rng.integers(1, 3)) * _SUPERSAMPLE
            draw.line([(x0, y0), (x1, y1)], fill=fill, width=width)
        else:
            r = rng.uniform(0.05, 0.11) * side
            cx, cy = rng.uniform(r, side - r, size=2)
            distractor = SHAPES[int(rng.integers(len(SHAPES)))]
            _draw_shape(draw, distractor, cx, cy, r, rng.uniform(0, 2 * math.pi), fill)

    # The object itself.
    size = SIZES[int(rng.integers(len(SIZES)))]
    r = rng.uniform(*SIZE_RADIUS[size]) * side
    cx, cy = rng.uniform(r, side - r, size=2)
    fill = _jitter(COLOUR_RGB[colour], rng, 18)
    _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), fill)

    small = image.reduce(_SUPERSAMPLE)  # box filter: antialiased edges
    pixels = np.asarray(small, np.float32)
    ramp = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
    ramp = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    pixels = pixels + ramp * rng.uniform(-30, 30, size=3).astype(np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(3, 12), size=pixels.shape).astype(np.float32)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8), f"{size} {colour} {shape}"


def _check_args(num_images: int, image_size: int) -> None:
    if int(num_images) < 0:
        raise ValueError(
            f"num_images must be a non-negative integer. Received: num_images={num_images!r}"
        )
    if int(image_size) < 8:
        raise ValueError(
            "image_size must be at least 8 pixels (shapes are unreadable below). "
            f"Received: image_size={image_size!r}"
        )


def _render_stream(
    stream: str, num_images: int, seed: int, image_size: int, templates: list[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    _check_args(num_images, image_size)
    order_rng = _stream_rng(stream + "/labels", seed, num_images)
    labels = order_rng.permutation(np.arange(num_images) % len(CLASSNAMES)).astype(np.int32)
    images = np.empty((num_images, image_size, image_size, 3), np.uint8)
    captions = []
    for i, label in enumerate(labels):
        rng = _stream_rng(stream, seed, i)
        images[i], phrase = _render_one(int(label), rng, image_size)
        if len(templates) > 1:
            # The corpus names the size in two captions out of three.
            if rng.random() < 1 / 3:
                phrase = phrase.split(" ", 1)[1]
            template = templates[int(rng.integers(len(templates)))]
        else:
            template = templates[0]
        captions.append(template.format(phrase))
    return images, labels, captions


def render_split(
    split: str, num_images: int, seed: int, image_size: int = 32
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Renders `num_images` labelled images of one split of the shapes world.

    Labels are balanced (class counts differ by at most one) and shuffled. The result depends
    only on the arguments; different splits and seeds draw from separate random streams.

    Args:
        split: "train", "val" or "test".
        num_images: how many images to render.
        seed: the seed of the split's random stream.
        image_size: the side of the square images in pixels.

    Returns:
        images: uint8 [num_images, image_size, image_size, 3].
        labels: int32 [num_images], indices into `CLASSNAMES`.
        captions: `num_images` strings like "a photo of a small red triangle.".
    """
    if split not in default_split_sizes:
        raise ValueError(
            f"Unknown split. Valid splits: {sorted(default_split_sizes)}. Received: split={split!r}"
        )
    return _render_stream(split, num_images, seed, image_size, TEMPLATES)


def render_caption_corpus(
    num_images: int, seed: int, image_size: int = 32
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Renders an image-caption corpus over all classes, the stand-in for web-scale pretraining.

    The corpus is its own random stream, disjoint from the train/val/test splits, and varies
    the caption's phrasing (see `CORPUS_TEMPLATES`) and whether the size is named.

    Returns:
        images: uint8 [num_images, image_size, image_size, 3].
        labels: int32 [num_images], indices into `CLASSNAMES`.
        captions: `num_images` strings, e.g. "an image of a large blue star.".
    """
    return _render_stream("corpus", num_images, seed, image_size, CORPUS_TEMPLATES)


def contact_sheet(images: np.ndarray, columns: int = 6, scale: int = 4) -> Image.Image:
    """A grid [rows * H * scale, columns * W * scale] of `images` [N, H, W, 3], for looking at."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    sheet = np.full((rows * (h + 1), columns * (w + 1), 3), 255, np.uint8)
    for i, image in enumerate(images):
        y, x = divmod(i, columns)
        sheet[y * (h + 1) : y * (h + 1) + h, x * (w + 1) : x * (w + 1) + w] = image
    return Image.fromarray(sheet).resize(
        (sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST
    )
