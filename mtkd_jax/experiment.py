"""One MTKD run, as a library function: `run(config) -> results`.

    data ─► teacher (+ stage 0 prompts) ─► class text features, once ─► stage 1 (distil the
    student on unlabeled images) ─► stage 2 (adapter on K shots) ─► evaluation ─► results.json,
    results.png, the exported student

`python -m mtkd_jax.main` and the notebooks call `run`. Every stage is trained by the same
loop (`mtkd_jax.train.fit`); `mtkd_jax.stages` says what differs. The workdir holds everything
the run writes (see the README, "The workdir"):

    flags.json          the RunConfig of the run
    metrics.jsonl       one JSON line per log step and evaluation (+ tensorboard/)
    checkpoints/        atomic per-epoch checkpoints of every stage, and finished markers
    text_features.npz   the teacher's class text features [C, D], computed once
    teacher_prompts.npz the stage-0 deep prompts (read by stage 1)
    student_stage1.weights.h5 / student_stage2.weights.h5   the student after each stage
    results.json        accuracies per method: base, novel, hm, all
    results.png         the same, as a bar chart
    student.keras       the deployable student (image encoder + projector + adapter + classes)
"""

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from mtkd_jax import atomic, checkpoint, distributed, quiet, report, stages
from mtkd_jax.config import STUDENT_KINDS, RunConfig, with_dataset_defaults
from mtkd_jax.errors import InputError

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
PLOT_FILE = "results.png"
TEXT_FEATURES_FILE = "text_features.npz"
TEACHER_PROMPTS_FILE = "teacher_prompts.npz"
EXPORT_FILE = "student.keras"


def _import_keras():
    """Keras with the JAX backend (set by `import mtkd_jax`)."""
    import keras

    if keras.backend.backend() != "jax":
        raise InputError(
            "mtkd_jax trains with the JAX backend of Keras. Received KERAS_BACKEND="
            f"{keras.backend.backend()!r}: set KERAS_BACKEND=jax before importing keras."
        )
    return keras


# ---------------------------------------------------------------------------------------------
# Small utilities


def save_npz_atomic(path: Path, **arrays) -> None:
    """`np.savez` (no pickles) to `path`, atomically; by process 0 of a multi-process run."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}

    def write():
        with atomic.replacing(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)

    distributed.on_primary(write, what=f"writing {path}")


def save_weights_atomic(model, path: Path) -> None:
    """`model.save_weights` (Keras .weights.h5) to `path`, atomically; by process 0."""

    def write():
        with atomic.replacing(path, suffix=".weights.h5") as tmp:
            model.save_weights(str(tmp))

    distributed.on_primary(write, what=f"writing {path}")


def accuracy(logits: np.ndarray, labels: np.ndarray, class_ids: np.ndarray) -> float:
    """Accuracy among `class_ids` only, of the images whose label is in `class_ids`.

    Args:
      logits: `[N, C]` logits over all classes.
      labels: `[N]` original label ids.
      class_ids: the label ids competing (e.g. the novel classes).
    """
    keep = np.isin(labels, class_ids)
    if not keep.any():
        return float("nan")
    restricted = logits[keep][:, class_ids]
    return float(np.mean(class_ids[np.argmax(restricted, axis=1)] == labels[keep]))


def base_novel_accuracies(
    logits: np.ndarray, labels: np.ndarray, dataset, base_to_novel: bool
) -> dict[str, float]:
    """`{"base", "novel", "hm", "all"}` accuracies in [0, 1] from test logits `[N, C]`."""
    result = {"all": accuracy(logits, labels, dataset.class_ids("all"))}
    if base_to_novel:
        base = accuracy(logits, labels, dataset.class_ids("base"))
        novel = accuracy(logits, labels, dataset.class_ids("novel"))
        result.update(base=base, novel=novel, hm=report.harmonic_mean(base, novel))
    return result


# ---------------------------------------------------------------------------------------------
# The run's shared context


@dataclasses.dataclass
class Context:
    """What every stage of one run reads: settings, devices, data, teacher, class features."""

    config: RunConfig
    workdir: Path
    mesh: object
    dataset: object
    teacher: object
    tokenizer: object
    image_size: int
    text_features: np.ndarray | None = None  # [C, D] normalised, of the (prompted) teacher
    logit_scale: float = 0.0
    results: dict = dataclasses.field(default_factory=dict)

    def epoch_seed(self, stage: str, epoch: int) -> int:
        """The data seed of `epoch` of `stage`: a function of (seed, data stream, epoch) only.

        Every stage-1 variant (`stage1`, `stage1_instance_only`, ...) reads the stream of
        `stage1`, so ablations that differ in the loss see the same batches in the same order
        with the same augmentation.
        """
        stream = data_stream(stage)
        return int(self.config.seed) * 1_000_003 + hash_stage(stream) * 10_007 + epoch

    @property
    def trained_classes(self) -> np.ndarray:
        """Label ids that the labeled stages train on: base classes, or all."""
        which = "base" if self.config.base_to_novel else "all"
        return self.dataset.class_ids(which)

    @property
    def stage2_classes(self) -> np.ndarray:
        """Label ids that stage 2 and the supervised baseline train on (`--stage2_classes`)."""
        if self.config.stage2_classes == "all":
            return self.dataset.class_ids("all")
        return self.trained_classes

    def label_map(self, classes: np.ndarray | None = None) -> np.ndarray:
        """int32 `[C]`: original label id -> row among `classes` (default `trained_classes`;
        -1 elsewhere)."""
        classes = self.trained_classes if classes is None else classes
        mapping = np.full(self.dataset.num_classes, -1, np.int32)
        mapping[classes] = np.arange(len(classes), dtype=np.int32)
        return mapping


def data_stream(stage: str) -> str:
    """The name whose data a stage reads: "stage1" for every stage-1 variant, else the stage."""
    return "stage1" if stage.startswith("stage1") else stage


def student_init_seed(seed: int) -> int:
    """The seed every fresh student is built from: a function of the run's seed only."""
    return (int(seed) * 1_000_003 + hash_stage("student")) % (2**31 - 1)


