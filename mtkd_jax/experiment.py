"""One MTKD run, as a library function: `run(config) -> results`.

    data ─► stage 0 (the teacher's prompts) ─► the teacher's class text features, once ─►
    stage 1 (distil the student on unlabeled images) ─► stage 2 (adapter on K shots) ─►
    evaluation after every stage ─► results.json, results.png, the exported student

`python -m mtkd_jax.main` and the notebooks call `run`, which reads top to bottom: set up (the
workdir, the devices, the data, the teacher when a stage needs it), then train, write and
evaluate each stage of `mtkd_jax.stages.selected(config)`, then finish. What a stage builds,
trains, reads and writes is its value in `mtkd_jax.stages`; every stage is trained by the same
loop (`mtkd_jax.train.fit`, through `fit_stage` here). The workdir's files are named in
`mtkd_jax.workdir` and listed in the README, "The workdir".
"""

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from mtkd_jax import checkpoint, distributed, handoff, quiet, report, stages
from mtkd_jax import workdir as workdir_lib
from mtkd_jax.config import RunConfig, with_dataset_defaults
from mtkd_jax.errors import InputError

logger = logging.getLogger(__name__)


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
# The run's context: what every stage reads


@dataclasses.dataclass
class Context:
    """What the stages of one run read: settings, devices, data, and (when a stage needs it) the
    teacher; the class text features once the teacher is final; the results so far."""

    config: RunConfig
    workdir: Path
    mesh: object
    dataset: object
    image_size: int
    teacher: object = None  # built only when a stage of the run needs it
    tokenizer: object = None
    logit_scale: float = 0.0
    text_features: np.ndarray | None = None  # [C, D] normalised, of the final teacher
    teacher_prompts_set: bool = False  # stage 0 tuned the prompts of `teacher` in this run
    results: dict = dataclasses.field(default_factory=dict)

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

    def label_map(self, classes: np.ndarray) -> np.ndarray:
        """int32 `[C]`: original label id -> row among `classes` (-1 elsewhere)."""
        mapping = np.full(self.dataset.num_classes, -1, np.int32)
        mapping[classes] = np.arange(len(classes), dtype=np.int32)
        return mapping

    def final_teacher(self):
        """The teacher with its final prompts; on the first call, also computes its class text
        features (stored for stage 2, `mtkd_jax.handoff`) and evaluates it as "teacher"."""
        from mtkd_jax import teacher as teacher_lib

        if self.text_features is not None:
            return self.teacher
        if not self.teacher_prompts_set:
            source = teacher_lib.prompts_source(self.config, self.workdir)
            if source is not None:
                self.teacher = teacher_lib.with_prompts(self.teacher, self.config, source)
            self.teacher_prompts_set = True
        self.text_features = teacher_lib.class_features(self.teacher, self.tokenizer, self.dataset)
        handoff.write_text_features(
            self.workdir, self.text_features, self.logit_scale, self.dataset.classnames
        )
        self.evaluate("teacher", self.teacher_logits_fn(self.teacher, self.text_features),
                      self.teacher)  # fmt: skip
        return self.teacher

    def class_features(self) -> tuple[np.ndarray, float]:
        """`(text_features [C, D], logit_scale)` of the final teacher: computed in this run, or
        read from what stage 1 stored."""
        if self.text_features is None:
            self.text_features, self.logit_scale = handoff.read_text_features(
                self.workdir, self.dataset.classnames
            )
        return self.text_features, self.logit_scale

    def teacher_logits_fn(self, teacher, text_features: np.ndarray):
        """`fn((trainable, non_trainable), images) -> [batch, C]` teacher logits."""
        import jax.numpy as jnp

        from mtkd_jax import objectives

        text, logits = jnp.asarray(text_features), objectives.teacher_logits_fn(teacher)
        return lambda variables, images: logits(variables, images, text, self.logit_scale)

    def student_logits_fn(self, student):
        """`fn((trainable, non_trainable), images) -> [batch, C]` student logits."""
        import jax.numpy as jnp

        from mtkd_jax import objectives

        text, scale = self.class_features()
        text = jnp.asarray(text)

        def fn(variables, images):
            features, _ = student.stateless_call(*variables, images, training=False)
            return objectives.class_logits(features, text, scale)

        return fn

    def evaluate(self, method: str, logits_fn, model) -> dict[str, float]:
        """Evaluates `model` on the test split and records it as `method` in the results."""
        from mtkd_jax import train

        started = time.perf_counter()
        logits, labels = predict_test_logits(self, logits_fn, train.model_variables(model))
        accuracies = report.base_novel_accuracies(
            logits, labels, self.dataset, self.config.base_to_novel
        )
        accuracies["test_images"] = int(len(labels))
        self.results.setdefault("methods", {})[method] = accuracies
        shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in accuracies.items() if k != "test_images")
        print(f"[eval] {method}: {shown} ({len(labels)} test images, "
              f"{time.perf_counter() - started:.1f}s)")  # fmt: skip
        write_results(self)
        return accuracies

    def export_student(self, student) -> Path:
        """Writes `<workdir>/student.keras`: the deployable student with its classes."""
        from mtkd_jax.export import export_classifier

        path = self.workdir / workdir_lib.EXPORT_FILE
        text, scale = self.class_features()
        distributed.on_primary(
            lambda: export_classifier(
                student, text, scale, list(self.dataset.classnames), self.image_size, path
            ),
            what=f"exporting {path}",
        )
        print(f"[export] {path} (predict with: python -m mtkd_jax.predict --model={path} "
              "IMAGE...)")  # fmt: skip
        return path


