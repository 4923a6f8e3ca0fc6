"""Tests of the optimizer and schedule against the formula and against torch (the reference code's
framework): torch SGD/AdamW with CosineAnnealingLR stepped per epoch after a constant warm-up."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtkd_jax.optim import make_lr_schedule, make_optimizer

torch = pytest.importorskip("torch")

LR, EPOCHS, WARMUP_LR, STEPS = 0.005, 20, 1e-5, 7


def test_schedule_values_follow_the_formula_at_chosen_steps():
    schedule = make_lr_schedule(
        learning_rate=LR, epochs=EPOCHS, warmup_epochs=1, warmup_lr=WARMUP_LR, steps_per_epoch=STEPS
    )
    expected = {
        0: WARMUP_LR,  # first step of the warm-up epoch
        STEPS - 1: WARMUP_LR,  # its last step
        STEPS: LR,  # epoch 1: the cosine starts at the peak
        2 * STEPS - 1: LR,  # constant within an epoch
        2 * STEPS: 0.5 * LR * (1 + math.cos(math.pi / EPOCHS)),  # epoch 2
        10 * STEPS + 3: 0.5 * LR * (1 + math.cos(math.pi * 9 / EPOCHS)),  # epoch 10
        EPOCHS * STEPS - 1: 0.5 * LR * (1 + math.cos(math.pi * (EPOCHS - 2) / EPOCHS)),  # last
    }
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-6), step
    assert float(jax.jit(schedule)(jnp.int32(STEPS))) == pytest.approx(LR, rel=1e-6)


def test_schedule_without_warmup_is_plain_cosine_from_the_peak():
    schedule = make_lr_schedule(learning_rate=0.1, epochs=4, warmup_epochs=0, steps_per_epoch=2)
    values = [float(schedule(s)) for s in range(0, 8, 2)]
    np.testing.assert_allclose(values, [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in
                                        range(4)], rtol=1e-6)  # fmt: skip


def torch_reference_rates(epochs, warmup_epochs, optimizer):
    """Per-epoch rates as Dassl makes them: constant warm-up, then torch's cosine from epoch 0."""
    rates = [WARMUP_LR] * warmup_epochs
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=float(epochs))
    with warnings.catch_warnings():  # stepped before optimizer.step(): we only read the rates
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs - warmup_epochs):
            rates.append(optimizer.param_groups[0]["lr"])
            cosine.step()
    return rates


def run_both(name, epochs=4, warmup_epochs=1, steps=3, **hyper):
    rng = np.random.default_rng(0)
    initial = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
    grads = [[rng.normal(size=p.shape).astype(np.float32) for p in initial]
             for _ in range(epochs * steps)]  # fmt: skip

    optimizer = make_optimizer(
        name=name, learning_rate=LR, epochs=epochs, warmup_epochs=warmup_epochs,
        warmup_lr=WARMUP_LR, steps_per_epoch=steps, **hyper,
    )  # fmt: skip
    params = [jnp.asarray(p) for p in initial]
    state = optimizer.init(params)
    ours_lr = []
    for g in grads:
        updates, state = optimizer.update([jnp.asarray(x) for x in g], state, params)
        params = optax.apply_updates(params, updates)
        ours_lr.append(float(state.hyperparams["learning_rate"]))

    tensors = [torch.tensor(p, requires_grad=True) for p in initial]
    if name == "sgd":
        reference = torch.optim.SGD(tensors, lr=LR, momentum=hyper.get("momentum", 0.9),
                                    weight_decay=hyper.get("weight_decay", 5e-4))  # fmt: skip
    else:
        reference = torch.optim.AdamW(tensors, lr=LR, weight_decay=hyper.get("weight_decay", 5e-4))
    rates = torch_reference_rates(epochs, warmup_epochs, reference)
    for index, g in enumerate(grads):
        for group in reference.param_groups:
            group["lr"] = rates[index // steps]
        for tensor, x in zip(tensors, g, strict=True):
            tensor.grad = torch.tensor(x)
        reference.step()
    return params, [t.detach().numpy() for t in tensors], ours_lr, rates


def test_sgd_matches_torch_sgd_with_l2_weight_decay_under_the_schedule():
    # A large decay, so that decoupled decay or decay after momentum would show.
    ours, theirs, ours_lr, rates = run_both("sgd", momentum=0.9, weight_decay=0.5)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours_lr, np.repeat(rates, 3), rtol=1e-6)


def test_adamw_matches_torch_adamw_under_the_schedule():
    ours, theirs, _, _ = run_both("adamw", weight_decay=0.5)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_state_stays_float32():
    optimizer = make_optimizer(steps_per_epoch=2)
    state = optimizer.init([jnp.zeros((2, 2), jnp.float32)])
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "lion"}, "Valid names: sgd, adamw"),
        ({"warmup_epochs": 20}, "warmup_epochs"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0"),
    ],
)
def test_bad_settings_raise_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(steps_per_epoch=3, **kwargs)
