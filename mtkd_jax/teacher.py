"""The teacher of a run: its CLIP, its deep prompts, and the class text features it gives.

Stages 0 and 1 (and the zero-shot baseline) are the only users of the teacher; stage 2 reads
what stage 1 wrote (`mtkd_jax.handoff`) and never builds one.
"""

from pathlib import Path

import numpy as np

from mtkd_jax import workdir as workdir_lib
from mtkd_jax.config import RunConfig
from mtkd_jax.errors import InputError

PROMPTS_FILE = "teacher_prompts.npz"


def build_teacher(config: RunConfig, *, prompted: bool = True):
    """The teacher CLIP of `--teacher`, with fresh deep prompts of the configured size.

    `prompted=False`, or `--teacher_prompt_length=0`, gives the plain CLIP.
    """
    length = config.teacher_prompt_length if prompted else 0
    depth = config.teacher_prompt_depth if length else 0
    if config.teacher == "shapes":
        from mtkd_jax.shapes_clip import load_shapes_clip

        return load_shapes_clip(length, depth, dtype=config.keras_dtype)
    from mtkd_jax.clip.load import load as load_clip

    settings = None
    if length:
        settings = {
            f"{tower}_prompt_{key}": value
            for tower in ("vision", "text")
            for key, value in (("length", length), ("depth", depth))
        }
    return load_clip(config.teacher, prompts=settings, dtype=config.keras_dtype or "float32")


def build_tokenizer(config: RunConfig):
    """The tokenizer of `--teacher` (the shapes world has its own)."""
    from mtkd_jax.clip.load import load_tokenizer

    return load_tokenizer(None if config.teacher == "shapes" else config.teacher)


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


def text_features_of(teacher, token_ids: np.ndarray) -> np.ndarray:
    """Normalised class text features `[C, D]` (float32) of `teacher` for `token_ids`."""
    import jax

    from mtkd_jax import objectives, train

    features = jax.jit(teacher.stateless_encode_text)(*train.model_variables(teacher), token_ids)
    return np.asarray(objectives.normalize(features))


def class_features(teacher, tokenizer, dataset) -> np.ndarray:
    """The teacher's normalised text features `[C, D]` of every class, on the first template."""
    ids = class_token_ids(teacher, tokenizer, dataset.classnames, dataset.templates[0])
    return text_features_of(teacher, ids)


def save_prompts(teacher, path: Path) -> None:
    """Writes the teacher's deep-prompt variables to `path` (.npz keyed by variable path)."""
    workdir_lib.write_npz(path, **{v.path: np.asarray(v.value) for v in teacher.prompt_variables()})


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


def prompts_source(config: RunConfig, workdir: Path) -> Path | None:
    """Where stage 1 takes the teacher's prompts from (None: the teacher has none).

    Raises `InputError` naming the command that makes them when a prompted teacher has none.
    """
    if config.teacher_prompts:
        return Path(config.teacher_prompts)
    saved = workdir / PROMPTS_FILE
    if saved.is_file():
        return saved
    if config.teacher_prompt_length == 0:
        return None
    raise InputError(
        f"Stage 1 needs a prompt-tuned teacher and {workdir} has no {PROMPTS_FILE}. Make it "
        f"with:\n  python -m mtkd_jax.main --stage=0 --dataset={config.dataset} "
        f"--shots={config.shots} --seed={config.seed} --workdir={workdir}\nor pass "
        "--teacher_prompts=<PromptKD model-best.pth.tar>, or set --teacher_prompt_length=0 to "
        "distil the plain CLIP."
    )


def with_prompts(teacher, config: RunConfig, source: Path):
    """The teacher with stage-0 prompts (ours, .npz) or a PromptKD/PromptSRC checkpoint's."""
    if source.suffix == ".npz":
        load_prompts(teacher, source)
        return teacher
    from mtkd_jax.clip.load import load as load_clip

    return load_clip(config.teacher, prompts=str(source), dtype=teacher.dtype_policy)
