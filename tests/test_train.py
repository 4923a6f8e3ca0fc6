"""Tests of the shared training machinery on a toy Keras model (Dense -> BatchNorm -> Dense).

The loss couples the batch (a relation term between rows), like the batch- and class-level KD
losses, so the 8-device test shows the sharded step computes it over the global batch.
"""

import os

# Keras reads its backend when first imported; these tests drive models through JAX.
os.environ.setdefault("KERAS_BACKEND", "jax")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from mtkd_jax import checkpoint, train  # noqa: E402
from mtkd_jax.optim import make_optimizer  # noqa: E402

if keras.backend.backend() != "jax":
    pytest.skip("Keras was imported with another backend first", allow_module_level=True)

FEATURES, OUTPUTS, BATCH, STEPS_PER_EPOCH = 6, 4, 8, 3


def build_model(dtype=None, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, activation="relu", name="hidden", dtype=dtype),
            keras.layers.BatchNormalization(name="norm", dtype=dtype),
            keras.layers.Dense(OUTPUTS, name="head", dtype=dtype),
        ],
        name="toy",
    )


def relation_loss_fn(model):
    """MSE to the targets plus a batch-relation term (row-similarity matrices must agree)."""

    def loss_fn(trainable, non_trainable, batch, rng):
        outputs, new_non_trainable = model.stateless_call(
            trainable, non_trainable, batch["x"], training=True
        )
        outputs = outputs.astype(jnp.float32)
        noise = 1e-3 * jax.random.normal(rng, outputs.shape)  # exercises the per-step rng
        mse = jnp.mean((outputs + noise - batch["y"]) ** 2)
        relation = jnp.mean((outputs @ outputs.T - batch["y"] @ batch["y"].T) ** 2) / BATCH
        return mse + relation, (new_non_trainable, {"mse": mse, "relation": relation})

    return loss_fn


def make_batches(seed, epoch, steps=STEPS_PER_EPOCH, batch=BATCH):
    """Deterministic batches for (seed, epoch): the data contract of `fit`."""
    rng = np.random.default_rng([seed, epoch])
    for _ in range(steps):
        x = rng.normal(size=(batch, FEATURES)).astype(np.float32)
        yield {"x": x, "y": np.tanh(x[:, :OUTPUTS] * 2.0).astype(np.float32)}


def setup(mesh=None, *, epochs=3, donate=True, dtype=None):
    mesh = mesh or train.make_mesh()
    model = build_model(dtype)
    optimizer = make_optimizer(
        learning_rate=0.05, epochs=epochs, warmup_epochs=1, warmup_lr=0.01,
        steps_per_epoch=STEPS_PER_EPOCH,
    )  # fmt: skip
    trainable, non_trainable = train.model_variables(model)
    state = train.init_train_state(trainable, non_trainable, optimizer, seed=0, mesh=mesh)
    step = train.make_train_step(relation_loss_fn(model), optimizer, mesh, donate=donate)
    return model, optimizer, state, step


def run_fit(workdir, state, step, *, epochs=3, **kwargs):
    kwargs.setdefault("tensorboard", False)
    return train.fit(
        state, step, lambda epoch: make_batches(0, epoch), num_epochs=epochs,
        steps_per_epoch=STEPS_PER_EPOCH, workdir=workdir, stage_name="toy", log_every=2,
        progress=False, **kwargs,
    )  # fmt: skip


