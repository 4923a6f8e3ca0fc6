"""A tiny CLIP pretrained on the shapes world: the offline demo's stand-in for web-scale CLIP.

The model is the project's own `mtkd_jax.clip.CLIP` (so the same code serves real and demo
runs, deep prompts included) in the `tiny-teacher` shape with a 16-token context. It is trained
from scratch with CLIP's symmetric contrastive loss on `render_caption_corpus` captions, which
cover every shape x colour combination ("pretraining saw the web"); base-to-novel evaluation
then asks it, zero-shot, about combinations whose labelled images the later stages never see.

Only the token-embedding rows of tokens that the corpus uses are trained and shipped (the
others are zero): training runs a compact copy of the model whose vocabulary is those tokens,
in increasing id order, so end-of-text keeps the largest id and CLIP's argmax pooling is
unchanged. The weights ship as `mtkd_jax/data/assets/shapes_clip.npz` (float16, about 3 MB),
made by

    python -m mtkd_jax.shapes_clip --out=mtkd_jax/data/assets

which also writes `shapes_clip.json` with the settings, the time and the zero-shot accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import mtkd_jax  # noqa: F401  (sets KERAS_BACKEND=jax before Keras is imported)
from mtkd_jax import atomic  # noqa: E402
from mtkd_jax.clip.config import CLIPConfig  # noqa: E402
from mtkd_jax.clip.load import TEXT_PROMPT_INIT  # noqa: E402
from mtkd_jax.clip.model import CLIP  # noqa: E402
from mtkd_jax.clip.tokenizer import CLIPTokenizer  # noqa: E402
from mtkd_jax.data import shapes  # noqa: E402
from mtkd_jax.data.registry import CLIP_MEAN, CLIP_STD  # noqa: E402

CONTEXT_LENGTH = 16  # the longest corpus caption has 12 tokens with start and end of text
SHAPES_CLIP_CONFIG = CLIPConfig.preset("tiny-teacher", context_length=CONTEXT_LENGTH)
ASSET_DIR = Path(__file__).resolve().parent / "data" / "assets"
WEIGHTS_FILE = "shapes_clip.npz"
REPORT_FILE = "shapes_clip.json"
_TOKEN_EMBEDDING = "token_embedding/embeddings"
_MAX_LOGIT_SCALE = math.log(100.0)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Settings of the contrastive pretraining (the defaults made the shipped weights).

    `preset` names the `CLIPConfig` architecture (with a 16-token context); shrunk runs in
    tests use "tiny".
    """

    preset: str = "tiny-teacher"
    patch_size: int = 0  # 0: the preset's
    steps: int = 1000
    batch_size: int = 128
    corpus_size: int = 20000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_images: int = 25 * len(shapes.CLASSNAMES)


