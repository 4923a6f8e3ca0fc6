"""Writes the three notebooks of this folder from the cell sources below, without outputs.

The notebooks are generated so that their code stays reviewable as plain Python: edit the cells
here, then run

    .venv/bin/python notebooks/make_notebooks.py

`tests/test_notebooks.py` checks that the committed `.ipynb` files equal what this script writes,
and executes each of them top to bottom with the smoke settings (see docs/notebooks.md).

Each notebook has exactly one cell tagged `parameters` (papermill's convention). A runner that
wants other values inserts a cell right after it that assigns them, as `papermill -p smoke True`
does; CI inserts `smoke = True`, and the cell after the parameters cell turns that switch into
tiny settings.
"""

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def markdown(text: str) -> tuple[str, str]:
    return ("markdown", text.strip("\n"))


def code(text: str) -> tuple[str, str]:
    return ("code", text.strip("\n"))


def parameters(text: str) -> tuple[str, str]:
    return ("parameters", text.strip("\n"))


def build(stem: str, cells: list[tuple[str, str]], accelerator: str | None = None):
    """A notebook (nbformat 4) with stable cell ids `<stem>-<index>` and no outputs."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    notebook.metadata["language_info"] = {"name": "python"}
    if accelerator:  # Colab reads the runtime type it opens the notebook with from here.
        notebook.metadata["accelerator"] = accelerator
        notebook.metadata["colab"] = {"provenance": []}
    for index, (kind, source) in enumerate(cells):
        cell_id = f"{stem.split('_')[0]}-{index:02d}"
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(source, id=cell_id)
        else:
            cell = nbformat.v4.new_code_cell(source, id=cell_id)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
        notebook.cells.append(cell)
    nbformat.validate(notebook)
    return notebook


# ---------------------------------------------------------------------------------------------
# 01: the quick start on a Colab TPU

QUICKSTART = [
    markdown(r"""
# MTKD quick start: distil CLIP ViT-L/14 into a small student, on a Colab TPU

This notebook runs the whole MTKD method of `mtkd_jax` on **Oxford-IIIT Pets** (37 classes,
16 labeled images per class):

1. *(stage 0)* the teacher, CLIP ViT-L/14 from the keras-hub preset
   `clip_vit_large_patch14`, learns deep prompts on the few labeled images of the base classes;
2. **stage 1**: a student (CLIP ViT-B/16's image encoder with visual deep prompts) learns from
   the *unlabeled* training images by matching the teacher at the instance, batch and class
   level;
3. **stage 2**: the student is frozen and a residual adapter trains on the labeled shots;
4. evaluation on the test split, base-to-novel: the results table, the accuracy plot, and the
   exported student (`student.keras`) classifying a few test images.

Every batch is split over all the accelerator's cores (`jax.sharding`, one global batch, so the
batch- and class-level losses see the whole batch whatever the number of cores).

**On Colab** (what a TPU user does differently from a CPU/GPU user):

- *Runtime → Change runtime type → TPU*, then *Runtime → Run all*. The batch sizes below are
  multiples of 8, so each of a v2-8's 8 cores gets an equal share; a single-chip runtime
  (v5e-1, v6e-1) takes the whole batch. Batch sizes must be multiples of the core count.
- Colab's TPU runtimes ship JAX with TPU support. The install cell installs `mtkd_jax` from
  `package_source` together with `jax[tpu]`, so pip keeps a JAX that finds the TPU (on a GPU
  runtime set `jax_extra = "cuda12"`, on CPU `"cpu"`). If pip asks to restart the session,
  do so and *Run all* again: the install cell is skipped once `mtkd_jax` imports.
- The teacher (about 1.7 GB in float32) comes from Kaggle through keras-hub and Oxford Pets
  (about 800 MB) through TensorFlow Datasets, both on the first run. Everything is written to
  `workdir`; re-running with `resume = True` continues from the last finished epoch after a
  disconnect (mount Google Drive and point `workdir` there to keep it across sessions).