def hash_stage(stage: str) -> int:
    """A small stable integer per stage name (never Python's salted `hash`)."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(stage)) % 9973


# ---------------------------------------------------------------------------------------------
# Models


def build_teacher(config: RunConfig, prompt_length: int, prompt_depth: int):
    """The teacher CLIP with fresh deep prompts of the given size (0: plain CLIP)."""
    dtype = _model_dtype(config)
    if config.teacher == "shapes":
        from mtkd_jax.shapes_clip import load_shapes_clip

        return load_shapes_clip(prompt_length, prompt_depth, dtype=dtype)
    from mtkd_jax.clip.load import load as load_clip

    settings = None
    if prompt_length:
        settings = {
            f"{tower}_prompt_{key}": value
            for tower in ("vision", "text")
            for key, value in (("length", prompt_length), ("depth", prompt_depth))
        }
    return load_clip(config.teacher, prompts=settings, dtype=dtype or "float32")


def _model_dtype(config: RunConfig):
    return "mixed_bfloat16" if config.dtype == "bfloat16" else None


def plain_copy(teacher):
    """The same CLIP without deep prompts, sharing the teacher's (immutable) weight arrays."""
    from mtkd_jax.clip import CLIP

    config = teacher.config.replace(
        vision_prompt_length=0, vision_prompt_depth=0, text_prompt_length=0, text_prompt_depth=0
    )
    plain = CLIP(config, dtype=teacher.dtype_policy, name=teacher.name)
    values = {v.path: v.value for v in teacher.weights}
    for variable in plain.weights:
        variable.assign(values[variable.path])
    plain.trainable = False
    return plain


def shared_values(model, source):
    """`fn(trainable, non_trainable) -> (model_trainable, model_non_trainable)`.

    Picks, by variable path, the values of `model`'s variables out of the variable values of
    `source` (a model holding the same weights and more, e.g. the prompted teacher), so a
    jitted step can run both without a second copy of the weights.
    """
    trainable = [v.path for v in source.trainable_variables]
    non_trainable = [v.path for v in source.non_trainable_variables]
    where = {path: (0, i) for i, path in enumerate(trainable)}
    where.update({path: (1, i) for i, path in enumerate(non_trainable)})
    missing = [v.path for v in model.weights if v.path not in where]
    if missing:
        raise ValueError(f"{model.name} has weights that {source.name} lacks: {missing}")
    picks = [
        [where[v.path] for v in variables]
        for variables in (model.trainable_variables, model.non_trainable_variables)
    ]

    def fn(source_trainable, source_non_trainable):
        lists = (source_trainable, source_non_trainable)
        return tuple([lists[kind][i] for kind, i in pick] for pick in picks)

    return fn


def class_token_ids(teacher, tokenizer, classnames, template) -> np.ndarray:
    """int32 `[C, context_length]` ids of the class prompts for `teacher`.

    A plain CLIP reads the dataset's template ("a photo of a {}, a type of pet."); with text
    deep prompts the learned context replaces the placeholders before each class name.
    """
    from mtkd_jax.clip.model import class_token_ids as token_ids_for

    return token_ids_for(classnames, tokenizer, teacher.config, template)


def save_prompts(teacher, path: Path) -> None:
    """Writes the teacher's deep-prompt variables to `path` (.npz keyed by variable path)."""
    save_npz_atomic(path, **{v.path: np.asarray(v.value) for v in teacher.prompt_variables()})


def load_prompts(teacher, path: Path) -> None:
    """Assigns the deep prompts saved by `save_prompts`; one error lists every mismatch."""
    with np.load(path, allow_pickle=False) as archive:
        saved = {key: archive[key] for key in archive.files}
    variables = {v.path: v for v in teacher.prompt_variables()}
    missing = sorted(set(variables) - set(saved))
    unexpected = sorted(set(saved) - set(variables))
    misshaped = sorted(
        f"{k}: {saved[k].shape} != {tuple(variables[k].shape)}"
        for k in set(saved) & set(variables)
        if saved[k].shape != tuple(variables[k].shape)
    )
    if missing or unexpected or misshaped:
        raise InputError(
            f"The teacher prompts in {path} do not fit the teacher (check "
            "--teacher_prompt_length/--teacher_prompt_depth). "
            f"Missing: {missing}. Unexpected: {unexpected}. Mis-shaped: {misshaped}."
        )
    for key, variable in variables.items():
        variable.assign(saved[key])


