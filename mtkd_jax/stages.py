"""The stages of a run, each one value: what it builds, trains, reads, writes and reports.

`mtkd_jax.experiment.run` is a loop over `selected(config)`; every stage that trains is
trained by the same loop (`mtkd_jax.train.fit`). A stage's name is its only spelling: the
checkpoints (`checkpoints/<name>-*.npz`), the metrics lines, the weights file
(`student_<name>.weights.h5`) and the results key (`<model>_<name>`) derive from it, and the
`--stage` and `--baselines` choices derive from the stages' `steps` and `baseline`.

    stage                 --stage  trains                      data              results key
    zero_shot (baseline)  0, 1     nothing (evaluates CLIP)    -                 teacher_zero_shot
    stage0                0        the teacher's deep prompts  K labeled shots   teacher_stage0
    stage1                1        the student                 unlabeled pool    student_stage1
    stage1_instance_only  1        the student (instance KD)   stage 1's batches student_stage1_..
    stage2                2        the residual adapter        K labeled shots   student_stage2
    supervised (baseline) 2        the student                 K labeled shots   student_supervised

Each stage reads what an earlier one wrote and nothing more: stage 1 reads the stage-0 prompts
(`teacher_prompts.npz`, or `--teacher_prompts`); stage 2 and the supervised baseline read what
stage 1 wrote (`mtkd_jax.handoff`: the class text features and logit scale, the student's
architecture and weights) and never build the teacher. Adding a stage or a baseline is adding
one value to `STAGES`.

This module imports neither JAX nor Keras: the stages' functions import what they use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtkd_jax.config import RunConfig
    from mtkd_jax.experiment import Context

ALL = "all"  # --stage=all runs every step, in order


def _always(config: RunConfig) -> bool:
    del config
    return True


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage (or baseline) of a run.

    Attributes:
        name: the one spelling of the stage (checkpoints, metrics, files, results).
        steps: the `--stage` values that run it (`--stage=all` runs every stage).
        summary: what it does, in a line.
        model: "teacher" or "student": the model it trains or evaluates; with the name it
            gives the results key, `<model>_<name>`.
        trains: which variables train: "prompts" (the teacher's deep prompts), "student" (the
            student's trainable variables: prompts and projector of a CLIP student, everything
            of a light one), "adapter" (the residual adapter alone), or None (evaluates only).
        build: `build(ctx) -> model`, with its trainable variables set.
        objective: `objective(ctx, model) -> (loss_fn, frozen)`, from `mtkd_jax.objectives`.
        data: `data(ctx) -> split` of training images.
        labeled: whether its batches carry labels.
        write: `write(ctx, stage, model)`: what it stores for later stages and users.
        report: `report(ctx, stage, model)`: evaluates it into `results.json` as `stage.method`.
        evaluated_classes: `fn(ctx) -> label ids` the stage is trained on, for `--eval_every`
            and `--epoch_selection` (None: the stage takes neither).
        epochs_flag: the `RunConfig` field with its epochs (0 there means `--epochs`).
        data_stream: whose batches it reads (default: its own name); ablations of a stage read
            that stage's, so they see the same images in the same order and augmentation.
        baseline: the `--baselines` value that adds it (None: always part of its steps).
        needs_teacher: whether it needs the teacher model (only these stages ever build it).
        check_inputs: `fn(config, workdir)` raising `InputError` before any work when what the
            stage reads from an earlier run is missing; called when `reads` is not in the run.
        reads: the stage whose files it reads.
        enabled: `fn(config) -> bool`; False drops the stage from the run.
    """

    name: str
    steps: tuple[str, ...]
    summary: str
    model: str
    trains: str | None
    build: Callable[[Context], Any]
    report: Callable[[Context, Stage, Any], None]
    objective: Callable[[Context, Any], tuple[Callable, Any]] | None = None
    data: Callable[[Context], Any] | None = None
    labeled: bool = True
    write: Callable[[Context, Stage, Any], None] | None = None
    evaluated_classes: Callable[[Context], Any] | None = None
    epochs_flag: str = "epochs"
    data_stream: str = ""
    baseline: str | None = None
    needs_teacher: bool = False
    check_inputs: Callable[[RunConfig, Path], None] | None = None
    reads: str | None = None
    enabled: Callable[[RunConfig], bool] = _always

    @property
    def method(self) -> str:
        """Its key in `results.json["methods"]`."""
        return f"{self.model}_{self.name}"

    @property
    def trains_student(self) -> bool:
        return self.trains in ("student", "adapter")

    @property
    def stream(self) -> str:
        """The name whose data seed it reads."""
        return self.data_stream or self.name

    def epochs(self, config: RunConfig) -> int:
        """Its number of epochs in `config`."""
        return getattr(config, self.epochs_flag) or config.epochs

    def epoch_seed(self, seed: int, epoch: int) -> int:
        """The data seed of `epoch`: a function of (the run's seed, its data stream, epoch)
        only, so a resumed run sees what an uninterrupted one would, and every stage-1 variant
        sees stage 1's batches."""
        return int(seed) * 1_000_003 + stable_hash(self.stream) * 10_007 + epoch