- Memory: every core holds a copy of the teacher and the student; if a core runs out of
  memory, set `dtype = "bfloat16"` or lower the batch sizes.

Your own teacher: `teacher` accepts a Hugging Face CLIP directory, an OpenAI `.pt` file or a
checkpoint converted with `python -m mtkd_jax.convert`; `teacher_prompts` a PromptKD teacher
checkpoint (`model-best.pth.tar`), which replaces stage 0.
"""),
    parameters(r"""
# Parameters (papermill-style: a runner may override them in a cell inserted after this one).
dataset = "oxford_pets"
shots = 16
seed = 1
teacher = "keras_hub:clip_vit_large_patch14"  # or an HF directory, an OpenAI .pt, our format
teacher_prompts = ""  # a PromptKD teacher checkpoint instead of stage 0 ("" = run stage 0)
teacher_prompt_length, teacher_prompt_depth = 4, 9
student = "clip:keras_hub:clip_vit_base_patch16"
student_prompt_length, student_prompt_depth = 4, 9
teacher_epochs, epochs, adapter_epochs = 20, 20, 20  # stage 0, stage 1, stage 2
unlabeled_pool = "fewshot"  # stage 1's images: the K-shot images, or "train" (all, unlabeled)
batch_size, eval_batch_size = 8, 64
dtype = "float32"
workdir = "runs/oxford_pets_quickstart"
resume = True  # continue a run found in workdir (finished stages are reused)
tfds_data_dir = ""  # "" = TFDS's default (~/tensorflow_datasets)
package_source = "git+https://github.com/OWNER/mtkd_jax.git"  # where pip gets mtkd_jax
jax_extra = "tpu"  # the JAX build pip installs with it: "tpu", "cuda12" or "cpu"
num_examples = 6  # test images shown with their predicted classes
smoke = False  # True: CI's seconds-long run on mock data with a tiny random CLIP
"""),
    markdown(r"""
## Install

Skipped when `mtkd_jax` is already importable (a local checkout installed with `pip install -e .`,
or a second run of this notebook).
"""),
    code(r"""
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("mtkd_jax") is None:
    if "OWNER" in package_source:
        raise ValueError(
            "Set package_source to where pip can get mtkd_jax (a git URL of the repository, "
            f"or a local path). Received: package_source={package_source!r}"
        )
    command = [sys.executable, "-m", "pip", "install", "--quiet", f"jax[{jax_extra}]"]
    subprocess.check_call([*command, package_source])
"""),
    markdown(r"""
## The devices

`import mtkd_jax` makes Keras use its JAX backend. On a v2-8 TPU this lists 8 `TpuDevice`s; the
driver builds a one-axis mesh over all of them and shards every batch along it.
"""),
    code(r"""
import contextlib
import dataclasses
import os
from pathlib import Path

os.environ["KERAS_BACKEND"] = "jax"  # before Keras is imported anywhere

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display
from PIL import Image as PILImage

import mtkd_jax
from mtkd_jax import experiment, report
from mtkd_jax.config import RunConfig

print(f"mtkd_jax {mtkd_jax.__version__}, JAX {jax.__version__}, backend {jax.default_backend()}")
print(jax.devices())
"""),
    markdown(r"""
## Smoke settings (CI only)

With `smoke = True` the run shrinks to seconds on a CPU: TensorFlow Datasets is mocked with a
few generated images per Oxford Pets class (`tfds.testing.mock_data`), and a tiny random CLIP,
saved in mtkd_jax's own format to a temporary folder, serves as teacher and student. Such a
teacher has no fresh prompts to tune, so stage 0 is skipped and stage 1 distils the plain
teacher. With `smoke = False` this cell does nothing.
"""),
    code(r"""
data_context = contextlib.nullcontext  # a real run reads the real dataset

