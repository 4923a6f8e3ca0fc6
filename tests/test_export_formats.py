"""The student exported to ONNX, LiteRT and SavedModel: parity in each format's own runtime.

The demo's student (`tiny_resnet` on 32-px shapes, random weights: parity is about the graph,
not the training) is exported once per module. The reference is the Keras student fed by the
evaluation pipeline's own transform (`eval_transform`), so the in-graph preprocessing is checked
too. One uint8 image in, `probabilities` and `logits` out.
"""

import json
import subprocess
import sys
from pathlib import Path

import keras_hub
import numpy as np
import pytest
from PIL import Image

from mtkd_jax import export, predict
from mtkd_jax import student as student_lib
from mtkd_jax.data import preprocess, shapes
from mtkd_jax.student import TINY_RESNET

ROOT = Path(__file__).resolve().parents[1]
FLOAT_FORMATS = ("onnx", "litert", "saved_model")
TEACHER_DIM = 64


def demo_classifier(seed: int = 0) -> export.DeployedClassifier:
    """The demo's student shape (tiny_resnet, 32 px) with random weights and text features."""
    rng = np.random.RandomState(seed)
    backbone = keras_hub.models.ResNetBackbone(**{**TINY_RESNET, "image_shape": (32, 32, 3)})
    student = student_lib.backbone_student(backbone, TEACHER_DIM, use_adapter=True)
    text = rng.randn(len(shapes.CLASSNAMES), TEACHER_DIM).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    classifier = export.DeployedClassifier(
        student,
        num_classes=len(shapes.CLASSNAMES),
        embed_dim=TEACHER_DIM,
        logit_scale=float(np.log(100.0)),
        classnames=list(shapes.CLASSNAMES),
        image_size=32,
    )
    classifier.text_features.assign(text)
    return classifier