# ---------------------------------------------------------------------------------------------
# Data


def load_data(config: RunConfig):
    """The run's `FewShotDataset`."""
    from mtkd_jax import data

    return data.load_dataset(
        config.dataset,
        source=config.data_source,
        root=config.data_root,
        tfds_data_dir=config.tfds_data_dir or None,
        seed=config.seed,
        strict=config.strict_data,
        reference_data=config.reference_data,
    )


def training_batches(ctx: Context, split, stage: str, *, labeled: bool):
    """`batches_for_epoch(epoch)` for `train.fit`, and the steps per epoch.

    The data of an epoch is a function of (seed, stage, epoch) only, so a resumed run sees what
    an uninterrupted one would. Unlabeled batches carry no "labels" key at all.
    """
    from mtkd_jax.data import pipeline

    batch_size = ctx.config.batch_size
    # A split smaller than the batch (e.g. EuroSAT's 5 base classes at 1 shot, batch 8) trains
    # on one masked partial batch per epoch, as Dassl keeps its partial batch.

    def batches_for_epoch(epoch: int):
        return pipeline.make_batches(
            split,
            image_size=ctx.image_size,
            batch_size=batch_size,
            training=True,
            seed=ctx.epoch_seed(stage, epoch),
            labeled=labeled,
            strict=ctx.config.strict_data,
            min_crop_scale=ctx.config.min_crop_scale,
            partial_batches=True,
        )

    return batches_for_epoch, pipeline.steps_per_epoch(len(split), batch_size, training=True)


def predict_test_logits(ctx: Context, logits_fn, variables) -> tuple[np.ndarray, np.ndarray]:
    """Logits over all classes `[N, C]` and labels `[N]` of every test image, each counted once.

    `logits_fn(variables, images) -> [batch, C]` runs jitted on the batch sharded over devices;
    the padded rows of the last batch are dropped using its mask.
    """
    from mtkd_jax import train
    from mtkd_jax.data import pipeline

    batches = pipeline.make_batches(
        ctx.dataset.split("test"),
        image_size=ctx.image_size,
        batch_size=ctx.config.eval_batch_size,
        training=False,
        seed=0,
        labeled=True,
        strict=ctx.config.strict_data,
    )
    step = train.make_predict_step(logits_fn, ctx.mesh)
    return train.predict(step, variables, batches, ctx.mesh, description="evaluating")


def evaluate_method(ctx: Context, method: str, logits_fn, variables) -> dict[str, float]:
    """Evaluates one method on the test split and records it in `ctx.results`."""
    started = time.perf_counter()
    logits, labels = predict_test_logits(ctx, logits_fn, variables)
    accuracies = base_novel_accuracies(logits, labels, ctx.dataset, ctx.config.base_to_novel)
    accuracies["test_images"] = int(len(labels))
    ctx.results.setdefault("methods", {})[method] = accuracies
    shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in accuracies.items() if k != "test_images")
    print(f"[eval] {method}: {shown} ({len(labels)} test images, "
          f"{time.perf_counter() - started:.1f}s)")  # fmt: skip
    write_results(ctx)
    return accuracies


def write_results(ctx: Context) -> None:
    """Writes `results.json` (atomically) with what has been measured so far; by process 0."""
    from mtkd_jax.data import images

    ctx.results["skipped_images"] = images.skipped_images()  # {path: reason}, --nostrict_data
    path = ctx.workdir / RESULTS_FILE
    distributed.on_primary(lambda: atomic.write_json(path, ctx.results), what=f"writing {path}")


# ---------------------------------------------------------------------------------------------
# Stages


def fit_stage(
    ctx: Context, stage: str, model, loss_fn, frozen, split, *, labeled: bool, epochs,
    evaluation=None,
):  # fmt: skip
    """Trains `model`'s trainable variables with `loss_fn` by the shared loop; updates `model`.

    The same function serves every stage: what differs is the model (and which of its variables
    are trainable), the loss and the data. `evaluation` = `(logits_fn, labeled_classes)` of a
    student stage turns on `--eval_every` and `--epoch_selection` (see `epoch_evaluation`).
    """
    from mtkd_jax import optim, train

    config = ctx.config
    batches_for_epoch, steps = training_batches(ctx, split, stage, labeled=labeled)
    optimizer = optim.make_optimizer(
        name=config.optimizer,
        learning_rate=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        epochs=epochs,
        warmup_epochs=min(config.warmup_epochs, epochs - 1),
        warmup_lr=config.warmup_lr,
        steps_per_epoch=steps,
    )
    trainable, non_trainable = train.model_variables(model)
    state = train.init_train_state(
        trainable, non_trainable, optimizer, seed=config.seed, mesh=ctx.mesh
    )
    step = train.make_train_step(loss_fn, optimizer, ctx.mesh, frozen=frozen)
    eval_fn, eval_every, selector = None, 0, None
    if evaluation is not None:
        eval_fn, eval_every, selector = epoch_evaluation(ctx, stage, *evaluation)
    print(
        f"[{stage}] {len(split)} {'labeled' if labeled else 'unlabeled'} images, {epochs} epochs "
        f"x {steps} steps of {config.batch_size}, "
        f"{sum(int(np.prod(v.shape)) for v in model.trainable_variables):,} trainable parameters"
    )
    state = train.fit(
        state,
        step,
        batches_for_epoch,
        num_epochs=epochs,
        steps_per_epoch=steps,
        workdir=ctx.workdir,
        stage_name=stage,
        resume=config.resume,
        log_every=config.log_every,
        metadata={"config": dataclasses.asdict(config)},
        eval_fn=eval_fn,
        eval_every=eval_every,
    )
    train.assign_to_model(model, state.trainable, state.non_trainable)
    if selector is not None and selector.trainable is not None:
        train.assign_to_model(model, selector.trainable, selector.non_trainable)
        ctx.results.setdefault("epoch_selection", {})[stage] = selector.summary()
        print(f"[{stage}] keeping epoch {selector.epoch + 1} of {epochs} "
              f"({selector.criterion} accuracy {100 * selector.score:.2f})")  # fmt: skip
    # One compilation per stage is the contract (fixed batch shapes); recorded for the record.
    ctx.results.setdefault("train_step_compilations", {})[stage] = step.trace_count
    return model