def normalise_images(images: np.ndarray) -> np.ndarray:
    """uint8 images `[N, H, W, 3]` → float32 CLIP-normalised `[N, H, W, 3]`."""
    pixels = np.asarray(images, np.float32) / 255.0
    return (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def contrastive_loss(logits: jax.Array) -> jax.Array:
    """CLIP's symmetric InfoNCE loss: the mean of image→text and text→image cross-entropies.

    Args:
        logits: `[batch, batch]` scaled similarities, image i matching text i.

    Returns:
        scalar.
    """
    targets = jnp.arange(logits.shape[0])
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


def compact_vocabulary(token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted ids that `token_ids` uses, and `token_ids` renumbered into them.

    Args:
        token_ids: int `[N, context]` ids of the full vocabulary.

    Returns:
        vocab_ids: int32 `[V]` sorted distinct ids (row i of the compact table is row
            `vocab_ids[i]` of the full one).
        compact_ids: int32 `[N, context]` with values in `[0, V)`, in the same order.
    """
    vocab_ids = np.unique(np.asarray(token_ids)).astype(np.int32)
    return vocab_ids, np.searchsorted(vocab_ids, token_ids).astype(np.int32)


def _dihedral(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image `[H, W, 3]` of `[N, H, W, 3]` randomly rotated by k·90° and maybe flipped."""
    out = np.empty_like(images)
    turns, flips = rng.integers(4, size=len(images)), rng.random(len(images)) < 0.5
    for i, image in enumerate(images):
        image = np.rot90(image, k=int(turns[i]))
        out[i] = image[:, ::-1] if flips[i] else image
    return out


def _make_train_step(model: CLIP, optimizer: optax.GradientTransformation):
    scale_index = [v.path for v in model.trainable_variables].index(model.logit_scale.path)

    def loss_fn(trainable, non_trainable, images, token_ids):
        outputs, _ = model.stateless_call(
            trainable, non_trainable, {"images": images, "token_ids": token_ids}
        )
        return contrastive_loss(outputs["logits"])

    @jax.jit
    def train_step(trainable, non_trainable, opt_state, images, token_ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, non_trainable, images, token_ids)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        # CLIP clips its temperature at 100.
        trainable[scale_index] = jnp.minimum(trainable[scale_index], _MAX_LOGIT_SCALE)
        return trainable, opt_state, loss

    return train_step


def pretrain(
    settings: PretrainConfig = PretrainConfig(), *, progress: bool = True
) -> tuple[CLIP, np.ndarray, dict]:
    """Trains a CLIP of architecture `settings.preset` from scratch on the shapes caption corpus.

    Returns:
        model: the trained CLIP with a compact vocabulary (`len(vocab_ids)` tokens).
        vocab_ids: int32 `[V]` full-vocabulary ids of the compact table's rows.
        history: `{"loss": [per step], "seconds": float}`.
    """
    started = time.perf_counter()
    overrides = {"patch_size": settings.patch_size} if settings.patch_size else {}
    clip_config = CLIPConfig.preset(settings.preset, context_length=CONTEXT_LENGTH, **overrides)
    images, _, captions = shapes.render_caption_corpus(
        settings.corpus_size, settings.seed, clip_config.image_size
    )
    token_ids = CLIPTokenizer().tokenize(captions, context_length=clip_config.context_length)
    vocab_ids, compact_ids = compact_vocabulary(token_ids)

    keras.utils.set_random_seed(settings.seed)
    model = CLIP(clip_config.replace(vocab_size=len(vocab_ids)), name="clip")
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.learning_rate, settings.warmup_steps, max(settings.steps, 1)
    )
    optimizer = optax.adamw(
        schedule,
        weight_decay=settings.weight_decay,
        mask=lambda params: [p.ndim >= 2 for p in params],
    )
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    opt_state = optimizer.init(trainable)
    train_step = _make_train_step(model, optimizer)

    rng = np.random.default_rng(settings.seed)
    order = np.empty(0, np.int64)
    losses = []
    bar = tqdm(range(settings.steps), desc="pretraining shapes CLIP", disable=not progress)
    for step in bar:
        if len(order) < settings.batch_size:
            order = np.concatenate([order, rng.permutation(len(images))])
        batch, order = order[: settings.batch_size], order[settings.batch_size :]
        batch_images = normalise_images(_dihedral(images[batch], rng))
        trainable, opt_state, loss = train_step(
            trainable, non_trainable, opt_state, batch_images, compact_ids[batch]
        )
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"Pretraining loss is {loss} at step {step}; stopping.")
        losses.append(loss)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    for variable, value in zip(model.trainable_variables, trainable, strict=True):
        variable.assign(value)
    return model, vocab_ids, {"loss": losses, "seconds": time.perf_counter() - started}


def class_token_ids(context_length: int, template: str = shapes.TEMPLATES[0]) -> np.ndarray:
    """Token ids `[num_classes, context_length]` of `template` filled with each class name."""
    prompts = [template.format(name) for name in shapes.CLASSNAMES]
    return CLIPTokenizer().tokenize(prompts, context_length=context_length)