# ---------------------------------------------------------------------------------------------
# Data and evaluation


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


def training_batches(ctx: Context, stage: stages.Stage, split):
    """`batches_for_epoch(epoch)` for `train.fit`, and the steps per epoch.

    The data of an epoch is a function of (seed, the stage's data stream, epoch) only, so a
    resumed run sees what an uninterrupted one would. Unlabeled batches carry no "labels" key.
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
            seed=stage.epoch_seed(ctx.config.seed, epoch),
            labeled=stage.labeled,
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


def write_results(ctx: Context) -> None:
    """Writes `results.json` (atomically) with what has been measured so far; by process 0."""
    from mtkd_jax.data import images

    ctx.results["skipped_images"] = images.skipped_images()  # {path: reason}, --nostrict_data
    workdir_lib.write_json(ctx.workdir / workdir_lib.RESULTS_FILE, ctx.results)


# ---------------------------------------------------------------------------------------------
# Training one stage


def fit_stage(ctx: Context, stage: stages.Stage, model, loss_fn, frozen) -> None:
    """Trains `model`'s trainable variables with `loss_fn` on `stage.data(ctx)` by the shared
    loop, and puts the trained (or, with `--epoch_selection`, the selected) values in `model`.

    The same function serves every stage: what differs is the model (and which of its variables
    are trainable), the loss and the data. A stage with `evaluated_classes` takes
    `--eval_every` and `--epoch_selection` (see `epoch_evaluation`).
    """
    from mtkd_jax import optim, train

    config, epochs, split = ctx.config, stage.epochs(ctx.config), stage.data(ctx)
    batches_for_epoch, steps = training_batches(ctx, stage, split)
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
    if stage.evaluated_classes is not None:
        eval_fn, eval_every, selector = epoch_evaluation(
            ctx, stage.name, ctx.student_logits_fn(model), stage.evaluated_classes(ctx)
        )
    print(
        f"[{stage.name}] {len(split)} {'labeled' if stage.labeled else 'unlabeled'} images, "
        f"{epochs} epochs x {steps} steps of {config.batch_size}, "
        f"{sum(int(np.prod(v.shape)) for v in model.trainable_variables):,} trainable parameters"
    )
    state = train.fit(
        state,
        step,
        batches_for_epoch,
        num_epochs=epochs,
        steps_per_epoch=steps,
        workdir=ctx.workdir,
        stage_name=stage.name,
        resume=config.resume,
        log_every=config.log_every,
        metadata={"config": dataclasses.asdict(config)},
        eval_fn=eval_fn,
        eval_every=eval_every,
    )
    train.assign_to_model(model, state.trainable, state.non_trainable)
    if selector is not None and selector.trainable is not None:
        train.assign_to_model(model, selector.trainable, selector.non_trainable)
        ctx.results.setdefault("epoch_selection", {})[stage.name] = selector.summary()
        print(f"[{stage.name}] keeping epoch {selector.epoch + 1} of {epochs} "
              f"({selector.criterion} accuracy {100 * selector.score:.2f})")  # fmt: skip
    # One compilation per stage is the contract (fixed batch shapes); recorded for the record.
    ctx.results.setdefault("train_step_compilations", {})[stage.name] = step.trace_count


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
                results.update(report.base_novel_accuracies(logits, labels, ctx.dataset,
                                                            config.base_to_novel))  # fmt: skip
            if criterion == "test_base":
                results["test_base"] = report.accuracy(
                    logits, labels, ctx.dataset.class_ids("base")
                )
        if criterion == "val":
            logits, labels = predict(val_split)
            results["val"] = report.accuracy(logits, labels, labeled_classes)
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


# ---------------------------------------------------------------------------------------------
# The run


def run(config: RunConfig) -> dict:
    """Runs the stages of `config` end to end; returns the results (also in results.json)."""
    _limit_data_threads(config.data_threads)  # Before anything imports TensorFlow.
    config = with_dataset_defaults(config)  # An empty workdir never means the current directory.
    config.validate()
    selected = stages.selected(config)
    check_inputs(config, selected)  # Before any work: what the stages read from earlier runs.
    _start(config)
    ctx = setup(config, selected)
    for stage in selected:
        run_stage(ctx, stage)
    finish(ctx)
    return ctx.results


def check_inputs(config: RunConfig, selected: list[stages.Stage]) -> None:
    """Raises `InputError` (with the command that makes it) when a stage would read what an
    earlier run has not written into the workdir."""
    names = {stage.name for stage in selected}
    for stage in selected:
        if stage.check_inputs is not None and stage.reads not in names:
            stage.check_inputs(config, Path(config.workdir))


def _start(config: RunConfig) -> None:
    """Joins the other processes (`--multihost`), and starts TensorFlow, Keras and JAX without
    accelerator-probing noise."""

    def join_processes():  # before JAX starts its backends, as jax.distributed requires
        distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
            local_device_ids=config.local_device_ids,
        )

    quiet.start_quietly(before_backends=join_processes if config.multihost else None)
    _import_keras()


def setup(config: RunConfig, selected: list[stages.Stage]) -> Context:
    """The workdir, the devices, the data, the teacher (only when a stage needs it) and the
    results so far, as the stages' `Context`."""
    from mtkd_jax import teacher as teacher_lib
    from mtkd_jax import train
    from mtkd_jax.data import images

    # Process 0 checks and prepares the workdir (shared storage) while the others wait.
    distributed.on_primary(lambda: workdir_lib.prepare(config), what="preparing the workdir")
    workdir = Path(config.workdir)
    images.reset_skipped()
    _import_keras().utils.set_random_seed(config.seed)
    mesh = train.make_mesh()
    _check_devices(config, mesh)
    dataset = distributed.primary_first(lambda: load_data(config), what="loading the dataset")
    teacher = tokenizer = None
    if any(stage.needs_teacher for stage in selected):
        teacher = teacher_lib.build_teacher(config)
        tokenizer = teacher_lib.build_tokenizer(config)
        image_size = config.image_size or teacher.config.image_size
    else:  # Stage 2 alone: the student's image size as stage 1 trained it.
        image_size = config.image_size or handoff.read_architecture(workdir)["image_size"]
    ctx = Context(
        config=config,
        workdir=workdir,
        mesh=mesh,
        dataset=dataset,
        image_size=image_size,
        teacher=teacher,
        tokenizer=tokenizer,
        logit_scale=0.0 if teacher is None else float(np.asarray(teacher.logit_scale.value)),
        results=_previous_results(workdir),
    )
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
        f"{config.shots} shots, seed {config.seed}, stages "
        f"{','.join(stage.name for stage in selected)}, {mesh.devices.size} device(s), "
        f"workdir {workdir}"
    )
    return ctx


def run_stage(ctx: Context, stage: stages.Stage) -> None:
    """Builds what `stage` trains, trains it, writes what it leaves, and evaluates it."""
    model = stage.build(ctx)
    if stage.trains is not None:
        loss_fn, frozen = stage.objective(ctx, model)
        fit_stage(ctx, stage, model, loss_fn, frozen)
        stage.write(ctx, stage, model)
    stage.report(ctx, stage, model)


def finish(ctx: Context) -> None:
    """Writes results.json (now marked finished) and results.png; prints the results table."""
    ctx.results["finished"] = True
    write_results(ctx)
    plot = ctx.workdir / workdir_lib.PLOT_FILE
    distributed.on_primary(lambda: report.plot_results(ctx.results, plot), what=f"writing {plot}")
    print(report.format_results_table(ctx.results))
    print(f"Results: {ctx.workdir / workdir_lib.RESULTS_FILE}, plot: {plot}")


def _previous_results(workdir: Path) -> dict:
    """The results an earlier stage wrote into `workdir` (e.g. stage 1's teacher), or {}."""
    path = workdir / workdir_lib.RESULTS_FILE
    if not path.is_file():
        return {}
    with open(path) as file:
        return json.load(file)


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
