"""Classify image files with an exported student: no teacher, no text encoder.

    python -m mtkd_jax.predict --model=runs/shapes_4shot_seed1/student.keras a.png b.jpg

Prints the top-k classes of every image with their probabilities. `--model` is the `.keras`
file, or one written by `python -m mtkd_jax.export` (`.onnx`, `.tflite`, a `.saved_model`
folder), run in its own runtime. For a `.keras` file, images get CLIP's evaluation transform
(`mtkd_jax.data.preprocess.eval_transform`), the one evaluation uses; an exported file does that
transform in its graph, so images are only fitted to its fixed input size (`fit_to_size`).
"""

import sys

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined only when it runs as a command: importing this module (a
    notebook, `mtkd_jax.export`, a test beside `mtkd_jax.main`) adds none to absl's global
    flags, so its `--batch_size` never meets the driver's."""
    flags.DEFINE_string(
        "model",
        None,
        "The exported student: <workdir>/student.keras, or a .onnx, .tflite or .saved_model "
        "written by python -m mtkd_jax.export.",
    )
    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")


def decode_images(paths: list[str]):
    """Each image file as upright RGB uint8 `[h, w, 3]` (a TensorFlow tensor), decoded as the
    training pipeline decodes (`mtkd_jax.data.images`: EXIF orientation, CMYK, 16-bit); an
    unusable file raises `BadImageError` naming it."""
    from mtkd_jax.data import images, preprocess

    for path in paths:
        yield preprocess.decode_rgb(images.encoded_rgb(path))


def load_images(paths: list[str], image_size: int) -> np.ndarray:
    """Reads and transforms image files: float32 `[N, image_size, image_size, 3]`."""
    from mtkd_jax.data import preprocess

    return np.stack(
        [preprocess.eval_transform(image, image_size).numpy() for image in decode_images(paths)]
    )


def fit_to_size(image, height: int, width: int) -> np.ndarray:
    """uint8 `[h, w, 3]` -> uint8 `[height, width, 3]`: the image unchanged if it has that size,
    else resized (bicubic, antialiased) to cover it and centre-cropped, keeping its aspect."""
    from mtkd_jax.data import preprocess

    h, w = int(image.shape[0]), int(image.shape[1])
    if (h, w) == (height, width):
        return np.asarray(image, np.uint8)
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    resized = preprocess.resize_bicubic(image, new_h, new_w)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[top : top + height, left : left + width].numpy().astype(np.uint8)


def load_raw_images(paths: list[str], input_size: tuple[int, int]) -> np.ndarray:
    """Reads image files for an exported graph: uint8 `[N, height, width, 3]`."""
    return np.stack([fit_to_size(image, *input_size) for image in decode_images(paths)])


def predict(model, paths: list[str], *, top_k: int = 5, batch_size: int = 32):
    """`[(path, [(classname, probability), ...]), ...]`: the top-k classes of each image."""
    top_k = min(top_k, model.num_classes)
    predictions = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        if hasattr(model, "input_size"):  # an ExportedClassifier: preprocessing in its graph
            images = load_raw_images(chunk, model.input_size)
        else:
            images = load_images(chunk, model.image_size)
        logits = np.asarray(model(images), np.float64)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        for path, row in zip(chunk, probabilities, strict=True):
            best = np.argsort(-row)[:top_k]
            predictions.append((path, [(model.classnames[i], float(row[i])) for i in best]))
    return predictions


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not FLAGS.model or not paths:
        raise app.UsageError(
            "Usage: python -m mtkd_jax.predict --model=FILE(.keras|.onnx|.tflite|.saved_model) "
            "IMAGE..."
        )
    from mtkd_jax.export import load_any

    try:
        model = load_any(FLAGS.model)
        results = predict(model, paths, top_k=FLAGS.top_k, batch_size=FLAGS.batch_size)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for path, top in results:
        shown = ", ".join(f"{name} {100 * p:.1f}%" for name, p in top)
        print(f"{path}: {shown}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