def zero_shot_accuracy(
    model: CLIP,
    images: np.ndarray,
    labels: np.ndarray,
    token_ids: np.ndarray,
    *,
    batch_size: int = 256,
) -> dict[str, float]:
    """Zero-shot accuracy (%) on the shapes world, base-to-novel style.

    `base`: base-class images classified among the base classes; `novel`: likewise for the novel
    classes; `hm`: their harmonic mean; `all`: every image among all classes.

    Args:
        model: a CLIP.
        images: uint8 `[N, H, W, 3]`.
        labels: int `[N]`.
        token_ids: `[num_classes, context]` class prompts, in the model's vocabulary.
    """
    text = np.asarray(model.encode_text(token_ids))
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    features = []
    for start in range(0, len(images), batch_size):
        chunk = normalise_images(images[start : start + batch_size])
        features.append(np.asarray(model.encode_image(chunk)))
    scores = np.concatenate(features) @ text.T
    labels = np.asarray(labels)
    half = shapes.NUM_BASE_CLASSES
    is_base = labels < half
    base = (scores[is_base, :half].argmax(-1) == labels[is_base]).mean()
    novel = (scores[~is_base, half:].argmax(-1) + half == labels[~is_base]).mean()
    result = {
        "base": 100 * float(base),
        "novel": 100 * float(novel),
        "all": 100 * float((scores.argmax(-1) == labels).mean()),
    }
    total = max(result["base"] + result["novel"], 1e-9)
    result["hm"] = 2 * result["base"] * result["novel"] / total
    return result


def evaluate(model: CLIP, vocab_ids: np.ndarray | None, num_images: int, seed: int = 0) -> dict:
    """Zero-shot accuracy of `model` on a freshly rendered shapes test split.

    Args:
        vocab_ids: for a compact-vocabulary model, its full-vocabulary ids; None for a full one.
    """
    config = model.config
    images, labels, _ = shapes.render_split("test", num_images, seed, config.image_size)
    token_ids = class_token_ids(config.context_length)
    if vocab_ids is not None:
        missing = sorted(set(np.unique(token_ids)) - set(vocab_ids.tolist()))
        if missing:
            raise ValueError(f"Class prompts use tokens outside the compact vocabulary: {missing}")
        token_ids = np.searchsorted(vocab_ids, token_ids).astype(np.int32)
    return zero_shot_accuracy(model, images, labels, token_ids)


def save_shapes_clip(
    model: CLIP, vocab_ids: np.ndarray, path: str | os.PathLike, *, dtype: str = "float16"
) -> Path:
    """Writes a compact-vocabulary CLIP (no prompts) to one `.npz` file; returns the path.

    The file holds `config` (JSON of the full-vocabulary `CLIPConfig`), `vocab_ids` `[V]` and one
    array per weight, keyed by its path inside the model; the token table has only its `V` rows.
    """
    config = model.config
    if config.vision_prompt_depth or config.text_prompt_depth:
        raise ValueError("Save the pretrained model without deep prompts.")
    if config.vocab_size != len(vocab_ids):
        raise ValueError(
            f"vocab_ids must list one id per row of the model's token table ({config.vocab_size})."
            f" Received: {len(vocab_ids)} ids."
        )
    full_config = config.replace(vocab_size=SHAPES_CLIP_CONFIG.vocab_size)
    arrays = {v.path: np.asarray(v.value).astype(dtype) for v in model.weights}
    path = Path(path)
    with atomic.replacing(path, suffix=".npz") as temporary:
        np.savez(
            temporary,
            config=np.array(json.dumps(full_config.to_dict())),
            vocab_ids=np.asarray(vocab_ids, np.int32),
            **{f"weight:{key}": value for key, value in arrays.items()},
        )
    return path