def epoch_evaluation(ctx: Context, stage: str, logits_fn, labeled_classes: np.ndarray):
    """`(eval_fn, eval_every, selector)` for `train.fit` from `--eval_every` and
    `--epoch_selection`; `(None, 0, None)` when neither asks for evaluations.

    `eval_fn(state, epoch)` returns the test accuracies ("base", "novel", "hm", "all") on the
    epochs `--eval_every` asks for and, with a selection, the criterion's score every epoch:
    "val" (accuracy among `labeled_classes` on the few-shot validation images) or "test_base"
    (accuracy among the base classes on their test images). `selector` (an
    `mtkd_jax.selection.EpochSelector`, or None) then holds the best epoch's variables.
    """
    from mtkd_jax import selection, train
    from mtkd_jax.data import pipeline

    config = ctx.config
    criterion = config.epoch_selection
    if criterion == "last" and not config.eval_every:
        return None, 0, None
    selector = None
    if criterion != "last":
        selector = selection.EpochSelector(criterion, stage, ctx.workdir)
        resuming = config.resume and checkpoint.latest(
            checkpoint.checkpoint_dir(ctx.workdir), stage
        )
        if not (resuming or (config.resume and checkpoint.is_finished(ctx.workdir, stage))):
            selector.discard()
        elif selector.restore():
            print(f"[{stage}] best epoch so far: {selector.epoch + 1} ({criterion})")
    step = train.make_predict_step(logits_fn, ctx.mesh)
    val_split = None
    if criterion == "val":
        _, val = ctx.dataset.few_shot(config.shots, config.seed)
        val_split = val.subset(np.flatnonzero(np.isin(val.labels, labeled_classes)))

    def predict(split):
        batches = pipeline.make_batches(
            split,
            image_size=ctx.image_size,
            batch_size=config.eval_batch_size,
            training=False,
            labeled=True,
            strict=config.strict_data,
        )
        return train.predict(step, variables, batches, ctx.mesh)

    def eval_fn(state, epoch):
        nonlocal variables
        variables = (state.trainable, state.non_trainable)
        results = {}
        every = config.eval_every and (epoch + 1) % config.eval_every == 0
        if every or criterion == "test_base":
            logits, labels = predict(ctx.dataset.split("test"))
            if every:
                results.update(base_novel_accuracies(logits, labels, ctx.dataset,
                                                     config.base_to_novel))  # fmt: skip
            if criterion == "test_base":
                results["test_base"] = accuracy(logits, labels, ctx.dataset.class_ids("base"))
        if criterion == "val":
            logits, labels = predict(val_split)
            results["val"] = accuracy(logits, labels, labeled_classes)
        if selector is not None:
            score = selector.score_of(results)
            if score > selector.score:
                selector.update(epoch, score, *[[np.asarray(train._host(v)) for v in part]
                                                for part in variables])  # fmt: skip
            results["selected_epoch"] = selector.epoch
        variables = None  # The state's buffers are donated to the next step: keep nothing.
        return {k: v for k, v in results.items() if not (isinstance(v, float) and np.isnan(v))}

    variables = None
    return eval_fn, (1 if selector is not None else config.eval_every), selector


def teacher_logits_fn(ctx: Context, teacher, text_features: np.ndarray):
    """`fn((trainable, non_trainable), images) -> [batch, C]` teacher logits, for evaluation."""
    import jax.numpy as jnp

    text, logits = jnp.asarray(text_features), stages.teacher_logits_fn(teacher)
    return lambda variables, images: logits(variables, images, text, ctx.logit_scale)


def student_logits_fn(ctx: Context, student):
    """`fn((trainable, non_trainable), images) -> [batch, C]` student logits, for evaluation."""
    import jax.numpy as jnp

    text = jnp.asarray(ctx.text_features)

    def fn(variables, images):
        features, _ = student.stateless_call(*variables, images, training=False)
        return stages.class_logits(features, text, ctx.logit_scale)

    return fn