def stable_hash(name: str) -> int:
    """A small stable integer per name, for seeds (never Python's salted `hash`)."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name)) % 9973


# ---------------------------------------------------------------------------------------------
# What the stages are made of. Each takes the run's `Context` (mtkd_jax.experiment).


def _plain_teacher(ctx: Context):
    from mtkd_jax import teacher

    return teacher.plain_copy(ctx.teacher)


def _report_zero_shot(ctx: Context, stage: Stage, plain) -> None:
    from mtkd_jax import teacher

    text = teacher.class_features(plain, ctx.tokenizer, ctx.dataset)
    ctx.evaluate(stage.method, ctx.teacher_logits_fn(plain, text), plain)


def _teacher_with_frozen_encoders(ctx: Context):
    from mtkd_jax.errors import InputError

    if not ctx.teacher.prompt_variables():
        raise InputError(
            "Stage 0 tunes the teacher's deep prompts, and this teacher has none: set "
            "--teacher_prompt_length and --teacher_prompt_depth above 0."
        )
    ctx.teacher.freeze_encoders()
    return ctx.teacher


def _teacher_prompt_objective(ctx: Context, prompted):
    import jax.numpy as jnp

    from mtkd_jax import objectives, teacher

    config, dataset = ctx.config, ctx.dataset
    plain = teacher.plain_copy(prompted)
    names = [dataset.classnames[i] for i in ctx.trained_classes]
    template = dataset.templates[0]
    plain_ids = teacher.class_token_ids(plain, ctx.tokenizer, names, template)
    frozen = objectives.TeacherPromptInputs(
        token_ids=jnp.asarray(teacher.class_token_ids(prompted, ctx.tokenizer, names, template)),
        plain_text=jnp.asarray(teacher.text_features_of(plain, plain_ids)),
        label_map=jnp.asarray(ctx.label_map(ctx.trained_classes)),
        scale=jnp.float32(ctx.logit_scale),
    )
    loss_fn = objectives.teacher_prompt_loss(
        prompted,
        plain,
        teacher.shared_values(plain, prompted),
        regularise=config.prompt_regularisation,
        text_weight=config.prompt_reg_text_weight,
        image_weight=config.prompt_reg_image_weight,
        logit_weight=config.prompt_reg_logit_weight,
    )
    return loss_fn, frozen


def _labeled_shots(ctx: Context):
    """The K-shot training images of the trained classes (base, or all)."""
    few_shot, _ = ctx.dataset.few_shot(ctx.config.shots, ctx.config.seed)
    return ctx.dataset.subsample(few_shot, "base" if ctx.config.base_to_novel else "all")


def _save_prompts(ctx: Context, stage: Stage, prompted) -> None:
    del stage
    from mtkd_jax import teacher, workdir

    teacher.save_prompts(prompted, ctx.workdir / workdir.TEACHER_PROMPTS_FILE)
    ctx.teacher_prompts_set = True


def _report_tuned_teacher(ctx: Context, stage: Stage, prompted) -> None:
    del prompted
    ctx.final_teacher()  # evaluates the teacher once, as "teacher"
    ctx.results["methods"][stage.method] = dict(ctx.results["methods"]["teacher"])


def _check_teacher_prompts(config: RunConfig, workdir: Path) -> None:
    from mtkd_jax import teacher

    teacher.prompts_source(config, workdir)


def _fresh_student(ctx: Context):
    """A student of `--student` with its initial weights (the run's seed), adapter off."""
    from mtkd_jax import student

    text, _ = ctx.class_features()
    return student.build_student(
        ctx.config, teacher_dim=text.shape[1], image_size=ctx.image_size, adapter=False
    )


def _distilled_student(ctx: Context):
    ctx.final_teacher()  # the teacher is final (prompts, class features) before stage 1
    return _fresh_student(ctx)


def _distillation_objective(level_weights: Callable[[RunConfig], tuple[float, ...]]):
    def objective(ctx: Context, student):
        import jax.numpy as jnp

        from mtkd_jax import objectives, train

        text, scale = ctx.class_features()
        frozen = objectives.DistillationInputs(
            teacher=train.model_variables(ctx.teacher),
            text=jnp.asarray(text),
            scale=jnp.float32(scale),
        )
        loss_fn = objectives.distillation_loss(
            student,
            ctx.teacher,
            temperatures=ctx.config.temperatures,
            weights=level_weights(ctx.config),
            kd_weight=ctx.config.kd_weight,
        )
        return loss_fn, frozen

    return objective


def _unlabeled_pool(ctx: Context):
    """Stage-1 images: the K-shot training set or the whole training split (labels unused)."""
    if ctx.config.unlabeled_pool == "train":
        return ctx.dataset.split("train")
    few_shot, _ = ctx.dataset.few_shot(ctx.config.pool_shots, ctx.config.seed)
    return few_shot


def _trained_classes(ctx: Context):
    return ctx.trained_classes


def _stage2_classes(ctx: Context):
    return ctx.stage2_classes


def _save_student(ctx: Context, stage: Stage, student) -> None:
    """`student_<stage>.weights.h5`."""
    from mtkd_jax import workdir

    workdir.write_weights(student, ctx.workdir / workdir.weights_file(stage.name))


def _save_student_for_stage2(ctx: Context, stage: Stage, student) -> None:
    """The weights and, for stage 2 to build the student from, its architecture."""
    from mtkd_jax import handoff

    _save_student(ctx, stage, student)
    handoff.write_architecture(ctx.workdir, student, image_size=ctx.image_size)


def _report_student(ctx: Context, stage: Stage, student) -> None:
    ctx.evaluate(stage.method, ctx.student_logits_fn(student), student)


def _stage1_student_with_adapter(ctx: Context):
    from mtkd_jax import handoff

    return handoff.read_student(ctx.workdir, STAGE1.name).start_adapter_stage()


def _classification_objective(ctx: Context, student):
    import jax.numpy as jnp

    from mtkd_jax import objectives

    classes = ctx.stage2_classes
    text, scale = ctx.class_features()
    frozen = objectives.ClassificationInputs(
        text=jnp.asarray(text[classes]),
        scale=jnp.float32(scale),
        label_map=jnp.asarray(ctx.label_map(classes)),
    )
    return objectives.classification_loss(student), frozen


def _stage2_shots(ctx: Context):
    """The K-shot labeled images of `--stage2_classes`."""
    import numpy as np

    few_shot, _ = ctx.dataset.few_shot(ctx.config.shots, ctx.config.seed)
    return few_shot.subset(np.flatnonzero(np.isin(few_shot.labels, ctx.stage2_classes)))


def _save_and_export_adapted_student(ctx: Context, stage: Stage, student) -> None:
    _save_student(ctx, stage, student)
    if ctx.config.export:
        ctx.export_student(student)


def _check_stage1_outputs(config: RunConfig, workdir: Path) -> None:
    from mtkd_jax import handoff

    handoff.check(workdir, config)


ZERO_SHOT = Stage(
    name="zero_shot",
    steps=("0", "1"),
    summary="CLIP without prompts on the dataset's template (evaluation only)",
    model="teacher",
    trains=None,
    baseline="zero_shot",
    needs_teacher=True,
    build=_plain_teacher,
    report=_report_zero_shot,
)
STAGE0 = Stage(
    name="stage0",
    steps=("0",),
    summary="the teacher's deep prompts learn the K labeled shots (PromptSRC)",
    model="teacher",
    trains="prompts",
    needs_teacher=True,
    build=_teacher_with_frozen_encoders,
    objective=_teacher_prompt_objective,
    data=_labeled_shots,
    write=_save_prompts,
    report=_report_tuned_teacher,
    epochs_flag="teacher_epochs",
    # --stage=all with --teacher_prompts distils those prompts instead of tuning new ones.
    enabled=lambda config: not (config.stage == ALL and config.teacher_prompts),
)
STAGE1 = Stage(
    name="stage1",
    steps=("1",),
    summary="a fresh student distils the teacher on unlabeled images (three levels)",
    model="student",
    trains="student",
    needs_teacher=True,
    build=_distilled_student,
    objective=_distillation_objective(lambda config: config.loss_weights),
    data=_unlabeled_pool,
    labeled=False,
    write=_save_student_for_stage2,
    report=_report_student,
    evaluated_classes=_trained_classes,
    reads="stage0",
    check_inputs=_check_teacher_prompts,
)
STAGE1_INSTANCE_ONLY = dataclasses.replace(
    STAGE1,
    name="stage1_instance_only",
    summary="the ablation of stage 1 with the instance level alone, on stage 1's batches",
    objective=_distillation_objective(lambda config: (1.0, 0.0, 0.0)),
    write=_save_student,  # stage 2 builds on stage 1's student, not the ablation's
    data_stream="stage1",
    baseline="instance_only",
)
STAGE2 = Stage(
    name="stage2",
    steps=("2",),
    summary="the stage-1 student, frozen, trains a residual adapter on the K labeled shots",
    model="student",
    trains="adapter",
    build=_stage1_student_with_adapter,
    objective=_classification_objective,
    data=_stage2_shots,
    write=_save_and_export_adapted_student,
    report=_report_student,
    evaluated_classes=_stage2_classes,
    epochs_flag="adapter_epochs",
    reads="stage1",
    check_inputs=_check_stage1_outputs,
)
SUPERVISED = Stage(
    name="supervised",
    steps=("2",),
    summary="the same student architecture trained on the K labeled shots alone",
    model="student",
    trains="student",
    build=_fresh_student,
    objective=_classification_objective,
    data=_stage2_shots,
    write=_save_student,
    report=_report_student,
    evaluated_classes=_stage2_classes,
    epochs_flag="supervised_epochs",
    baseline="supervised",
    reads="stage1",
    check_inputs=_check_stage1_outputs,
)

# In the order a run takes them.
STAGES = (ZERO_SHOT, STAGE0, STAGE1, STAGE1_INSTANCE_ONLY, STAGE2, SUPERVISED)
STEPS = tuple(sorted({step for stage in STAGES for step in stage.steps}))
STAGE_CHOICES = (*STEPS, ALL)  # --stage
BASELINES = tuple(stage.baseline for stage in STAGES if stage.baseline)  # --baselines


def get(name: str) -> Stage:
    """The stage called `name`."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"No stage {name!r}; stages: {', '.join(s.name for s in STAGES)}.")


def selected(config: RunConfig) -> list[Stage]:
    """The stages `config` runs (its `--stage` and `--baselines`), in order."""
    return [
        stage
        for stage in STAGES
        if (config.stage == ALL or config.stage in stage.steps)
        and (stage.baseline is None or stage.baseline in config.baselines)
        and stage.enabled(config)
    ]