def keras_logits(classifier, images: np.ndarray) -> np.ndarray:
    """The reference: the Keras student on the evaluation pipeline's transform of `images`."""
    size = classifier.image_size
    batch = np.stack([preprocess.eval_transform(image, size).numpy() for image in images])
    return np.asarray(classifier(batch), np.float64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    classifier = demo_classifier()
    folder = tmp_path_factory.mktemp("exported")
    paths = export.export_formats(classifier, folder, int8=True)
    images, labels, _ = shapes.render_split("test", 48, seed=7)
    return classifier, paths, images, keras_logits(classifier, images)


@pytest.mark.parametrize("kind", FLOAT_FORMATS)
def test_each_format_gives_the_keras_students_logits_in_its_own_runtime(exported, kind):
    classifier, paths, images, reference = exported
    model = export.ExportedClassifier(paths[kind])
    assert model.format == kind
    outputs = model.outputs(images)
    np.testing.assert_allclose(outputs["logits"], reference, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(outputs["logits"].argmax(1), reference.argmax(1))
    softmax = np.exp(reference - reference.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    np.testing.assert_allclose(outputs["probabilities"], softmax, atol=1e-5)
    assert np.ptp(reference.argmax(1)) > 0, "the random student predicts one class only"


@pytest.mark.parametrize("kind", FLOAT_FORMATS)
def test_each_format_takes_any_batch_size_and_carries_its_class_names(exported, kind):
    _, paths, images, reference = exported
    model = export.ExportedClassifier(paths[kind])
    for batch in (1, 5):
        np.testing.assert_allclose(model(images[:batch]), reference[:batch], atol=1e-4, rtol=0)
    assert model.classnames == list(shapes.CLASSNAMES)
    assert model.input_size == (32, 32) and model.image_size == 32


def test_the_metadata_is_readable_without_mtkd_jax(exported):
    """Each format's own metadata slot holds the class names, read with that format's tools."""
    import onnx

    _, paths, _, _ = exported
    props = {p.key: p.value for p in onnx.load(str(paths["onnx"])).metadata_props}
    assert json.loads(props["mtkd_jax"])["classnames"] == list(shapes.CLASSNAMES)
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(paths["litert"].read_bytes(), 0)
    names = [model.Metadata(i).Name().decode() for i in range(model.MetadataLength())]
    assert "mtkd_jax" in names
    saved = json.loads((paths["saved_model"] / "assets.extra" / "mtkd_jax.json").read_text())
    assert saved["classnames"] == list(shapes.CLASSNAMES) and saved["input_size"] == [32, 32]


@pytest.mark.parametrize("kind", ["onnx_int8", "litert_int8"])
def test_int8_files_are_quantized_smaller_and_mostly_agree(exported, kind):
    _, paths, images, reference = exported
    float_kind = kind.removesuffix("_int8")
    assert paths[kind].stat().st_size < 0.4 * paths[float_kind].stat().st_size
    logits = export.ExportedClassifier(paths[kind])(images)
    assert np.abs(logits - reference).max() > 1e-3  # quantization did change something
    assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.75


@pytest.mark.parametrize("kind", FLOAT_FORMATS)
def test_predict_reads_exported_files(exported, kind, tmp_path):
    _, paths, images, reference = exported
    files = []
    for i, image in enumerate(images[:3]):
        files.append(str(tmp_path / f"image{i}.png"))
        Image.fromarray(image).save(files[-1])
    model = export.load_any(paths[kind])
    results = predict.predict(model, files, top_k=2, batch_size=2)
    assert [path for path, _ in results] == files
    for (_, top), row in zip(results, reference[:3], strict=True):
        assert top[0][0] == shapes.CLASSNAMES[int(row.argmax())]
        assert top[0][1] >= top[1][1]


def test_predict_decodes_image_files_as_training_does(tmp_path):
    """predict reads files through mtkd_jax.data.images, as the pipeline does: an EXIF-rotated
    JPEG comes out upright (the same pixels as the upright file), a broken file is named."""
    from mtkd_jax.data import images as images_lib

    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:, :20] = (200, 30, 30)
    stored[:, 20:] = (30, 30, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter right
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    Image.fromarray(np.rot90(stored, k=-1)).save(tmp_path / "upright.jpg", quality=95)
    rotated, upright = predict.load_raw_images(
        [str(tmp_path / "rotated.jpg"), str(tmp_path / "upright.jpg")], (40, 24)
    ).astype(int)
    assert np.abs(rotated - upright).mean() < 4
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(images_lib.BadImageError, match="empty.jpg"):
        predict.load_images([str(tmp_path / "empty.jpg")], 32)


def test_preprocessing_in_the_graph_resizes_and_crops_like_eval_transform():
    """Non-square inputs of other sizes: the same pixels as `eval_transform`, up to a grey level
    where the float resize lands on a rounding boundary."""
    rng = np.random.RandomState(3)
    layer = export.ClipPreprocessing(32)
    step = 1 / 255 / min(preprocess.CLIP_STD)
    for height, width in [(40, 48), (64, 50), (20, 30), (33, 32), (100, 37)]:
        image = rng.randint(0, 256, (height, width, 3)).astype(np.uint8)
        expected = preprocess.eval_transform(image, 32).numpy()
        got = np.asarray(layer(image[None]))[0]
        assert got.shape == expected.shape
        difference = np.abs(got - expected)
        assert difference.max() <= step + 1e-5, (height, width)
        assert np.mean(difference > 1e-4) < 2e-3, (height, width)


@pytest.mark.parametrize("sizes", [(10, 32), (45, 32), (7, 3), (300, 224)])
def test_resize_matrix_is_tensorflows_antialiased_bicubic_resize(sizes):
    in_size, out_size = sizes
    tf = preprocess.tf
    signal = np.random.RandomState(in_size).rand(in_size).astype(np.float64)
    expected = tf.image.resize(
        signal[:, None, None], [out_size, 1], method="bicubic", antialias=True
    ).numpy()[:, 0, 0]
    np.testing.assert_allclose(
        export.resize_matrix(in_size, out_size) @ signal, expected, atol=1e-5
    )


def test_an_export_for_larger_camera_images_resizes_inside_the_graph(tmp_path):
    classifier = demo_classifier(seed=1)
    paths = export.export_formats(classifier, tmp_path, formats=("litert",), input_size=(40, 48))
    model = export.ExportedClassifier(paths["litert"])
    assert model.input_size == (40, 48)
    images = np.random.RandomState(5).randint(0, 256, (6, 40, 48, 3)).astype(np.uint8)
    reference = keras_logits(classifier, images)
    logits = model(images)
    np.testing.assert_array_equal(logits.argmax(1), reference.argmax(1))
    np.testing.assert_allclose(logits, reference, atol=0.05)
    with pytest.raises(ValueError, match=r"uint8 images \[batch, 40, 48, 3\]"):
        model(images[:, :32, :32])


def test_input_size_is_height_width_or_one_side():
    assert export._parse_input_size(None, 32) == (32, 32)
    assert export._parse_input_size(["48"], 32) == (48, 48)
    assert export._parse_input_size(("40", "48"), 32) == (40, 48)
    with pytest.raises(ValueError, match="input_size must be a positive"):
        export._parse_input_size((40, 48, 3), 32)


def test_bad_requests_get_one_clear_message(tmp_path):
    with pytest.raises(ValueError, match="Valid formats: onnx, litert, saved_model"):
        export.export_formats(demo_classifier(), tmp_path, formats=("tflite",))
    with pytest.raises(FileNotFoundError, match="expected a .keras or .onnx"):
        export.ExportedClassifier(tmp_path / "missing.tflite")


@pytest.mark.slow  # three fresh interpreters (JAX + TF imports): ~40-70 s on 2 busy cores
def test_the_export_and_predict_commands(tmp_path):
    keras_file = export.export_classifier(
        demo_classifier().student, np.eye(len(shapes.CLASSNAMES), TEACHER_DIM, dtype=np.float32),
        float(np.log(100.0)), list(shapes.CLASSNAMES), 32, tmp_path / "student.keras",
    )  # fmt: skip
    command = [sys.executable, "-m", "mtkd_jax.export", f"--model={keras_file}",
               "--formats=litert"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "student.tflite").is_file()
    image, _, _ = shapes.render_split("test", 1, seed=2)
    Image.fromarray(image[0]).save(tmp_path / "a.png")
    command = [sys.executable, "-m", "mtkd_jax.predict", f"--model={tmp_path / 'student.tflite'}",
               "--top_k=2", str(tmp_path / "a.png")]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(line.split(": ", 1)[1].split(", ")) == 2
    bad = subprocess.run(
        [sys.executable, "-m", "mtkd_jax.export", f"--model={keras_file}", "--formats=tflite"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "Valid formats" in bad.stderr