def text_features_of(teacher, token_ids: np.ndarray) -> np.ndarray:
    """Normalised class text features `[C, D]` (float32) of `teacher` for `token_ids`."""
    import jax

    from mtkd_jax import train

    features = jax.jit(teacher.stateless_encode_text)(*train.model_variables(teacher), token_ids)
    return np.asarray(stages.normalize(features))


def run_teacher_stage(ctx: Context) -> None:
    """Stage 0: deep-prompt tuning of the teacher on the K-shot labels; writes its prompts."""
    import jax.numpy as jnp

    config, dataset, teacher = ctx.config, ctx.dataset, ctx.teacher
    if not teacher.prompt_variables():
        raise InputError(
            "Stage 0 tunes the teacher's deep prompts, and this teacher has none: set "
            "--teacher_prompt_length and --teacher_prompt_depth above 0."
        )
    plain = plain_copy(teacher)
    teacher.freeze_encoders()
    few_shot, _ = dataset.few_shot(config.shots, config.seed)
    split = dataset.subsample(few_shot, "base" if config.base_to_novel else "all")
    names = [dataset.classnames[i] for i in ctx.trained_classes]
    template = dataset.templates[0]
    frozen = {
        "token_ids": jnp.asarray(class_token_ids(teacher, ctx.tokenizer, names, template)),
        "plain_text": jnp.asarray(
            text_features_of(plain, class_token_ids(plain, ctx.tokenizer, names, template))
        ),
        "label_map": jnp.asarray(ctx.label_map()),
        "scale": jnp.float32(ctx.logit_scale),
    }
    loss_fn = stages.teacher_prompt_loss(
        teacher,
        plain,
        shared_values(plain, teacher),
        regularise=config.prompt_regularisation,
        text_weight=config.prompt_reg_text_weight,
        image_weight=config.prompt_reg_image_weight,
        logit_weight=config.prompt_reg_logit_weight,
    )
    fit_stage(
        ctx, "stage0", teacher, loss_fn, frozen, split, labeled=True, epochs=config.epochs_for("0")
    )
    save_prompts(teacher, ctx.workdir / TEACHER_PROMPTS_FILE)


# The embedded students, built from random weights and trained whole. `tiny_resnet` (the
# demo's) is keras-hub's ResNet in a small shape: 14.5 MFLOPs per 32-px image against the shapes
# teacher's 121 (XLA's count, `student.measured_flops`), 8x fewer. `tiny_vit` is a 2-layer CLIP
# ViT (7.6x fewer); it exercises the CLIP-student path (prompts, `clip_student`) in smoke runs.
TINY_RESNET = {
    "input_conv_filters": [64], "input_conv_kernel_sizes": [3], "stackwise_num_filters": [64, 128],
    "stackwise_num_blocks": [1, 1], "stackwise_num_strides": [1, 2], "block_type": "basic_block",
}  # fmt: skip
TINY_VIT = {
    "embed_dim": 64, "image_size": 32, "patch_size": 4, "vision_width": 64, "vision_layers": 2,
    "vision_heads": 2, "text_width": 64, "text_layers": 1, "text_heads": 2,
}  # fmt: skip


def build_student(ctx: Context, *, adapter: bool):
    """A fresh student for `--student`, with the residual adapter in use for stage 2.

    `tiny_resnet` (the demo's) and `tiny_vit` are trained whole from random weights;
    `clip:<source>` is the paper's frozen CLIP image encoder with visual deep prompts;
    `keras_hub:<preset>` a light keras-hub backbone trained whole.
    """
    from mtkd_jax import student as student_lib
    from mtkd_jax.clip import CLIPConfig
    from mtkd_jax.clip.load import load as load_clip

    config, spec = ctx.config, ctx.config.student
    # Seeded here, not drawn from Keras's global stream in turn: every student of the run (each
    # stage-1 variant, the supervised baseline) starts from the same initial weights.
    _import_keras().utils.set_random_seed(student_init_seed(config.seed))
    common = dict(
        use_adapter=adapter,
        adapter_reduction=config.reduction,
        adapter_ratio=config.residual_ratio,
        dtype=_model_dtype(config),
    )
    teacher_dim = ctx.teacher.config.embed_dim
    if spec == "tiny_vit":
        vit = CLIPConfig(**{**TINY_VIT, "image_size": ctx.image_size})
        student = student_lib.clip_student(
            vit,
            teacher_dim,
            prompt_length=config.student_prompt_length,
            prompt_depth=config.student_prompt_depth,
            **common,
        )
        if not adapter:  # From scratch: the whole encoder learns in stage 1.
            for layer in student.encoder.encoder_layers():
                layer.trainable = True
        return student
    if spec == "tiny_resnet":
        import keras_hub

        backbone = keras_hub.models.ResNetBackbone(
            **{**TINY_RESNET, "image_shape": (ctx.image_size, ctx.image_size, 3)},
            dtype=_model_dtype(config),
        )
        return student_lib.backbone_student(backbone, teacher_dim, **common)
    if spec.startswith("clip:"):
        clip = load_clip(spec[len("clip:") :], dtype=_model_dtype(config) or "float32")
        return student_lib.clip_student(
            clip,
            teacher_dim,
            prompt_length=config.student_prompt_length,
            prompt_depth=config.student_prompt_depth,
            **common,
        )
    if spec.startswith("keras_hub:"):
        return student_lib.backbone_student(spec[len("keras_hub:") :], teacher_dim, **common)
    raise InputError(f"Unknown --student={spec!r}. Valid kinds: {', '.join(STUDENT_KINDS)}.")


