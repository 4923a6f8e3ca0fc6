"""The deployable student: one `.keras` file that classifies images with no teacher, no text.

`DeployedClassifier` wraps the trained student (image encoder + prompts + projector + adapter)
with the teacher's class text features `[classes, dim]` (stored as a frozen weight), its logit
scale and the class names, so that `keras.saving.load_model(path)` alone gives
`images [batch, H, W, 3] (CLIP-normalised) -> logits [batch, classes]`. Saved atomically.
"""

import json
import os
from pathlib import Path

import keras
import numpy as np
from keras import ops

import mtkd_jax  # (sets KERAS_BACKEND=jax)
from mtkd_jax import atomic
from mtkd_jax import student as student_lib  # noqa: F401  (registers the student's layers)


@keras.saving.register_keras_serializable(package="mtkd_jax")
class DeployedClassifier(keras.Model):
    """Student features against fixed class text features: images -> logits `[batch, classes]`.

    Args:
      student: the trained `mtkd_jax.student.Student`.
      num_classes, embed_dim: the shape of the text features.
      logit_scale: CLIP's log temperature (logits are `exp(scale) · cos`).
      classnames: the class names, index = label id.
      image_size: the input resolution the student was trained at.
    """

    def __init__(
        self,
        student,
        num_classes: int,
        embed_dim: int,
        logit_scale: float,
        classnames: list[str],
        image_size: int,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(classnames) != num_classes:
            raise ValueError(
                f"classnames must name each of the {num_classes} classes. "
                f"Received {len(classnames)} names."
            )
        self.student = student
        self.num_classes, self.embed_dim = int(num_classes), int(embed_dim)
        self.logit_scale = float(logit_scale)
        self.classnames = list(classnames)
        self.image_size = int(image_size)
        self.text_features = self.add_weight(
            shape=(self.num_classes, self.embed_dim),
            initializer="zeros",
            trainable=False,
            name="text_features",
        )
        self.built = True

    def call(self, images):
        features = self.student(images, training=False)
        features = features / ops.norm(features, axis=-1, keepdims=True)
        text = ops.cast(self.text_features, features.dtype)
        return float(np.exp(self.logit_scale)) * ops.matmul(features, ops.transpose(text))

    def get_config(self):
        return {
            "student": keras.layers.serialize(self.student),
            "num_classes": self.num_classes,
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "classnames": self.classnames,
            "image_size": self.image_size,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.layers.deserialize(config.pop("student"))
        return cls(**config)


def export_classifier(
    student,
    text_features: np.ndarray,
    logit_scale: float,
    classnames: list[str],
    image_size: int,
    path: str | os.PathLike,
) -> Path:
    """Writes the deployable classifier to `path` (a `.keras` file), atomically.

    Args:
      student: the trained student.
      text_features: `[classes, dim]` normalised class text features of the teacher.
      logit_scale: the teacher's logit scale (log).
      classnames: `[classes]` names.
      image_size: the input resolution.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"The exported model must be a .keras file. Received: {path}")
    text_features = np.asarray(text_features, np.float32)
    model = DeployedClassifier(
        student,
        num_classes=text_features.shape[0],
        embed_dim=text_features.shape[1],
        logit_scale=logit_scale,
        classnames=classnames,
        image_size=image_size,
        name="mtkd_student",
    )
    model.text_features.assign(text_features)
    with atomic.replacing(path, suffix=".keras") as tmp:
        model.save(tmp)
    return path


def load_classifier(path: str | os.PathLike) -> DeployedClassifier:
    """Reads a classifier written by `export_classifier` (Keras safe mode: no code is run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No exported model at {path}. Stage 2 writes <workdir>/student.keras "
            "(python -m mtkd_jax.main --stage=2 ... --export)."
        )
    model = keras.saving.load_model(path, safe_mode=True)
    if not isinstance(model, DeployedClassifier):
        raise ValueError(f"{path} is a Keras model but not an mtkd_jax exported student.")
    return model


# ---------------------------------------------------------------------------------------------
# Deployment formats: ONNX, LiteRT (.tflite) and TF SavedModel.
#
# Each exported file is one self-contained "image -> class probabilities" graph: uint8 RGB
# images `[batch, H, W, 3]` of the export's input size go in, CLIP's evaluation transform
# (`ClipPreprocessing`, the same steps as `mtkd_jax.data.preprocess.eval_transform`) runs inside
# the graph, and `probabilities` and `logits` `[batch, classes]` come out. The batch is dynamic
# in every format; H and W are fixed at export time (`input_size`, default the student's
# resolution) because the resize kernels are built for one size. The class names and the
# sizes travel in the file's own metadata (`METADATA_KEY`, a JSON object).
# ---------------------------------------------------------------------------------------------

METADATA_KEY = "mtkd_jax"
FORMATS = ("onnx", "litert", "saved_model")
OUTPUT_NAMES = ("probabilities", "logits")
SAVED_MODEL_METADATA = "mtkd_jax.json"  # in the SavedModel's assets.extra/


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5, as PIL, TF and JAX's bicubic resize)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out_size, in_size]` weights of a 1-D antialiased bicubic resize (float64).

    The weights of `tf.image.resize(..., "bicubic", antialias=True)` (TF's and JAX's
    `scale_and_translate`): output pixel i samples the input at centre `(i + 0.5) / scale`,
    with the kernel stretched by `1 / scale` when shrinking, and each row normalised to sum 1
    over the input pixels that exist. A 2-D resize is this along H, then along W.
    """
    scale = out_size / in_size
    kernel_scale = max(1.0 / scale, 1.0)
    centres = (np.arange(out_size) + 0.5) / scale
    offsets = (np.arange(in_size)[None, :] + 0.5 - centres[:, None]) / kernel_scale
    weights = _keys_cubic(offsets)
    return weights / weights.sum(axis=1, keepdims=True)


@keras.saving.register_keras_serializable(package="mtkd_jax")
class ClipPreprocessing(keras.layers.Layer):
    """CLIP's evaluation transform on a batch, inside the graph: `[batch, H, W, 3]` in
    [0, 255] (any dtype) -> float32 `[batch, size, size, 3]`, CLIP-normalised.

    The same steps as `eval_transform` for the fixed `H`, `W` of the input: the shorter side
    to `size` by an antialiased bicubic resize rounded like PIL's uint8 output (torchvision's
    `int(size * long / short)` for the longer side), a centre crop, CLIP's mean and std; an
    input already `size` x `size` is only normalised, as in `eval_transform`. Resize and crop
    are two matrix products with `resize_matrix` rows (the crop keeps only the rows it needs),
    so every runtime computes the same thing, with no resize op whose conventions differ.
    """

    def __init__(self, image_size: int, **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size)

    def resize_crop_matrices(self, height: int, width: int):
        """`([size, H], [size, W])` float32, or None when the input is already `size` x `size`."""
        size = self.image_size
        if (height, width) == (size, size):
            return None
        long_side = size * max(height, width) // min(height, width)
        new_h, new_w = (size, long_side) if height <= width else (long_side, size)
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
        rows = np.eye(height) if new_h == height else resize_matrix(height, new_h)
        cols = np.eye(width) if new_w == width else resize_matrix(width, new_w)
        return (
            rows[top : top + size].astype(np.float32),
            cols[left : left + size].astype(np.float32),
        )

    def call(self, images):
        from mtkd_jax.data.registry import CLIP_MEAN, CLIP_STD

        height, width = images.shape[1], images.shape[2]
        if height is None or width is None:
            raise ValueError(
                "ClipPreprocessing needs a fixed image height and width. "
                f"Received: shape={images.shape}"
            )
        x = ops.cast(images, "float32")
        matrices = self.resize_crop_matrices(height, width)
        if matrices is not None:
            rows, cols = matrices
            x = ops.einsum("ih,bhwc->biwc", rows, x)
            x = ops.einsum("jw,biwc->bijc", cols, x)
            x = ops.clip(ops.round(x), 0.0, 255.0)
        mean = np.asarray(CLIP_MEAN, np.float32)
        std = np.asarray(CLIP_STD, np.float32)
        return (x / 255.0 - mean) / std

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size}


def deployment_model(classifier: DeployedClassifier, input_size: tuple[int, int]) -> keras.Model:
    """uint8 images `[batch, H, W, 3]` -> `{"probabilities", "logits"}` `[batch, classes]`."""
    height, width = (int(v) for v in input_size)
    images = keras.Input((height, width, 3), dtype="uint8", name="images")
    logits = classifier(ClipPreprocessing(classifier.image_size, name="preprocess")(images))
    probabilities = ops.softmax(logits, axis=-1)
    return keras.Model(
        images, {"probabilities": probabilities, "logits": logits}, name="mtkd_student_deploy"
    )


def deployment_metadata(classifier: DeployedClassifier, input_size: tuple[int, int]) -> dict:
    """What every exported file carries beside its graph (stored as JSON under METADATA_KEY)."""
    return {
        "model": "mtkd_jax exported student",
        "mtkd_jax_version": mtkd_jax.__version__,
        "classnames": list(classifier.classnames),
        "input": "images: uint8 RGB [batch, height, width, 3]",
        "input_size": [int(v) for v in input_size],
        "image_size": classifier.image_size,
        "outputs": list(OUTPUT_NAMES),
        "logit_scale": classifier.logit_scale,
        "preprocessing": "shorter side to image_size (bicubic, antialiased, rounded), centre "
        "crop, CLIP mean/std: mtkd_jax.export.ClipPreprocessing",
    }


def _parse_input_size(input_size, image_size: int) -> tuple[int, int]:
    if input_size is None:
        return image_size, image_size
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) == 1:  # one side: a square input
        input_size = input_size * 2
    if len(input_size) != 2 or min(input_size) < 1:
        raise ValueError(
            f"input_size must be a positive (height, width) or one int. Received: {input_size}"
        )
    return input_size


def export_onnx(model: keras.Model, metadata: dict, path: str | os.PathLike) -> Path:
    """Writes `model` (from `deployment_model`) as an ONNX file with dynamic batch, atomically.

    Traced from JAX by `jax2onnx` (what `keras.Model.export(format="onnx")` uses on the JAX
    backend); `fix_nhwc_max_pool` then rewrites jax2onnx's 4-D max pooling, which ONNX Runtime
    cannot run, as a 2-D one; the metadata goes in `metadata_props[METADATA_KEY]`.
    """
    import jax
    import onnx
    from jax2onnx import to_onnx

    path = Path(path)
    spec = model.inputs[0]
    forward_dict = _stateless_forward(model)

    def forward(images):
        outputs = forward_dict(images)
        return tuple(outputs[name] for name in OUTPUT_NAMES)

    inputs = [jax.ShapeDtypeStruct(("batch", *spec.shape[1:]), np.dtype(spec.dtype))]
    proto = to_onnx(
        forward,
        inputs=inputs,
        model_name=model.name,
        input_names=["images"],
        output_names=list(OUTPUT_NAMES),
    )
    fix_nhwc_max_pool(proto)
    proto.doc_string = "mtkd_jax exported student: uint8 images -> class probabilities"
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.checker.check_model(proto)
    with atomic.replacing(path, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
    return path


def fix_nhwc_max_pool(proto) -> int:
    """Rewrites jax2onnx's `Unsqueeze-Unsqueeze-MaxPool(4-D window)` over an NHWC tensor as
    `Transpose-MaxPool(2-D)-Transpose`, in place; returns how many it rewrote.

    jax2onnx lowers `lax.reduce_window_max` with window `(1, kh, kw, 1)` (Keras's NHWC max
    pooling) to a MaxPool whose four "spatial" axes are N, H, W, C; ONNX Runtime only pools up
    to 3-D ("Unsupported pooling size"). Pooling over the batch and channel axes with window 1
    and stride 1 is the identity, so the 2-D pooling over H, W in NCHW layout is the same op.
    """
    from onnx import helper

    producers = {out: node for node in proto.graph.node for out in node.output}
    rewritten = 0
    nodes = list(proto.graph.node)
    for node in nodes:
        if node.op_type != "MaxPool":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = list(attrs["kernel_shape"])
        strides = list(attrs.get("strides", [1] * len(kernel)))
        pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
        dilations = list(attrs.get("dilations", [1] * len(kernel)))
        unsqueeze1 = producers.get(node.input[0])
        unsqueeze0 = producers.get(unsqueeze1.input[0]) if unsqueeze1 is not None else None
        if (
            len(kernel) != 4
            or unsqueeze0 is None
            or unsqueeze1.op_type != "Unsqueeze"
            or unsqueeze0.op_type != "Unsqueeze"
            or kernel[0] != 1
            or kernel[3] != 1
            or strides[0] != 1
            or strides[3] != 1
            or pads[0]
            or pads[3]
            or pads[4]
            or pads[7]  # fmt: skip
        ):
            continue
        source, name = unsqueeze0.input[0], node.name
        to_nchw, pooled, to_nhwc = (f"{name}_nchw", f"{name}_pooled", f"{name}_nhwc")
        axes = f"{name}_axes"
        replacement = [
            helper.make_node("Transpose", [source], [to_nchw], perm=[0, 3, 1, 2]),
            helper.make_node(
                "MaxPool",
                [to_nchw],
                [pooled],
                name=name,
                kernel_shape=kernel[1:3],
                strides=strides[1:3],
                pads=[pads[1], pads[2], pads[5], pads[6]],
                dilations=dilations[1:3],
            ),
            helper.make_node("Transpose", [pooled], [to_nhwc], perm=[0, 2, 3, 1]),
            helper.make_node(
                "Constant",
                [],
                [axes],
                value=helper.make_tensor(axes, 7, [2], [0, 1]),
            ),
            helper.make_node("Unsqueeze", [to_nhwc, axes], [node.output[0]]),
        ]
        index = list(proto.graph.node).index(node)
        proto.graph.node.remove(node)
        for offset, new_node in enumerate(replacement):
            proto.graph.node.insert(index + offset, new_node)
        rewritten += 1
    return rewritten


def export_saved_model(model: keras.Model, metadata: dict, path: str | os.PathLike) -> Path:
    """Writes `model` as a TF SavedModel folder (signature `serving_default`, dynamic batch).

    Keras's own `ExportArchive` (JAX backend: `jax2tf`, the graph as StableHLO in an
    `XlaCallModule` op, weights as variables). The metadata is `assets.extra/mtkd_jax.json`,
    the SavedModel's place for files that travel with the model but are not loaded by the
    graph. The folder is written beside `path` and renamed over it.
    """
    import shutil
    import tempfile

    from mtkd_jax.data.tf_setup import import_tensorflow

    import_tensorflow()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda images: model(images, training=False),
        input_signature=[keras.InputSpec(shape=model.inputs[0].shape, dtype="uint8")],
    )
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        archive.write_out(str(staging / "model"), verbose=False)
        extra = staging / "model" / "assets.extra"
        extra.mkdir()
        (extra / SAVED_MODEL_METADATA).write_text(json.dumps(metadata), encoding="utf-8")
        old = None
        if path.exists():
            if not (path / "saved_model.pb").is_file():
                raise FileExistsError(f"{path} exists and is not a SavedModel; not replacing it.")
            old = staging / "old"
            os.replace(path, old)
        os.replace(staging / "model", path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _stateless_forward(model: keras.Model):
    """`images -> {name: output}` with the weights of `model` closed over as constants."""
    values = [v.value for v in model.variables]

    def forward(images):
        mapping = list(zip(model.variables, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            outputs = model(images, training=False)
        return {name: outputs[name] for name in OUTPUT_NAMES}

    return forward


def export_litert(
    model: keras.Model, metadata: dict, path: str | os.PathLike, *, int8: bool = False
) -> Path:
    """Writes `model` as a LiteRT `.tflite` file (signature `serving_default`, input `images`
    with a dynamic batch `[-1, H, W, 3]`), atomically.

    `jax2tf` turns the forward pass, weights as constants, into a TF function (StableHLO in an
    `XlaCallModule` op); TensorFlow's LiteRT converter lowers that to LiteRT builtins, folding
    the batch norms. Weights must be constants, not variables, or the converter can neither fold
    nor quantize them (Keras's `ExportArchive` keeps them as variables). `int8=True` applies
    dynamic-range quantization (int8 weights, activations quantized on the fly). The metadata
    goes in the flatbuffer's `metadata` table under METADATA_KEY (`read_litert_metadata`).
    """
    import shutil
    import tempfile

    from jax.experimental import jax2tf

    from mtkd_jax.data.tf_setup import import_tensorflow

    tf = import_tensorflow()
    path = Path(path)
    height, width = model.inputs[0].shape[1:3]
    converted = jax2tf.convert(
        _stateless_forward(model), polymorphic_shapes=[f"(b, {height}, {width}, 3)"]
    )
    spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")
    module = tf.Module()
    module.serve = tf.function(
        lambda images: converted(images), input_signature=[spec], autograph=False
    )
    scratch = tempfile.mkdtemp(prefix="mtkd_litert.")
    try:
        tf.saved_model.save(module, scratch, signatures={"serving_default": module.serve})
        converter = tf.lite.TFLiteConverter.from_saved_model(scratch)
        if int8:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        flatbuffer = converter.convert()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    flatbuffer = _with_litert_metadata(flatbuffer, json.dumps(metadata).encode())
    with atomic.replacing(path, suffix=".tflite") as tmp:
        tmp.write_bytes(flatbuffer)
    return path


def _with_litert_metadata(flatbuffer: bytes, payload: bytes) -> bytes:
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(payload, np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_KEY
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_litert_metadata(flatbuffer: bytes) -> dict:
    """The METADATA_KEY JSON of a `.tflite` file written by `export_litert`."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == METADATA_KEY:
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    raise ValueError("This .tflite file has no mtkd_jax metadata: it was not exported by mtkd_jax.")


def quantize_onnx(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """int8 dynamic quantization of an exported ONNX file (weights int8, activations quantized
    per batch at run time; ONNX Runtime's `quant_pre_process` then `quantize_dynamic`), the
    metadata kept; written atomically."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    path = Path(path)
    with (
        tempfile.TemporaryDirectory(prefix="mtkd_quantize.") as scratch,
        atomic.replacing(path, suffix=".onnx") as tmp,
    ):
        # Folds constants first (jax2onnx feeds weights through Transpose nodes, which the
        # quantizer would otherwise leave in float).
        folded = str(Path(scratch) / "folded.onnx")
        quant_pre_process(str(source), folded, skip_symbolic_shape=True)
        quantize_dynamic(folded, str(tmp), weight_type=QuantType.QInt8)
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        proto.metadata_props.extend(onnx.load(str(source), load_external_data=False).metadata_props)
        onnx.save(proto, str(tmp))
    return path


def export_formats(
    classifier: DeployedClassifier,
    output_dir: str | os.PathLike,
    *,
    formats=FORMATS,
    input_size=None,
    int8: bool = False,
    stem: str = "student",
) -> dict[str, Path]:
    """Exports `classifier` to each of `formats` in `output_dir`; returns `{format: path}`.

    Files: `<stem>.onnx`, `<stem>.tflite`, `<stem>.saved_model/`, and with `int8=True` also
    `<stem>.int8.onnx` and `<stem>.int8.tflite` (formats `onnx_int8`, `litert_int8`).
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"Unknown export formats {unknown}. Valid formats: {', '.join(FORMATS)}.")
    output_dir = Path(output_dir)
    size = _parse_input_size(input_size, classifier.image_size)
    model = deployment_model(classifier, size)
    metadata = deployment_metadata(classifier, size)
    paths = {}
    if "onnx" in formats:
        paths["onnx"] = export_onnx(model, metadata, output_dir / f"{stem}.onnx")
        if int8:
            paths["onnx_int8"] = quantize_onnx(paths["onnx"], output_dir / f"{stem}.int8.onnx")
    if "saved_model" in formats:
        paths["saved_model"] = export_saved_model(
            model, metadata, output_dir / f"{stem}.saved_model"
        )
    if "litert" in formats:
        paths["litert"] = export_litert(model, metadata, output_dir / f"{stem}.tflite")
        if int8:
            paths["litert_int8"] = export_litert(
                model, metadata, output_dir / f"{stem}.int8.tflite", int8=True
            )
    return paths


class ExportedClassifier:
    """An exported file (`.onnx`, `.tflite` or a SavedModel folder) run in its own runtime.

    `model(images)`: uint8 `[batch, H, W, 3]` at `input_size` -> float32 logits
    `[batch, classes]` (`model.probabilities(images)` for the softmax output). ONNX runs in
    `onnxruntime`, LiteRT in the LiteRT interpreter (`ai_edge_litert`), the SavedModel in
    TensorFlow. `classnames`, `input_size` and `image_size` come from the file's metadata.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir() and (self.path / "saved_model.pb").is_file():
            self.format = "saved_model"
            from mtkd_jax.data.tf_setup import import_tensorflow

            self._tf = import_tensorflow()
            loaded = self._tf.saved_model.load(str(self.path))
            self._loaded = loaded
            self._serve = loaded.signatures["serving_default"]
            metadata = self.path / "assets.extra" / SAVED_MODEL_METADATA
            if not metadata.is_file():
                raise ValueError(f"{self.path} has no {metadata.name}: not exported by mtkd_jax.")
            self.metadata = json.loads(metadata.read_text(encoding="utf-8"))
        elif self.path.suffix == ".onnx" and self.path.is_file():
            import onnx
            import onnxruntime

            self.format = "onnx"
            props = {p.key: p.value for p in onnx.load(str(self.path)).metadata_props}
            if METADATA_KEY not in props:
                raise ValueError(f"{self.path} has no mtkd_jax metadata: not exported by mtkd_jax.")
            self.metadata = json.loads(props[METADATA_KEY])
            self._session = onnxruntime.InferenceSession(
                str(self.path), providers=["CPUExecutionProvider"]
            )
        elif self.path.suffix == ".tflite" and self.path.is_file():
            from ai_edge_litert.interpreter import Interpreter

            self.format = "litert"
            flatbuffer = self.path.read_bytes()
            self.metadata = read_litert_metadata(flatbuffer)
            self._interpreter = Interpreter(model_content=flatbuffer)
            self._runner = self._interpreter.get_signature_runner()
        else:
            raise FileNotFoundError(
                f"No exported model at {self.path}: expected a .keras or .onnx or .tflite file "
                "or a SavedModel folder (python -m mtkd_jax.export --model=student.keras)."
            )
        self.classnames = list(self.metadata["classnames"])
        self.num_classes = len(self.classnames)
        self.input_size = tuple(self.metadata["input_size"])
        self.image_size = int(self.metadata["image_size"])

    def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 `[batch, H, W, 3]` -> `{"probabilities", "logits"}` `[batch, classes]`."""
        images = np.asarray(images)
        expected = (*self.input_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
            raise ValueError(
                f"{self.path.name} takes uint8 images [batch, {expected[0]}, {expected[1]}, 3]. "
                f"Received: {images.dtype} {images.shape}"
            )
        if self.format == "onnx":
            values = self._session.run(list(OUTPUT_NAMES), {"images": images})
            return dict(zip(OUTPUT_NAMES, values, strict=True))
        if self.format == "litert":
            return {k: np.asarray(v) for k, v in self._runner(images=images).items()}
        return {k: v.numpy() for k, v in self._serve(images=self._tf.constant(images)).items()}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.outputs(images)["logits"]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.outputs(images)["probabilities"]


def load_any(path: str | os.PathLike):
    """A `.keras` file -> `DeployedClassifier`; `.onnx`, `.tflite`, a SavedModel folder ->
    `ExportedClassifier`."""
    if Path(path).suffix == ".keras":
        return load_classifier(path)
    return ExportedClassifier(path)


def main(argv: list[str]) -> None:
    from absl import app, flags

    del argv
    args = flags.FLAGS
    if not args.model:
        raise app.UsageError(
            "Usage: python -m mtkd_jax.export --model=<workdir>/student.keras "
            "[--formats=onnx,litert,saved_model] [--int8] [--input_size=H,W]"
        )
    try:
        classifier = load_classifier(args.model)
        input_size = tuple(int(v) for v in args.input_size) if args.input_size else None
        output_dir = Path(args.output_dir or Path(args.model).parent)
        paths = export_formats(
            classifier,
            output_dir,
            formats=tuple(args.formats),
            input_size=input_size,
            int8=args.int8,
            stem=Path(args.model).stem,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        import sys

        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for kind, path in paths.items():
        print(f"[export] {kind}: {path}")
    print(f"Predict with: python -m mtkd_jax.predict --model={next(iter(paths.values()))} IMAGE...")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string(
        "model", None, "The exported student (.keras), e.g. <workdir>/student.keras."
    )
    flags.DEFINE_list("formats", list(FORMATS), f"Formats to write, any of: {', '.join(FORMATS)}.")
    flags.DEFINE_string("output_dir", None, "Where the files go. Default: the folder of --model.")
    flags.DEFINE_list(
        "input_size",
        None,
        "Height,width (or one side, square) of the images the exported graph takes (it resizes "
        "and centre-crops them "
        "to the student's resolution inside). Default: the student's resolution.",
    )
    flags.DEFINE_bool(
        "int8", False, "Also write int8 dynamic-range quantized .int8.onnx and .int8.tflite files."
    )


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