if smoke:
    import io
    import tempfile

    import tensorflow_datasets as tfds

    from mtkd_jax.clip import CLIP, CLIPConfig
    from mtkd_jax.clip import save as save_clip
    from mtkd_jax.data.tf_setup import import_tensorflow

    scratch = Path(tempfile.mkdtemp(prefix="mtkd_notebook_"))
    os.environ["MTKD_CACHE_DIR"] = str(scratch / "cache")  # keep mock few-shot lists apart
    save_clip(CLIP(CLIPConfig.preset("tiny")), scratch / "tiny_clip")
    teacher, teacher_prompts, student = str(scratch / "tiny_clip"), "", f"clip:{scratch}/tiny_clip"
    teacher_prompt_length = teacher_prompt_depth = 0
    student_prompt_length, student_prompt_depth = 2, 2
    teacher_epochs = epochs = adapter_epochs = 1
    shots, batch_size, eval_batch_size = 1, 8, 64
    workdir, resume, num_examples = str(scratch / "run"), False, 3

    def mock_pets(self, split, **kwargs):
        # Per class 5 training and 2 test images of 32 px, PNG-encoded like the real files.
        per_class = 5 if str(split).startswith("train") else 2
        labels = np.repeat(np.arange(37), per_class)
        rng = np.random.default_rng(len(labels))
        encoded = []
        for _ in labels:
            buffer = io.BytesIO()
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            PILImage.fromarray(pixels).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        tf = import_tensorflow()
        return tf.data.Dataset.from_tensor_slices({"image": encoded, "label": labels})

    def data_context():
        policy = tfds.testing.MockPolicy.USE_CODE
        return tfds.testing.mock_data(policy=policy, as_dataset_fn=mock_pets)
"""),
    markdown(r"""
## The run's settings

One `RunConfig` holds every setting; its fields are the flags of `python -m mtkd_jax.main`, so
the same run from a terminal is `python -m mtkd_jax.main --dataset=oxford_pets --stage=1 ...`.
"""),
    code(r"""
config = RunConfig(
    dataset=dataset,
    data_source="tfds",  # TFDS downloads and prepares the dataset on the first run
    tfds_data_dir=tfds_data_dir,
    shots=shots,
    seed=seed,
    workdir=workdir,
    teacher=teacher,
    teacher_prompts=teacher_prompts,
    teacher_prompt_length=teacher_prompt_length,
    teacher_prompt_depth=teacher_prompt_depth,
    student=student,
    student_prompt_length=student_prompt_length,
    student_prompt_depth=student_prompt_depth,
    teacher_epochs=teacher_epochs,
    epochs=epochs,
    adapter_epochs=adapter_epochs,
    unlabeled_pool=unlabeled_pool,
    batch_size=batch_size,
    eval_batch_size=eval_batch_size,
    dtype=dtype,
    resume=resume,
)
config.validate()


def run_stage(stage):
    with data_context():
        return experiment.run(dataclasses.replace(config, stage=stage))
"""),
    markdown(r"""
## Stage 0 and stage 1: the teacher's prompts, then distillation on unlabeled images

Stage 0 tunes the teacher's deep prompts on the labeled shots of the base classes (skipped when
`teacher_prompts` gives a PromptKD teacher, or when the teacher has no prompts). Stage 1 then
trains the student on images *without their labels* (the K-shot images, or with
`unlabeled_pool = "train"` the whole training split): its loss is the sum over
temperatures 1, 2, 3, 5, 6 of the instance-level KL, the batch-level and the class-level
relation losses (`mtkd_jax.losses.multilevel_kd`). Each stage's per-step losses go to
`workdir/metrics.jsonl` and TensorBoard.
"""),
    code(r"""
if teacher_prompt_length and not teacher_prompts:
    run_stage("0")
results = run_stage("1")
"""),
    markdown(r"""
## Stage 2: the residual adapter on the labeled shots

The stage-1 student is frozen; only a small residual adapter on its features trains, with
cross-entropy on the few labeled images of the base classes. The exported student
(`workdir/student.keras`) classifies images with neither the teacher nor a text encoder.
"""),
    code(r"""