def unlabeled_pool(ctx: Context):
    """Stage-1 images: the K-shot training set or the whole training split (labels unused)."""
    if ctx.config.unlabeled_pool == "train":
        return ctx.dataset.split("train")
    few_shot, _ = ctx.dataset.few_shot(ctx.config.pool_shots, ctx.config.seed)
    return few_shot


def run_distillation_stage(ctx: Context, stage: str, loss_weights) -> object:
    """Stage 1: distil the teacher into a fresh student on unlabeled images; returns it."""
    import jax.numpy as jnp

    from mtkd_jax import train

    config = ctx.config
    student = build_student(ctx, adapter=False)
    frozen = {
        "teacher": train.model_variables(ctx.teacher),
        "text": jnp.asarray(ctx.text_features),
        "scale": jnp.float32(ctx.logit_scale),
    }
    loss_fn = stages.distillation_loss(
        student,
        ctx.teacher,
        temperatures=config.temperatures,
        weights=loss_weights,
        kd_weight=config.kd_weight,
    )
    fit_stage(
        ctx,
        stage,
        student,
        loss_fn,
        frozen,
        unlabeled_pool(ctx),
        labeled=False,
        epochs=config.epochs_for("1"),
        evaluation=(student_logits_fn(ctx, student), ctx.trained_classes),
    )
    save_weights_atomic(student, ctx.workdir / f"student_{stage}.weights.h5")
    return student


def run_classification_stage(ctx: Context, stage: str, student, *, epochs: int) -> object:
    """Cross-entropy on the K-shot labeled images of the trained classes (stage 2, baseline)."""
    import jax.numpy as jnp

    config = ctx.config
    few_shot, _ = ctx.dataset.few_shot(config.shots, config.seed)
    classes = ctx.stage2_classes
    split = few_shot.subset(np.flatnonzero(np.isin(few_shot.labels, classes)))
    frozen = {
        "text": jnp.asarray(ctx.text_features[classes]),
        "scale": jnp.float32(ctx.logit_scale),
        "label_map": jnp.asarray(ctx.label_map(classes)),
    }
    loss_fn = stages.classification_loss(student)
    fit_stage(ctx, stage, student, loss_fn, frozen, split, labeled=True, epochs=epochs,
              evaluation=(student_logits_fn(ctx, student), classes))  # fmt: skip
    save_weights_atomic(student, ctx.workdir / f"student_{stage}.weights.h5")
    return student


def stage1_weights(workdir: Path, config: RunConfig) -> Path:
    """The stage-1 student of `workdir`, or one clear error naming the command to make it."""
    path = workdir / "student_stage1.weights.h5"
    if not path.is_file() or not checkpoint.is_finished(workdir, "stage1"):
        command = (
            f"python -m mtkd_jax.main --stage=1 --dataset={config.dataset} "
            f"--shots={config.shots} --seed={config.seed} --workdir={workdir}"
        )
        raise FileNotFoundError(
            f"Stage 2 needs the stage-1 student in {workdir} ({path.name} and a finished "
            f"stage1), and it is not there. Make it with:\n  {command}"
        )
    return path


def run_adapter_stage(ctx: Context):
    """Stage 2: freeze the stage-1 student, switch on its residual adapter, train only that."""
    student = build_student(ctx, adapter=True)
    student.load_weights(str(stage1_weights(ctx.workdir, ctx.config)))
    return run_classification_stage(ctx, "stage2", student, epochs=ctx.config.epochs_for("2"))


def _supervised_student(ctx: Context):
    """The baseline: the same student architecture, trained on the K labeled shots alone."""
    return build_student(ctx, adapter=False)


# ---------------------------------------------------------------------------------------------
# The run


def _stages_to_run(config: RunConfig) -> list[str]:
    return ["0", "1", "2"] if config.stage == "all" else [config.stage]


def _stage_names(config: RunConfig) -> list[str]:
    """The names under which this run's stages checkpoint (baselines included)."""
    names = []
    for stage in _stages_to_run(config):
        names.append(f"stage{stage}")
        if stage == "1" and "instance_only" in config.baselines:
            names.append("stage1_instance_only")
        if stage == "2" and "supervised" in config.baselines:
            names.append("supervised")
    return names


