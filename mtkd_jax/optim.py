"""The optimizer and learning-rate schedule of the paper (the CoOp / Dassl recipe).

MTKD trains with SGD (momentum 0.9, weight decay 5e-4, learning rate 0.005) for 20 epochs: one
warm-up epoch at a constant 1e-5, then cosine annealing. The reference code gets this from Dassl,
whose scheduler is stepped once per *epoch*; we reproduce that behaviour exactly:

- epochs `0 .. warmup_epochs-1` run at `warmup_lr`;
- epoch `e >= warmup_epochs` runs at `0.5 * lr * (1 + cos(pi * (e - warmup_epochs) / epochs))`.

The cosine's period is the *total* number of epochs (Dassl builds `CosineAnnealingLR(T_max=
max_epoch)` and restarts its count after the warm-up), so the last epoch ends slightly above zero
rather than at zero, and the rate is constant within an epoch.

Weight decay for SGD is an L2 term added to the gradient before momentum, as `torch.optim.SGD`
does; for AdamW it is the decoupled decay of `optax.adamw`. The learning rate lives in the
optimizer state (`optax.inject_hyperparams`), so the training step can report it and checkpoints
carry it.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adamw")


def make_lr_schedule(
    *,
    learning_rate: float = 0.005,
    epochs: int = 20,
    warmup_epochs: int = 1,
    warmup_lr: float = 1e-5,
    steps_per_epoch: int,
) -> optax.Schedule:
    """The paper's schedule as a function of the optimizer step (constant within each epoch).

    Args:
        learning_rate: the peak rate.
        epochs: total epochs, warm-up included.
        warmup_epochs: epochs at the constant `warmup_lr` (0 for none).
        warmup_lr: the warm-up rate.
        steps_per_epoch: optimizer steps per epoch (the training pipeline drops remainders, so
            this is fixed).

    Returns:
        `schedule(step) -> float32 scalar`, traceable under `jax.jit`.
    """
    _check_positive_int("epochs", epochs)
    _check_positive_int("steps_per_epoch", steps_per_epoch)
    if not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs < epochs:
        raise ValueError(
            "warmup_epochs must be an integer in [0, epochs): the schedule needs at least one "
            f"epoch after the warm-up. Received: warmup_epochs={warmup_epochs!r}, epochs={epochs!r}"
        )
    if learning_rate <= 0 or warmup_lr < 0:
        raise ValueError(
            "learning_rate must be > 0 and warmup_lr >= 0. "
            f"Received: learning_rate={learning_rate!r}, warmup_lr={warmup_lr!r}"
        )

    def schedule(step):
        epoch = jnp.asarray(step) // steps_per_epoch
        progress = (epoch - warmup_epochs).astype(jnp.float32) / epochs
        cosine = 0.5 * learning_rate * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(epoch < warmup_epochs, jnp.float32(warmup_lr), cosine).astype(jnp.float32)

    return schedule


def _sgd_with_l2(learning_rate, momentum, weight_decay):
    """SGD with heavy-ball momentum and L2 weight decay added to the gradient (torch semantics)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(learning_rate),
    )


def _adamw(learning_rate, weight_decay):
    return optax.adamw(learning_rate, weight_decay=weight_decay)


def make_optimizer(
    *,
    name: str = "sgd",
    learning_rate: float = 0.005,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    epochs: int = 20,
    warmup_epochs: int = 1,
    warmup_lr: float = 1e-5,
    steps_per_epoch: int,
) -> optax.GradientTransformation:
    """The optimizer of the paper with its schedule, the rate kept in the state as `learning_rate`.

    Args:
        name: "sgd" (momentum + L2 weight decay, as torch SGD) or "adamw" (decoupled decay;
            `momentum` is ignored).
        learning_rate, epochs, warmup_epochs, warmup_lr, steps_per_epoch: see `make_lr_schedule`.
        momentum: SGD momentum (dampening 0, no Nesterov).
        weight_decay: the decay coefficient.

    Returns:
        An `optax.GradientTransformation` whose state has `.hyperparams["learning_rate"]`, the
        rate used by the latest update (float32).
    """
    if name not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer. Valid names: {', '.join(OPTIMIZERS)}. Received: name={name!r}"
        )
    schedule = make_lr_schedule(
        learning_rate=learning_rate,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr,
        steps_per_epoch=steps_per_epoch,
    )
    if name == "sgd":
        return optax.inject_hyperparams(_sgd_with_l2, hyperparam_dtype=jnp.float32)(
            learning_rate=schedule, momentum=momentum, weight_decay=weight_decay
        )
    return optax.inject_hyperparams(_adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=schedule, weight_decay=weight_decay
    )


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