results = run_stage("2")
"""),
    markdown(r"""
## Results

Accuracy in percent on the base classes (seen in the labeled shots), the novel classes (never
labeled) and their harmonic mean (HM); "all" is the accuracy over all 37 classes at once.
"""),
    code(r"""
print(report.format_results_table(results))
display(Image(filename=str(Path(workdir) / "results.png")))
"""),
    markdown(r"""
## The distilled student on a few test images

`mtkd_jax.export.load_classifier` reads the exported student; `mtkd_jax.predict.predict` gives
the top classes of image files (the same as `python -m mtkd_jax.predict --model=... IMAGE...`).
"""),
    code(r"""
from mtkd_jax.export import load_classifier
from mtkd_jax.predict import predict

classifier = load_classifier(Path(workdir) / "student.keras")
with data_context():
    test = experiment.load_data(config).split("test")
picks = np.random.default_rng(seed).choice(len(test), size=num_examples, replace=False)
examples = Path(workdir) / "examples"
examples.mkdir(exist_ok=True)
paths = []
for index in picks:
    paths.append(str(examples / f"test_{index}.jpg"))  # PNG or JPEG bytes: both decode
    Path(paths[-1]).write_bytes(test.encoded[index])

figure, axes = plt.subplots(1, num_examples, figsize=(3 * num_examples, 3.6), squeeze=False)
predictions = predict(classifier, paths, top_k=3)
for axis, index, (path, top) in zip(axes[0], picks, predictions, strict=True):
    (name, probability), truth = top[0], classifier.classnames[test.labels[index]]
    axis.imshow(PILImage.open(path).convert("RGB"))
    axis.set_title(f"{name} ({probability:.0%})\ntrue: {truth}", fontsize=9)
    axis.axis("off")
plt.show()
"""),
]


# ---------------------------------------------------------------------------------------------
# 02: the losses in your own JAX code

LOSSES = [
    markdown(r"""
# The multi-level KD losses in your own JAX code

`mtkd_jax.losses` imports nothing but JAX. This notebook uses it without the `mtkd_jax` driver:
a fixed teacher, a small Keras student run through Keras's *stateless* API (so the training step
is a pure function that `jax.jit` compiles), an optax optimizer, and a complete training loop
that logs each level of the loss:

- `instance_kd`: the KL divergence between teacher and student class probabilities, per image;
- `batch_kd`: the difference of the `[batch, batch]` sample-relation matrices `P Pᵀ`;
- `class_kd`: the difference of the `[classes, classes]` class-relation matrices `Pᵀ P`;
- `multilevel_kd`: their weighted sum over several temperatures (the paper's stage-1 loss).

The batch and class terms are statistics of the *whole* batch, so the batch is sharded over all
devices inside one jitted step (not `pmap`ped per device): on a TPU with 8 cores the losses are
exactly those of the global batch. It runs on CPU, GPU and TPU alike.
"""),
    parameters(r"""
# Parameters (papermill-style: a runner may override them in a cell inserted after this one).
num_classes = 10
feature_dim = 32
pool_size = 4096  # unlabeled inputs the student learns from
batch_size = 128  # a multiple of the device count
steps = 1000
learning_rate = 1e-2
temperatures = (1.0, 2.0, 3.0, 5.0, 6.0)
loss_weights = (1.0, 1.0, 1.0)  # (instance, batch, class)
seed = 0
smoke = False  # True: CI's few-step run
"""),
    code(r"""
if smoke:
    steps, pool_size = 5, 512
"""),
    code(r"""
import functools
import os

os.environ["KERAS_BACKEND"] = "jax"  # before Keras is imported anywhere

import jax
import jax.numpy as jnp
import keras
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtkd_jax.losses import batch_kd, class_kd, instance_kd, multilevel_kd

print(jax.devices())
"""),
    markdown(r"""
## Each level on its own

Every loss takes the student's logits first and the teacher's second, both `[batch, classes]`,
and returns a scalar. Identical logits give 0 at every level.
"""),
    code(r"""
key_student, key_teacher = jax.random.split(jax.random.PRNGKey(seed))
student_logits = jax.random.normal(key_student, (8, num_classes))
teacher_logits = 3.0 * jax.random.normal(key_teacher, (8, num_classes))
for level in (instance_kd, batch_kd, class_kd):
    value = level(student_logits, teacher_logits, temperature=2.0)
    same = level(teacher_logits, teacher_logits, temperature=2.0)
    print(f"{level.__name__:12s} T=2: {float(value):.4f}   (student = teacher: {float(same):.1e})")
loss, parts = multilevel_kd(student_logits, teacher_logits, temperatures=temperatures)
print("multilevel_kd:", float(loss), {name: round(float(v), 4) for name, v in parts.items()})
"""),
    markdown(r"""
## A teacher, a student and unlabeled data

The teacher is a fixed, wider network (here random, standing in for a trained model); its
logits on the unlabeled pool are computed once, outside the differentiated function, since no
gradient ever flows into them. The student is a smaller Keras MLP, trained from scratch.
"""),
    code(r"""
keras.utils.set_random_seed(seed)
rng = np.random.default_rng(seed)
centres = 3.0 * rng.normal(size=(num_classes, feature_dim))
inputs = centres[rng.integers(num_classes, size=pool_size)]
inputs = (inputs + rng.normal(size=inputs.shape)).astype(np.float32)  # [pool, features]
held_out = centres[rng.integers(num_classes, size=512)] + rng.normal(size=(512, feature_dim))
held_out = held_out.astype(np.float32)


def mlp(widths, name):
    layers = [keras.Input((feature_dim,))]
    for index, width in enumerate(widths):
        layers.append(keras.layers.Dense(width, activation="gelu", name=f"hidden_{index}"))
    layers.append(keras.layers.Dense(num_classes, name="logits"))
    return keras.Sequential(layers, name=name)


teacher = mlp([256, 256], "teacher")
student = mlp([64], "student")
teacher_pool_logits = np.asarray(teacher(inputs))  # [pool, classes], fixed
teacher_held_out = np.asarray(teacher(held_out)).argmax(axis=1)
print(f"teacher {teacher.count_params():,} parameters, student {student.count_params():,}")
"""),
    markdown(r"""
## The training step: one pure function, jitted once, the batch sharded over the devices

`student.stateless_call(trainable, non_trainable, x)` runs the Keras model on explicit weight
arrays, so `jax.value_and_grad` differentiates the loss with respect to `trainable`. The loss
returns its parts as auxiliary output, to be logged under their names.
"""),
    code(r"""
# A plain `Mesh` (axis type Auto): XLA partitions the batch- and class-relation matmuls itself.
# (`jax.make_mesh` now defaults to Explicit axes, under which `P @ P.T` of a sharded batch is a
# type error.)
mesh = Mesh(np.asarray(jax.devices()), ("batch",))
batch_sharding = NamedSharding(mesh, P("batch"))  # split the leading axis over the devices
replicated = NamedSharding(mesh, P())  # the weights: a whole copy on every device

optimizer = optax.adam(learning_rate)
# Copies of the Keras variables' values: the step donates (reuses) its input buffers.
trainable = jax.device_put([jnp.copy(v.value) for v in student.trainable_variables], replicated)
non_trainable = [jnp.copy(v.value) for v in student.non_trainable_variables]
non_trainable = jax.device_put(non_trainable, replicated)
opt_state = optimizer.init(trainable)


def loss_fn(trainable, non_trainable, x, teacher_logits):
    logits, non_trainable = student.stateless_call(trainable, non_trainable, x)
    loss, parts = multilevel_kd(
        logits, teacher_logits, temperatures=temperatures, weights=loss_weights
    )
    return loss, (parts, non_trainable)


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def train_step(trainable, non_trainable, opt_state, x, teacher_logits):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (parts, non_trainable)), grads = grad_fn(trainable, non_trainable, x, teacher_logits)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, non_trainable, opt_state, {"loss": loss, **parts}
"""),
    markdown(r"""