def _prepare_workdir(config: RunConfig) -> Path:
    """Claims the workdir and records the flags; never overwrites finished work silently.

    A workdir that already holds checkpoints of the stages this run would train is refused
    before anything is written, unless `--resume` (continue, reusing finished stages) or
    `--overwrite` (start those stages afresh: `--stage=all` removes the run layout's files, a
    single stage removes only its own checkpoints). Only a workdir that carries mtkd_jax's
    marker is ever cleared, and only of what mtkd_jax writes (`mtkd_jax.workdir`). Other
    stages' work (stage 1 when running stage 2) is what this run builds on and is left alone.
    """
    from mtkd_jax import workdir as workdir_lib

    workdir = workdir_lib.claim(config.workdir, overwrite=config.overwrite)
    if config.overwrite and config.stage == "all":
        removed = workdir_lib.remove_run(workdir)
        if removed:
            print(f"--overwrite: removed {', '.join(removed)} from {workdir}")
    elif config.overwrite:
        directory = checkpoint.checkpoint_dir(workdir)
        names = _stage_names(config)
        print(f"--overwrite: removing the checkpoints of {', '.join(names)} in {workdir}")
        for name in names:
            for path in checkpoint.list_checkpoints(directory, name):
                path.unlink()
            checkpoint.finished_marker(workdir, name).unlink(missing_ok=True)
    elif not config.resume:
        directory = checkpoint.checkpoint_dir(workdir)
        used = [
            name
            for name in _stage_names(config)
            if checkpoint.latest(directory, name) is not None
            or checkpoint.is_finished(workdir, name)
        ]
        if used:
            raise FileExistsError(
                f"{workdir} already holds {', '.join(used)} of an earlier run. Nothing is "
                "overwritten silently: pass --resume to continue it (finished stages are reused), "
                "--overwrite to start afresh, or choose another --workdir."
            )
    atomic.write_json(workdir / "flags.json", dataclasses.asdict(config))
    return workdir


def _limit_data_threads(threads: int) -> None:
    """Caps TensorFlow's op threads (the input pipeline's) before TensorFlow starts; 0: as is."""
    import sys

    if not threads:
        return
    if "tensorflow" not in sys.modules:
        os.environ["TF_NUM_INTRAOP_THREADS"] = os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
        return
    tf = sys.modules["tensorflow"]
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        logger.warning("TensorFlow is already running; --data_threads=%d has no effect.", threads)


def _check_devices(config: RunConfig, mesh) -> None:
    devices = mesh.devices.size
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(config, name)
        if value % devices:
            raise InputError(
                f"--{name}={value} does not split evenly over the {devices} devices; choose a "
                f"multiple of {devices} (e.g. --{name}={devices * max(1, value // devices)})."
            )


def _teacher_prompts_source(config: RunConfig, workdir: Path) -> Path | None:
    """Where stage 1 takes the teacher's prompts from (None: the teacher has none)."""
    if config.teacher_prompts:
        return Path(config.teacher_prompts)
    saved = workdir / TEACHER_PROMPTS_FILE
    if saved.is_file():
        return saved
    if config.teacher_prompt_length == 0:
        return None
    raise FileNotFoundError(
        f"Stage 1 needs a prompt-tuned teacher and {workdir} has no {TEACHER_PROMPTS_FILE}. "
        "Run stage 0 first (python -m mtkd_jax.main --stage=0 with the same --dataset, --shots, "
        "--seed and --workdir), pass --teacher_prompts=<PromptKD model-best.pth.tar>, or set "
        "--teacher_prompt_length=0 to distil the plain CLIP."
    )


def _load_teacher_prompts(ctx: Context, source: Path) -> None:
    """Puts stage-0 prompts (ours, .npz) or a PromptKD/PromptSRC checkpoint onto the teacher."""
    if source.suffix == ".npz":
        load_prompts(ctx.teacher, source)
        return
    from mtkd_jax.clip.load import load as load_clip

    ctx.teacher = load_clip(ctx.config.teacher, prompts=str(source), dtype=ctx.teacher.dtype_policy)


def _set_class_features(ctx: Context) -> None:
    """Computes the teacher's class text features once and stores them in the workdir."""
    dataset = ctx.dataset
    token_ids = class_token_ids(
        ctx.teacher, ctx.tokenizer, dataset.classnames, dataset.templates[0]
    )
    ctx.text_features = text_features_of(ctx.teacher, token_ids)
    save_npz_atomic(
        ctx.workdir / TEXT_FEATURES_FILE,
        text_features=ctx.text_features,
        logit_scale=np.float32(ctx.logit_scale),
        classnames=np.asarray(dataset.classnames, dtype=str),
    )