def read_metrics(workdir):
    with open(os.path.join(workdir, train.METRICS_FILE)) as file:
        return [json.loads(line) for line in file]


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def test_train_step_matches_plain_keras_optax_loop():
    model, optimizer, state, step = setup(donate=False)
    trainable, non_trainable = train.model_variables(model)
    opt_state = optimizer.init(trainable)
    # The reference: value_and_grad + optax, without sharding, donation or TrainState.
    loss_and_grads = jax.jit(jax.value_and_grad(relation_loss_fn(model), has_aux=True))
    key = jax.random.key(0)
    for index, batch in enumerate(make_batches(1, 0)):
        state, measurements = step(state, train.shard_batch(batch, step.mesh))
        (loss, (non_trainable, _)), grads = loss_and_grads(
            trainable, non_trainable, batch, jax.random.fold_in(key, index)
        )
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        np.testing.assert_allclose(measurements["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(measurements["grad_norm"], optax.global_norm(grads), rtol=1e-5)
        np.testing.assert_allclose(measurements["lr"], 0.01)  # the warm-up epoch
    for ours, reference in zip(state.trainable + state.non_trainable, trainable + non_trainable,
                               strict=True):  # fmt: skip
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    assert int(state.step) == STEPS_PER_EPOCH
    assert {"loss", "mse", "relation", "grad_norm", "param_norm", "update_norm", "lr"} <= set(
        measurements
    )


EIGHT_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests_dir!r})
    import test_train as t
    from mtkd_jax import train

    assert len(jax.devices()) == 8, jax.devices()
    results = {{}}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        model, optimizer, state, step = t.setup(train.make_mesh(devices))
        losses = []
        for epoch in range(2):
            for batch in t.make_batches(0, epoch):
                sharded = train.shard_batch(batch, step.mesh)
                state, measurements = step(state, sharded)
                losses.append(float(measurements["loss"]))
        results[name] = {{
            "losses": losses,
            "weights": [np.asarray(v).tolist() for v in state.trainable + state.non_trainable],
            "batch_shards": len(sharded["x"].addressable_shards),
        }}
    try:
        train.shard_batch(next(t.make_batches(0, 0, batch=12)), train.make_mesh())
        results["error"] = None
    except ValueError as error:
        results["error"] = str(error)
    print("RESULT" + json.dumps(results))
    """
)


def test_eight_devices_give_the_same_losses_and_weights_as_one():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        KERAS_BACKEND="jax",
    )
    script = EIGHT_DEVICE_SCRIPT.format(tests_dir=os.path.dirname(__file__))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    results = json.loads(line[len("RESULT") :])
    one, eight = results["one"], results["eight"]
    assert one["batch_shards"] == 1 and eight["batch_shards"] == 8
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    for a, b in zip(eight["weights"], one["weights"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The batch of 12 over 8 devices: one message with the size, the count and what to choose.
    error = results["error"]
    assert error is not None
    assert "batch size 12" in error and "8 devices" in error and "multiple of 8" in error


def test_step_compiles_once_across_steps_and_epochs(tmp_path):
    _, _, state, step = setup()
    run_fit(tmp_path, state, step, epochs=3)
    assert step.trace_count == 1
    assert step._jitted._cache_size() == 1


def test_fit_logs_every_measurement_to_metrics_jsonl(tmp_path):
    _, _, state, step = setup()
    run_fit(tmp_path, state, step, epochs=2)
    records = read_metrics(tmp_path)
    # log_every=2 with 3 steps per epoch: lines after steps 2 and 3 of each epoch.
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 2), (0, 3), (1, 5), (1, 6)]
    for record in records:
        assert record["stage"] == "toy" and record["kind"] == "train"
        for name in ("loss", "mse", "relation", "grad_norm", "param_norm", "update_norm", "lr"):
            assert np.isfinite(record[name]), name
    assert records[0]["lr"] == pytest.approx(0.01) and records[2]["lr"] == pytest.approx(0.05)


def test_fit_checkpoints_every_epoch_keeps_the_latest_and_logs_evaluations(tmp_path):
    _, _, state, step = setup()
    evaluated = []

    def evaluate(state, epoch):
        evaluated.append(epoch)
        return {"accuracy": epoch / 10}

    epochs = checkpoint.KEEP_PER_STAGE + 1  # one more than is kept, so the oldest goes
    run_fit(tmp_path, state, step, epochs=epochs, eval_fn=evaluate, eval_every=2)
    saved = checkpoint.list_checkpoints(checkpoint.checkpoint_dir(tmp_path), "toy")
    assert [checkpoint.read_metadata(p)["epoch"] for p in saved] == list(range(1, epochs))
    assert evaluated == [1, 3]
    evaluations = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert [(r["epoch"], r["step"], r["accuracy"]) for r in evaluations] == [
        (1, 2 * STEPS_PER_EPOCH, 0.1),
        (3, 4 * STEPS_PER_EPOCH, 0.3),
    ]


def test_fit_writes_tensorboard_scalars_when_tensorboard_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, state, step = setup()
    run_fit(tmp_path, state, step, epochs=1, tensorboard=True)
    events = EventAccumulator(str(tmp_path / train.TENSORBOARD_SUBDIR / "toy"))
    events.Reload()
    losses = [e.step for e in events.Tensors("train/loss")]
    assert losses == [r["step"] for r in read_metrics(tmp_path)]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    _, _, state, step = setup()

    def batches(epoch):
        for index, batch in enumerate(make_batches(0, epoch)):
            if epoch == 1 and index == 1:
                batch["x"][0, 0] = np.nan
            yield batch

    with pytest.raises(train.NonFiniteLossError, match="step 5") as raised:
        train.fit(
            state, step, batches, num_epochs=3, steps_per_epoch=STEPS_PER_EPOCH,
            workdir=tmp_path, stage_name="toy", log_every=100, tensorboard=False, progress=False,
        )  # fmt: skip
    assert raised.value.step == STEPS_PER_EPOCH + 2 and "loss" in raised.value.names
    saved = checkpoint.list_checkpoints(checkpoint.checkpoint_dir(tmp_path), "toy")
    assert [checkpoint.read_metadata(p)["epoch"] for p in saved] == [0]
    _, _, target, _ = setup()
    restored, metadata = checkpoint.restore(saved[0], target)
    assert metadata["step"] == STEPS_PER_EPOCH
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(restored))
    assert not checkpoint.is_finished(tmp_path, "toy")


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path):
    _, _, state, step = setup()
    reference = run_fit(tmp_path / "whole", state, step)

    def die_in_epoch_one(epoch):
        for index, batch in enumerate(make_batches(0, epoch)):
            if epoch == 1 and index == 2:
                raise Interrupted  # killed mid-epoch, after a log line of epoch 1
            yield batch

    _, _, state, step = setup()
    with pytest.raises(Interrupted):
        train.fit(
            state, step, die_in_epoch_one, num_epochs=3, steps_per_epoch=STEPS_PER_EPOCH,
            workdir=tmp_path / "cut", stage_name="toy", log_every=2, tensorboard=False,
            progress=False,
        )  # fmt: skip
    assert read_metrics(tmp_path / "cut")[-1]["step"] == 5  # a line past the epoch-0 checkpoint
    _, _, state, step = setup()
    resumed = run_fit(tmp_path / "cut", state, step, resume=True)

    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert without_timing(read_metrics(tmp_path / "cut")) == without_timing(
        read_metrics(tmp_path / "whole")
    )


def test_a_finished_stage_is_not_overwritten_silently(tmp_path):
    _, _, state, step = setup()
    final = run_fit(tmp_path, state, step, epochs=1)
    assert checkpoint.is_finished(tmp_path, "toy")
    _, _, state, step = setup()
    with pytest.raises(checkpoint.WorkdirInUseError, match="--resume"):
        run_fit(tmp_path, state, step, epochs=1)
    again = run_fit(tmp_path, state, step, epochs=1, resume=True)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_returns_each_real_row_once_and_drops_padding():
    mesh = train.make_mesh()
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(FEATURES, 5)).astype(np.float32)
    batches = [
        {
            "images": rng.normal(size=(BATCH, FEATURES)).astype(np.float32),
            "labels": rng.integers(0, 5, size=BATCH).astype(np.int32),
            "mask": rng.random(BATCH) > 0.3,
        }
        for _ in range(3)
    ]
    step = train.make_predict_step(lambda w, x: x @ w, mesh)
    logits, labels = train.predict(step, jnp.asarray(weights), batches, mesh)
    keep = [b["mask"] for b in batches]
    np.testing.assert_allclose(
        logits,
        np.concatenate([(b["images"] @ weights)[k] for b, k in zip(batches, keep, strict=True)]),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        labels, np.concatenate([b["labels"][k] for b, k in zip(batches, keep, strict=True)])
    )


def test_frozen_inputs_reach_the_loss_without_training(tmp_path):
    mesh = train.make_mesh()
    optimizer = optax.sgd(0.1)
    teacher = {"scale": jnp.float32(3.0)}

    def loss_fn(trainable, non_trainable, batch, rng, frozen):
        loss = jnp.mean((batch["x"] * trainable[0] - frozen["scale"] * batch["x"]) ** 2)
        return loss, (non_trainable, {})

    state = train.init_train_state([jnp.float32(0.0)], [], optimizer, seed=0, mesh=mesh)
    step = train.make_train_step(loss_fn, optimizer, mesh, frozen=teacher)
    batch = {"x": np.ones((BATCH, 2), np.float32)}
    for _ in range(10):
        state, _ = step(state, train.shard_batch(batch, mesh))
    # d/dw (w - 3)^2 = 2 (w - 3): each step moves w to 3 + 0.8 (w - 3), from w = 0.
    np.testing.assert_allclose(state.trainable[0], 3.0 * (1.0 - 0.8**10), rtol=1e-5)


def test_bfloat16_policy_keeps_variables_optimizer_state_and_loss_float32():
    model, optimizer, state, step = setup(dtype="mixed_bfloat16")
    outputs = model(next(make_batches(0, 0))["x"])
    assert outputs.dtype == "bfloat16"  # the compute really runs in bfloat16
    for batch in make_batches(0, 0):
        state, measurements = step(state, train.shard_batch(batch, step.mesh))
    assert all(v.dtype == jnp.float32 for v in state.trainable)
    float_leaves = [
        v for v in jax.tree.leaves(state.opt_state) if jnp.issubdtype(v.dtype, jnp.floating)
    ]
    assert float_leaves and all(v.dtype == jnp.float32 for v in float_leaves)
    assert all(v.dtype == jnp.float32 for v in measurements.values())
    assert np.isfinite(float(measurements["loss"]))


def test_assign_to_model_writes_trained_values_back():
    model, _, state, step = setup()
    for batch in make_batches(0, 0):
        state, _ = step(state, train.shard_batch(batch, step.mesh))
    x = next(make_batches(5, 0))["x"]
    expected, _ = model.stateless_call(state.trainable, state.non_trainable, x)
    train.assign_to_model(model, state.trainable, state.non_trainable)
    np.testing.assert_allclose(model(x), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="trainable variables but"):
        train.assign_to_model(model, state.trainable[:-1], state.non_trainable)


def test_shard_batch_rejects_unequal_leading_sizes():
    with pytest.raises(ValueError, match="same leading"):
        train.shard_batch({"x": np.zeros((4, 2)), "y": np.zeros((3,))}, train.make_mesh())