def load_shapes_clip(
    prompt_length: int = 0,
    prompt_depth: int = 0,
    *,
    path: str | os.PathLike | None = None,
    dtype=None,
) -> CLIP:
    """The pretrained shapes CLIP with its full 49,408-token vocabulary.

    Args:
        prompt_length: deep-prompt tokens per layer on both encoders (0: none).
        prompt_depth: how many layers get prompts (0: none; at most the 4 layers).
        path: a file written by `save_shapes_clip`; default: the shipped weights.
        dtype: Keras dtype policy of the returned model.

    Returns:
        A `CLIP` whose encoder weights are the pretrained ones and whose prompts (if asked for)
        are freshly initialised. Rows of tokens that the shapes captions never use are zero.
    """
    path = Path(path) if path is not None else ASSET_DIR / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No shapes CLIP weights at {str(path)!r}. Make them with "
            f"`python -m mtkd_jax.shapes_clip --out={path.parent}`."
        )
    with np.load(path, allow_pickle=False) as archive:
        config = CLIPConfig.from_dict(json.loads(str(archive["config"])))
        vocab_ids = archive["vocab_ids"]
        weights = {
            key.split(":", 1)[1]: archive[key] for key in archive.files if key.startswith("weight:")
        }
    config = config.replace(
        vision_prompt_length=prompt_length,
        vision_prompt_depth=prompt_depth,
        text_prompt_length=prompt_length,
        text_prompt_depth=prompt_depth,
    )
    model = CLIP(config, dtype=dtype, name="clip")
    expected = {v.path: v for v in model.weights if "prompt" not in v.path}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The shapes CLIP file {str(path)!r} does not match the model. Missing weights: "
            f"{missing}. Unexpected weights: {unexpected}."
        )
    for key, variable in expected.items():
        value = weights[key].astype(np.float32)
        if key.endswith(_TOKEN_EMBEDDING):
            table = np.zeros(tuple(variable.shape), np.float32)
            table[vocab_ids] = value
            value = table
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"Weight {key!r} has shape {value.shape} in {str(path)!r}; the model expects "
                f"{tuple(variable.shape)}."
            )
        variable.assign(value)
    init_ids = CLIPTokenizer().encode(TEXT_PROMPT_INIT)
    if prompt_depth and len(init_ids) == prompt_length:
        # As the loaders of real checkpoints do (PromptSRC's ctx_init): the text context starts
        # as "a photo of a", so the prompted teacher starts where the zero-shot one stands.
        model.init_text_prompts(init_ids)
    return model


def main(argv: list[str] | None = None) -> dict:
    """`python -m mtkd_jax.shapes_clip --out=DIR`: pretrain, evaluate, write DIR/shapes_clip.*."""
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m mtkd_jax.shapes_clip",
        description="Pretrain the tiny shapes-world CLIP of the offline demo.",
    )
    parser.add_argument("--out", required=True, help="Directory for shapes_clip.npz and .json.")
    for field in dataclasses.fields(PretrainConfig):
        parser.add_argument(
            f"--{field.name}",
            type=type(field.default),
            default=getattr(defaults, field.name),
            help=f"(default: {field.default})",
        )
    args = parser.parse_args(argv)
    fields = dataclasses.fields(PretrainConfig)
    settings = PretrainConfig(**{field.name: getattr(args, field.name) for field in fields})
    model, vocab_ids, history = pretrain(settings)
    weights = save_shapes_clip(model, vocab_ids, Path(args.out) / WEIGHTS_FILE)
    accuracy = evaluate(load_shapes_clip(path=weights), None, settings.eval_images, seed=0)
    arguments = sys.argv[1:] if argv is None else argv
    report = {
        "command": " ".join(["python -m mtkd_jax.shapes_clip", *arguments]),
        "settings": dataclasses.asdict(settings),
        "clip_config": model.config.replace(vocab_size=SHAPES_CLIP_CONFIG.vocab_size).to_dict(),
        "pretrain_seconds": round(history["seconds"], 1),
        "final_loss": float(np.mean(history["loss"][-50:])),
        "zero_shot_test_accuracy": {k: round(v, 2) for k, v in accuracy.items()},
        "file_bytes": weights.stat().st_size,
    }
    (Path(args.out) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["zero_shot_test_accuracy"]), f"{report['pretrain_seconds']} s")
    return report


if __name__ == "__main__":
    main()