def run(config: RunConfig) -> dict:
    """Runs the stages of `config` end to end; returns the results (also in results.json)."""
    _limit_data_threads(config.data_threads)  # Before anything imports TensorFlow.
    config = with_dataset_defaults(config)  # An empty workdir never means the current directory.
    config.validate()

    def join_processes():  # before JAX starts its backends, as jax.distributed requires
        distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
            local_device_ids=config.local_device_ids,
        )

    # TensorFlow, Keras and JAX without accelerator-probing noise.
    quiet.start_quietly(before_backends=join_processes if config.multihost else None)
    keras = _import_keras()
    from mtkd_jax import train
    from mtkd_jax.clip.load import load_tokenizer

    workdir = Path(config.workdir)
    if config.stage == "2":
        stage1_weights(workdir, config)  # Before any work: stage 2 builds on a finished stage 1.
    # Process 0 checks and prepares the workdir (shared storage) while the others wait.
    distributed.on_primary(lambda: _prepare_workdir(config), what="preparing the workdir")
    from mtkd_jax.data import images

    images.reset_skipped()
    keras.utils.set_random_seed(config.seed)
    mesh = train.make_mesh()
    _check_devices(config, mesh)
    dataset = distributed.primary_first(lambda: load_data(config), what="loading the dataset")
    stages_to_run = _stages_to_run(config)
    run_stage0 = "0" in stages_to_run and not (config.stage == "all" and config.teacher_prompts)
    prompt_length = config.teacher_prompt_length
    teacher = build_teacher(
        config, prompt_length, config.teacher_prompt_depth if prompt_length else 0
    )
    tokenizer = load_tokenizer(None if config.teacher == "shapes" else config.teacher)
    ctx = Context(
        config=config,
        workdir=workdir,
        mesh=mesh,
        dataset=dataset,
        teacher=teacher,
        tokenizer=tokenizer,
        image_size=config.image_size or teacher.config.image_size,
        logit_scale=float(np.asarray(teacher.logit_scale.value)),
    )
    previous = workdir / RESULTS_FILE
    if previous.is_file():
        with open(previous) as file:
            ctx.results = json.load(file)
    ctx.results.update(
        dataset=config.dataset,
        shots=config.shots,
        seed=config.seed,
        config=dataclasses.asdict(config),
        devices=int(mesh.devices.size),
        processes=distributed.process_count(),
    )
    ctx.results.setdefault("methods", {})
    ctx.results["finished"] = False  # Until finish(): a sweep neither skips nor averages it.
    print(
        f"mtkd_jax: {config.dataset} ({dataset.num_classes} classes, source {dataset.source}), "
        f"{config.shots} shots, seed {config.seed}, stages {','.join(stages_to_run)}, "
        f"{mesh.devices.size} device(s), workdir {workdir}"
    )

    if "zero_shot" in config.baselines:
        _evaluate_zero_shot(ctx)
    if run_stage0:
        run_teacher_stage(ctx)
    elif "1" in stages_to_run or "2" in stages_to_run:
        source = _teacher_prompts_source(config, workdir)
        if source is not None:
            _load_teacher_prompts(ctx, source)
    if run_stage0 or "1" in stages_to_run or "2" in stages_to_run:
        _set_class_features(ctx)  # The teacher is final from here on: its features, once.
        teacher_fn = teacher_logits_fn(ctx, ctx.teacher, ctx.text_features)
        accuracies = evaluate_method(ctx, "teacher", teacher_fn, train.model_variables(ctx.teacher))
        if run_stage0:
            ctx.results["methods"]["teacher_stage0"] = dict(accuracies)

    if "1" in stages_to_run:
        student = run_distillation_stage(ctx, "stage1", config.loss_weights)
        evaluate_method(ctx, "student_stage1", student_logits_fn(ctx, student),
                        train.model_variables(student))  # fmt: skip
        if "instance_only" in config.baselines:
            ablation = run_distillation_stage(ctx, "stage1_instance_only", (1.0, 0.0, 0.0))
            evaluate_method(ctx, "student_stage1_instance_only", student_logits_fn(ctx, ablation),
                            train.model_variables(ablation))  # fmt: skip
    if "2" in stages_to_run:
        student = run_adapter_stage(ctx)
        evaluate_method(ctx, "student_stage2", student_logits_fn(ctx, student),
                        train.model_variables(student))  # fmt: skip
        if config.export:
            export_student(ctx, student)
        if "supervised" in config.baselines:
            baseline = run_classification_stage(
                ctx, "supervised", _supervised_student(ctx), epochs=config.epochs_for("supervised")
            )
            evaluate_method(ctx, "student_supervised", student_logits_fn(ctx, baseline),
                            train.model_variables(baseline))  # fmt: skip
    finish(ctx)
    return ctx.results


def _evaluate_zero_shot(ctx: Context) -> None:
    """The teacher without any prompt, on the dataset's template: CLIP's zero-shot accuracy."""
    from mtkd_jax import train

    plain = plain_copy(ctx.teacher)
    names, template = ctx.dataset.classnames, ctx.dataset.templates[0]
    text = text_features_of(plain, class_token_ids(plain, ctx.tokenizer, names, template))
    evaluate_method(
        ctx, "teacher_zero_shot", teacher_logits_fn(ctx, plain, text), train.model_variables(plain)
    )


def finish(ctx: Context) -> None:
    """Writes results.json (now marked finished) and results.png; prints the results table."""
    ctx.results["finished"] = True
    write_results(ctx)
    plot = ctx.workdir / PLOT_FILE
    distributed.on_primary(lambda: report.plot_results(ctx.results, plot), what=f"writing {plot}")
    print(report.format_results_table(ctx.results))
    print(f"Results: {ctx.workdir / RESULTS_FILE}, plot: {ctx.workdir / PLOT_FILE}")


def export_student(ctx: Context, student) -> Path:
    """Writes `<workdir>/student.keras`: the deployable student with its classes."""
    from mtkd_jax.export import export_classifier

    path = ctx.workdir / EXPORT_FILE
    distributed.on_primary(
        lambda: export_classifier(
            student,
            ctx.text_features,
            ctx.logit_scale,
            list(ctx.dataset.classnames),
            ctx.image_size,
            path,
        ),
        what=f"exporting {path}",
    )
    print(f"[export] {path} (predict with: python -m mtkd_jax.predict --model={path} IMAGE...)")
    return path