## The loop

Each step draws a batch from the pool, puts it on the devices split along the batch axis, and
records every term. Training stops with an error naming the step if the loss is not finite.
"""),
    code(r"""
history = {"loss": [], "instance": [], "batch": [], "class": []}
for step in range(steps):
    rows = rng.choice(pool_size, size=batch_size, replace=False)
    x = jax.device_put(inputs[rows], batch_sharding)
    targets = jax.device_put(teacher_pool_logits[rows], batch_sharding)
    trainable, non_trainable, opt_state, measurements = train_step(
        trainable, non_trainable, opt_state, x, targets
    )
    for name, value in jax.device_get(measurements).items():
        history[name].append(float(value))
    if not np.isfinite(history["loss"][-1]):
        raise FloatingPointError(f"The loss is {history['loss'][-1]} at step {step}.")
print({name: f"{values[0]:.3f} -> {values[-1]:.3f}" for name, values in history.items()})
"""),
    markdown(r"""
## Each loss term over training

The weighted total and its three levels (each summed over the temperatures), on a log scale.
"""),
    code(r"""
figure, axes = plt.subplots(1, 4, figsize=(16, 3.2))
titles = {"loss": "total", "instance": "instance (KL)", "batch": "batch", "class": "class"}
for axis, (name, values) in zip(axes, history.items(), strict=True):
    axis.plot(values)
    axis.set_yscale("log")
    axis.set_title(titles[name])
    axis.set_xlabel("step")
plt.tight_layout()
plt.show()
"""),
    markdown(r"""
## Did the student learn the teacher?

Put the trained weights back into the Keras model and compare the two models' top-1 classes on
held-out inputs.
"""),
    code(r"""
for variable, value in zip(student.trainable_variables, trainable, strict=True):
    variable.assign(value)
agreement = np.mean(np.asarray(student(held_out)).argmax(axis=1) == teacher_held_out)
print(f"student and teacher agree on {agreement:.1%} of {len(held_out)} held-out inputs")
"""),
]


# ---------------------------------------------------------------------------------------------
# 03: the offline demo

OFFLINE = [
    markdown(r"""
# The offline demo: MTKD end to end on the shapes world, on a CPU

No download at all: the shapes world (`mtkd_jax.data.shapes`) draws 32-pixel images of coloured
shapes ("red circle", "blue triangle", ...), and a small CLIP pretrained on its captions ships
with the package as the teacher. The run is the full method, as
`python -m mtkd_jax.main` (or `make demo`) runs it:

- stage 0: the teacher's deep prompts learn from 4 labeled images per base class;
- stage 1: a small ResNet student (keras-hub's `ResNetBackbone`), 8 times cheaper than the
  teacher, learns from the unlabeled training images with the multi-level KD losses;
- stage 2: a residual adapter trains on the labeled shots;
- baselines: the teacher zero-shot, the same student trained on the shots alone
  ("supervised"), and stage 1 with the instance-level loss only.

It needs no accelerator: a few minutes on a CPU. The novel classes are colour-shape
combinations that no labeled image shows.
"""),
    parameters(r"""
# Parameters (papermill-style: a runner may override them in a cell inserted after this one).
shots = 4
teacher_epochs, epochs, adapter_epochs = 10, 4, 20  # stage 0, stage 1, stage 2 (the demo's)
supervised_epochs = 100  # the supervised baseline (the demo's)
unlabeled_pool = "train"  # stage 1 learns from the whole unlabeled training split
batch_size = 64
baselines = ("zero_shot", "supervised", "instance_only")
seed = 1
workdir = "runs/shapes_notebook"
num_examples = 8  # new images shown with their predicted classes
smoke = False  # True: CI's seconds-long run (one epoch per stage, the K-shot pool)
"""),
    code(r"""
if smoke:
    import tempfile

    teacher_epochs = epochs = adapter_epochs = supervised_epochs = 1
    shots, unlabeled_pool, batch_size, baselines = 2, "fewshot", 16, ()
    workdir = tempfile.mkdtemp(prefix="mtkd_notebook_")
"""),
    code(r"""
import os
from pathlib import Path

os.environ["KERAS_BACKEND"] = "jax"  # before Keras is imported anywhere

import jax
import matplotlib.pyplot as plt
from IPython.display import Image, display
from PIL import Image as PILImage

from mtkd_jax import experiment, report
from mtkd_jax.config import demo_config
from mtkd_jax.data import shapes

print(jax.devices())
"""),
    markdown(r"""
## A look at the data

A few training images with their captions, and the classes whose labeled images stage 0 and
stage 2 see ("base") or never see ("novel").
"""),
    code(r"""
images, labels, captions = shapes.render_split("train", 12, seed=seed)
display(shapes.contact_sheet(images, columns=12, scale=3))
print(captions)
dataset = experiment.load_data(demo_config(seed=seed))
print("base: ", [dataset.classnames[i] for i in dataset.class_ids("base")])
print("novel:", [dataset.classnames[i] for i in dataset.class_ids("novel")])
"""),
    markdown(r"""
## The run

`demo_config(...)` is the demo's `RunConfig` (the settings of `flags/demo.flags`) with the
parameters above; `experiment.run` trains every stage and baseline, evaluates each, and writes
`results.json`, `results.png` and the exported student to `workdir`.
"""),
    code(r"""
config = demo_config(
    shots=shots,
    teacher_epochs=teacher_epochs,
    epochs=epochs,
    adapter_epochs=adapter_epochs,
    supervised_epochs=supervised_epochs,
    unlabeled_pool=unlabeled_pool,
    batch_size=batch_size,
    baselines=tuple(baselines),
    seed=seed,
    workdir=workdir,
    overwrite=True,  # re-running the notebook starts afresh
)
results = experiment.run(config)
"""),
    markdown(r"""
## Results

Accuracy in percent on the base classes, the novel classes, their harmonic mean (HM), and over
all classes at once.
"""),
    code(r"""
print(report.format_results_table(results))
display(Image(filename=str(Path(workdir) / "results.png")))
"""),
    markdown(r"""
## The exported student on new images

Freshly drawn test images (a seed the run never used), classified by `workdir/student.keras`
alone: no teacher, no text encoder.
"""),
    code(r"""
from mtkd_jax.export import load_classifier
from mtkd_jax.predict import predict

classifier = load_classifier(Path(workdir) / "student.keras")
images, labels, _ = shapes.render_split("test", num_examples, seed=seed + 1000)
examples = Path(workdir) / "examples"
examples.mkdir(exist_ok=True)
paths = []
for index, image in enumerate(images):
    paths.append(str(examples / f"shape_{index}.png"))
    PILImage.fromarray(image).save(paths[-1])

figure, axes = plt.subplots(1, num_examples, figsize=(2 * num_examples, 2.6), squeeze=False)
predictions = predict(classifier, paths)
for axis, image, label, (_, top) in zip(axes[0], images, labels, predictions, strict=True):
    (name, probability), truth = top[0], classifier.classnames[label]
    axis.imshow(image)
    axis.set_title(f"{name} ({probability:.0%})\ntrue: {truth}", fontsize=8)
    axis.axis("off")
plt.show()
"""),
]

NOTEBOOKS = {
    "01_quickstart_tpu": (QUICKSTART, "TPU"),
    "02_losses_in_your_jax_code": (LOSSES, None),
    "03_offline_demo": (OFFLINE, None),
}


def notebooks() -> dict[str, object]:
    """`{file name: notebook}` of every notebook this script writes."""
    return {
        f"{stem}.ipynb": build(stem, cells, accelerator)
        for stem, (cells, accelerator) in NOTEBOOKS.items()
    }


def main() -> None:
    for name, notebook in notebooks().items():
        path = HERE / name
        nbformat.write(notebook, path)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
