"""What each distillation level weighs in the stage-1 loss and in its gradient.

    python benchmarks/level_weights.py [--demo_workdir=runs/shapes_4shot_seed1]

Prints, per level (instance, batch, class; each summed over the paper's temperatures 1,2,3,5,6
as `mtkd_jax.losses.multilevel_kd` does):

* at the paper's sizes (batch 8, CLIP's logit scale 100, C = 10, 37, 47, 102 classes): the
  level's share of the loss and the norm of its gradient with respect to the student's logits,
  on synthetic logits shaped like CLIP's (cosines 0.25 ± 0.05, the true class +0.1; the
  student an independent draw, as at the start of stage 1);
* on the demo (batch 64, 36 classes, the shapes teacher's logit scale) when a finished demo
  workdir is given: the same on the real first batch of stage 1, with the teacher's stage-0
  prompts, for the fresh student (stage 1's start) and the trained one
  (student_stage1.weights.h5), the gradient taken with respect to the student's trainable
  weights.

A level whose share of the gradient is tiny can hardly change what the student learns, so an
ablation that removes it can show little (docs/reproducing.md).
"""

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mtkd_jax import losses

TEMPERATURES = (1.0, 2.0, 3.0, 5.0, 6.0)
LEVELS = ("instance", "batch", "class")
ONE_HOT = {"instance": (1.0, 0.0, 0.0), "batch": (0.0, 1.0, 0.0), "class": (0.0, 0.0, 1.0)}


def clip_like_logits(rng, batch, classes, scale=100.0):
    labels = rng.integers(0, classes, batch)
    cosines = 0.25 + 0.05 * rng.standard_normal((batch, classes))
    cosines[np.arange(batch), labels] += 0.1
    return jnp.asarray(scale * cosines, jnp.float32)


@jax.jit
def _values_and_grad_norms(student, teacher):
    out = {}
    for level in LEVELS:

        def loss(s, level=level):
            return losses.multilevel_kd(s, teacher, temperatures=TEMPERATURES,
                                        weights=ONE_HOT[level])[0]  # fmt: skip

        value, grad = jax.value_and_grad(loss)(student)
        out[level] = (value, jnp.linalg.norm(grad))
    return out


def logit_shares(student, teacher):
    """{level: (value, |d value / d student logits|)}."""
    out = _values_and_grad_norms(student, teacher)
    return {level: (float(v), float(g)) for level, (v, g) in out.items()}


def table(title, rows):
    print(f"\n{title}")
    print("| setting | level | value | share of loss | grad norm | share of grad norm |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for setting, shares in rows:
        total_value = sum(v for v, _ in shares.values())
        total_grad = sum(g for _, g in shares.values())
        for level, (value, grad) in shares.items():
            print(f"| {setting} | {level} | {value:.4g} | {100 * value / total_value:.2f}% | "
                  f"{grad:.4g} | {100 * grad / total_grad:.2f}% |")  # fmt: skip


def paper_sizes():
    rows = []
    for classes in (10, 37, 47, 102):
        shares = {level: [0.0, 0.0] for level in LEVELS}
        draws = 20
        for draw in range(draws):
            rng = np.random.default_rng(draw)
            teacher, student = (clip_like_logits(rng, 8, classes) for _ in range(2))
            for level, (value, grad) in logit_shares(student, teacher).items():
                shares[level][0] += value / draws
                shares[level][1] += grad / draws
        rows.append((f"batch 8, {classes} classes", {k: tuple(v) for k, v in shares.items()}))
    table("Paper sizes, synthetic CLIP-like logits (mean of 20 draws), gradient w.r.t. the "
          "student logits", rows)  # fmt: skip


def demo(workdir: Path):
    from mtkd_jax import config as config_lib
    from mtkd_jax import experiment, handoff, objectives, stages, train
    from mtkd_jax import student as student_lib
    from mtkd_jax import teacher as teacher_lib
    from mtkd_jax import workdir as workdir_lib
    from mtkd_jax.data import pipeline

    saved = json.loads((workdir / "flags.json").read_text())
    fields = {f.name for f in dataclasses.fields(config_lib.RunConfig)}
    config = config_lib.RunConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                     for k, v in saved.items() if k in fields})  # fmt: skip
    teacher = teacher_lib.build_teacher(config)
    teacher_lib.load_prompts(teacher, workdir / workdir_lib.TEACHER_PROMPTS_FILE)
    dataset = experiment.load_data(config)
    text, scale = handoff.read_text_features(workdir, dataset.classnames)
    text, scale = jnp.asarray(text), jnp.float32(scale)
    image_size = config.image_size or teacher.config.image_size
    # Stage 1's own first batch.
    first_epoch_seed = stages.STAGE1.epoch_seed(config.seed, 0)
    batch = next(iter(pipeline.make_batches(
        dataset.split("train"), image_size=image_size, batch_size=config.batch_size,
        training=True, seed=first_epoch_seed, labeled=False, min_crop_scale=config.min_crop_scale,
    )))  # fmt: skip
    frozen = objectives.DistillationInputs(train.model_variables(teacher), text, scale)
    rows = []
    trained = workdir / "student_stage1.weights.h5"
    for name, weights in (("fresh student (stage-1 start)", None), ("trained stage 1", trained)):
        student = student_lib.build_student(
            config, teacher_dim=text.shape[1], image_size=image_size, adapter=False
        )
        if weights is not None:
            student.load_weights(str(weights))
        trainable, non_trainable = train.model_variables(student)
        shares = {}
        for level in LEVELS:
            loss_fn = objectives.distillation_loss(
                student, teacher, temperatures=TEMPERATURES, weights=ONE_HOT[level], kd_weight=1.0
            )

            def value(t, loss_fn=loss_fn, non_trainable=non_trainable):
                return loss_fn(t, non_trainable, dict(batch), None, frozen)[0]

            loss, grads = jax.value_and_grad(value)(trainable)
            shares[level] = (float(loss), float(jnp.sqrt(sum(jnp.sum(g**2) for g in grads))))
        rows.append((f"demo, {name}", shares))
    table(f"Demo ({workdir}): first stage-1 batch of {config.batch_size}, "
          f"{dataset.num_classes} classes, logit scale {float(jnp.exp(scale)):.1f}, gradient "
          "w.r.t. the student's trainable weights", rows)  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo_workdir", default="", help="a finished demo run's workdir")
    args = parser.parse_args()
    paper_sizes()
    if args.demo_workdir:
        demo(Path(args.demo_workdir))
