"""The training machinery every stage shares: mesh, sharding, the jitted steps, the epoch loop.

Stages differ by data, not by loops: which variables train (what goes in `TrainState.trainable`),
which loss (`loss_fn`), which batches (`batches_for_epoch`). This module knows nothing of CLIP,
datasets or the KD losses.

- Data parallel with `jax.jit` + `jax.sharding` (never `pmap`): a 1-D mesh with axis "data" over
  all devices, the batch split along its leading axis, the state replicated. Losses that couple
  the batch (the batch- and class-level KD terms) are therefore computed over the global batch,
  whatever the device count.
- Keras models run through their stateless API (`model.stateless_call(trainable,
  non_trainable, ...)`) inside the caller's `loss_fn`, so the step is a pure function that jits,
  shards and donates like any JAX code.
- The host syncs only every `log_every` steps and at the end of each epoch.

Mixed precision: build the model with Keras's "mixed_bfloat16" policy (set before the model is
created); its variables stay float32 and the compute runs in bfloat16. The step then keeps
gradients, optimizer state, loss and measurements in float32 (the loss is cast after `loss_fn`;
`loss_fn` should compute its loss from float32 logits).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mtkd_jax import atomic, checkpoint, distributed, errors

DATA_AXIS = "data"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
# Measurements that, when not finite, mean the weights are no longer trustworthy.
_MUST_BE_FINITE = ("loss", "grad_norm", "param_norm", "update_norm")


class NonFiniteLossError(errors.UserError, FloatingPointError):
    """Training produced a non-finite loss (or norm); raised before any checkpoint of it."""

    def __init__(self, *, stage: str, epoch: int, step: int, names: Sequence[str]):
        self.stage, self.epoch, self.step, self.names = stage, epoch, step, tuple(names)
        super().__init__(
            f"Non-finite {', '.join(names)} at step {step} (epoch {epoch}) of {stage}; training "
            "stopped and no checkpoint was written from this state, so the last good one stays. "
            "Lower the learning rate, check the inputs for NaN/inf, or use --dtype=float32."
        )


# ---------------------------------------------------------------------------------------------
# Mesh and sharding


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all global devices, every host).

    Multi-host: call `jax.distributed.initialize()` before this; `jax.devices()` then lists the
    devices of every process. The devices are ordered by process, so process p's rows of a
    global batch are the p-th block of it (what `mtkd_jax.data.pipeline` hands each process).
    """
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda device: device.process_index)  # Stable: local order kept.
    if not devices:
        raise ValueError(f"make_mesh needs at least one device. Received: devices={devices!r}")
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their leading (batch) axis over the "data" axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays copied whole to every device of the mesh."""
    return NamedSharding(mesh, P())


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Puts a host batch on the mesh, split along the leading axis.

    Args:
        batch: name -> array `[local_batch, ...]`, this process's part of the global batch (the
            whole batch on a single host). Every array has the same leading size.
        mesh: from `make_mesh`.

    Returns:
        name -> global `jax.Array` `[local_batch * process_count, ...]` sharded over "data".

    Raises:
        ValueError: arrays without a batch axis, unequal leading sizes, a non-numeric array, or
            a batch size that does not divide evenly across the devices.
    """
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError(
            f"A batch is a non-empty dict of arrays. Received: {type(batch).__name__} {batch!r}"
        )
    sharding = batch_sharding(mesh)
    local_devices = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    sizes = {}
    host = {}
    for name, value in batch.items():
        if isinstance(value, jax.Array) and value.sharding == sharding:
            sizes[name] = value.shape[0] // jax.process_count() if value.ndim else None
            host[name] = value
            continue
        array = np.asarray(value)
        if array.dtype.kind not in "biuf" and array.dtype.name != "bfloat16":
            raise ValueError(
                f"Batch entry {name!r} has dtype {array.dtype}; only numeric and boolean arrays "
                "go on devices. Drop it from the batch (keep it on the host)."
            )
        sizes[name] = array.shape[0] if array.ndim else None
        host[name] = array
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(
            "Every batch entry needs the same leading (batch) axis. "
            f"Received leading sizes: { {k: v for k, v in sizes.items()} }"
        )
    size = next(iter(sizes.values()))
    if size % local_devices:
        total = size * jax.process_count()
        multiple = local_devices * jax.process_count()
        suggestion = max(multiple, (total // multiple) * multiple)
        raise ValueError(
            f"The batch size {total} does not divide evenly across {multiple} devices "
            f"({jax.process_count()} process(es) x {local_devices} local). Choose a batch size "
            f"that is a multiple of {multiple} (e.g. --batch_size={suggestion}), or run on fewer "
            "devices (e.g. CUDA_VISIBLE_DEVICES)."
        )
    return {
        name: value
        if isinstance(value, jax.Array) and value.sharding == sharding
        else jax.make_array_from_process_local_data(sharding, value)
        for name, value in host.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies every leaf of `tree` whole to every device of `mesh` (same value on every host)."""
    return jax.device_put(tree, replicated_sharding(mesh))


# ---------------------------------------------------------------------------------------------
# Keras variables


def model_variables(model) -> tuple[list[jax.Array], list[jax.Array]]:
    """`(trainable, non_trainable)` values of a built Keras model, in `stateless_call` order."""
    if not getattr(model, "built", True):
        raise ValueError(
            f"The model {model.name!r} is not built; call it once on an example batch (or "
            "model.build(input_shape)) before taking its variables."
        )
    return (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
    )


def assign_to_model(model, trainable: Sequence[Any], non_trainable: Sequence[Any]) -> None:
    """Writes values (e.g. a trained `TrainState`'s) back into the Keras model's variables."""
    for kind, variables, values in (
        ("trainable", model.trainable_variables, trainable),
        ("non_trainable", model.non_trainable_variables, non_trainable),
    ):
        if len(variables) != len(values):
            raise ValueError(
                f"The model {model.name!r} has {len(variables)} {kind} variables but "
                f"{len(values)} values were given; pass the lists from model_variables of the "
                "same model (same trainable/frozen choice)."
            )
        for variable, value in zip(variables, values, strict=True):
            if tuple(variable.shape) != tuple(np.shape(value)):
                raise ValueError(
                    f"Shape mismatch for {variable.path}: variable {tuple(variable.shape)}, "
                    f"value {tuple(np.shape(value))}."
                )
            variable.assign(value)


# ---------------------------------------------------------------------------------------------
# Train state


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["trainable", "non_trainable", "opt_state", "step", "rng"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training step reads and writes; a pytree, donated to the step.

    Attributes:
        trainable: list of arrays, the differentiated variables (`model.trainable_variables`).
        non_trainable: list of arrays, updated by the model but not by gradients (BatchNorm
            statistics, seed generator states).
        opt_state: the optax state of `trainable`.
        step: int32 scalar, optimizer steps taken.
        rng: uint32 `[2]` raw key; step `s` uses `fold_in(rng, s)`, so resuming is exact.
    """

    trainable: list
    non_trainable: list
    opt_state: Any
    step: jax.Array
    rng: jax.Array

    def replace(self, **changes) -> TrainState:
        return dataclasses.replace(self, **changes)


def init_train_state(
    trainable: Sequence[Any],
    non_trainable: Sequence[Any],
    optimizer: optax.GradientTransformation,
    *,
    seed: int,
    mesh: Mesh,
) -> TrainState:
    """A fresh `TrainState` replicated on `mesh`; the optimizer state is float32 like weights."""
    trainable = [jnp.asarray(v) for v in trainable]
    low_precision = [str(v.dtype) for v in trainable if v.dtype != jnp.float32]
    if low_precision:
        warnings.warn(
            f"Trainable variables should be float32 (use a mixed-precision policy for bf16 "
            f"compute, not bf16 variables). Received dtypes: {sorted(set(low_precision))}",
            stacklevel=2,
        )
    state = TrainState(
        trainable=trainable,
        non_trainable=[jnp.asarray(v) for v in non_trainable],
        opt_state=optimizer.init(trainable),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return replicate(state, mesh)


def learning_rate_of(opt_state: Any) -> jax.Array | None:
    """The rate of the latest update where the optimizer keeps it (`optax.inject_hyperparams`)."""
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda n: hasattr(n, "hyperparams")):
        hyperparams = getattr(node, "hyperparams", None)
        if isinstance(hyperparams, Mapping) and "learning_rate" in hyperparams:
            return jnp.asarray(hyperparams["learning_rate"], jnp.float32)
    return None


# ---------------------------------------------------------------------------------------------
# Steps


class TrainStep:
    """The jitted `step(state, batch) -> (state, measurements)`; counts its traces.

    `trace_count` goes up each time JAX traces (and so compiles) the step: it must stay 1 for a
    stage, since batch shapes are fixed.
    """

    def __init__(self, jitted, mesh: Mesh, frozen: Any, counter: list[int]):
        self._jitted, self.mesh, self._frozen, self._counter = jitted, mesh, frozen, counter

    @property
    def trace_count(self) -> int:
        return self._counter[0]

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array]):
        return self._jitted(state, dict(batch), self._frozen)


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    donate: bool = True,
    frozen: Any = None,
) -> TrainStep:
    """Builds the one jitted training step of a stage.

    Args:
        loss_fn: `loss_fn(trainable, non_trainable, batch, rng) -> (loss, (new_non_trainable,
            measurements))`, or with `frozen` given, `loss_fn(trainable, non_trainable, batch,
            rng, frozen)`. `loss` is a scalar over the GLOBAL batch; `measurements` a dict of
            scalars (each loss term by name). It calls the model's `stateless_call` itself.
        optimizer: an optax transformation (see `mtkd_jax.optim.make_optimizer`).
        mesh: from `make_mesh`; the state is replicated, the batch split over "data".
        donate: donate the input state's buffers (the caller must not reuse that state).
        frozen: optional pytree of arrays the loss reads but never trains (e.g. a frozen
            teacher's variables or stored text features), passed to the compiled step as an
            argument, replicated and not donated, so it is neither differentiated nor baked into
            the program as constants.

    Returns:
        A `TrainStep`: `step(state, batch) -> (new_state, measurements)`. Measurements hold the
        loss_fn's own plus `loss`, `grad_norm`, `param_norm`, `update_norm` and `lr` (when the
        optimizer keeps it), all float32 scalars, replicated.
    """
    counter = [0]

    def step(state: TrainState, batch, frozen_values):
        counter[0] += 1
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def differentiated(trainable):
            extra = () if frozen_values is None else (frozen_values,)
            loss, (new_non_trainable, measurements) = loss_fn(
                trainable, state.non_trainable, batch, rng, *extra
            )
            if jnp.ndim(loss) != 0:
                raise ValueError(
                    f"loss_fn must return a scalar loss. Received: shape={jnp.shape(loss)}"
                )
            return loss.astype(jnp.float32), (new_non_trainable, measurements)

        (loss, (new_non_trainable, measurements)), grads = jax.value_and_grad(
            differentiated, has_aux=True
        )(state.trainable)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        measurements = {name: jnp.asarray(v, jnp.float32) for name, v in measurements.items()}
        measurements.update(
            loss=loss,
            grad_norm=optax.global_norm(grads).astype(jnp.float32),
            param_norm=optax.global_norm(trainable).astype(jnp.float32),
            update_norm=optax.global_norm(updates).astype(jnp.float32),
        )
        lr = learning_rate_of(opt_state)
        if lr is not None:
            measurements["lr"] = lr
        new_state = TrainState(
            trainable=list(trainable),
            non_trainable=list(new_non_trainable),
            opt_state=opt_state,
            step=state.step + 1,
            rng=state.rng,
        )
        return new_state, measurements

    replicated = replicated_sharding(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(replicated, batch_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,) if donate else (),
    )
    frozen = None if frozen is None else replicate(frozen, mesh)
    return TrainStep(jitted, mesh, frozen, counter)


def make_predict_step(predict_fn: Callable, mesh: Mesh) -> Callable:
    """The jitted `predict_step(variables, images) -> logits [batch, classes]`.

    Args:
        predict_fn: `predict_fn(variables, images) -> logits`, where `variables` is any pytree
            of arrays (e.g. a model's `(trainable, non_trainable)` values) and `images` the
            batch's `[batch, H, W, 3]` images.
        mesh: from `make_mesh`; `images` are split over "data", the logits come back replicated.
    """
    replicated = replicated_sharding(mesh)
    return jax.jit(
        predict_fn,
        in_shardings=(replicated, batch_sharding(mesh)),
        out_shardings=replicated,
    )


def predict(
    predict_step: Callable,
    variables: Any,
    batches: Iterable[Mapping[str, Any]],
    mesh: Mesh,
    *,
    description: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every real example of `batches`, each counted once.

    Padded rows (`batch["mask"]` False, the tail of the last evaluation batch) are dropped.
    With several processes each one passes its own share of every batch; the logits, labels
    and masks of the whole global batch come back to every process, so each returns all of them.

    Returns:
        `(logits [N, classes], labels [N])` as numpy arrays on the host (N over all processes).
    """
    variables = replicate(variables, mesh)
    gather = _gather_step(mesh)
    logits, labels = [], []
    quiet = description is None or jax.process_index() != 0
    for batch in tqdm(batches, desc=description, leave=False, disable=quiet):
        mask = np.asarray(batch.get("mask", np.ones(len(batch["images"]), bool)), bool)
        local = {"images": batch["images"], "labels": batch["labels"], "mask": mask}
        device_batch = shard_batch(local, mesh)
        batch_logits = predict_step(variables, device_batch["images"])
        batch_labels, keep = gather(device_batch["labels"], device_batch["mask"])
        keep = np.asarray(keep)
        logits.append(np.asarray(batch_logits)[keep])
        labels.append(np.asarray(batch_labels)[keep])
    return np.concatenate(logits), np.concatenate(labels)


@functools.cache
def _gather_step(mesh: Mesh) -> Callable:
    """Jitted `(labels, mask) -> (labels, mask)`: a batch split over "data" made whole (replicated)
    on every device, in the row order of the logits."""
    return jax.jit(lambda *arrays: arrays, out_shardings=replicated_sharding(mesh))


# ---------------------------------------------------------------------------------------------
# The epoch loop


class _MetricsLog:
    """Appends JSON lines to `metrics.jsonl` and, optionally, TensorBoard scalars."""

    def __init__(self, workdir: Path, stage: str, tensorboard: bool, enabled: bool):
        self.path = workdir / METRICS_FILE
        self.stage, self.enabled = stage, enabled
        self._writer = None
        if enabled and tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                print(
                    "TensorBoard scalars skipped: the tensorboard package is not installed "
                    f"(pip install tensorboard); metrics go to {self.path} only."
                )
            else:
                tf = _tensorflow_on_cpu()
                self._tf = tf
                folder = workdir / TENSORBOARD_SUBDIR / stage
                folder.mkdir(parents=True, exist_ok=True)  # by Python: modes follow the umask
                self._writer = tf.summary.create_file_writer(str(folder))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as file:
            file.write(json.dumps(record, sort_keys=True) + "\n")
        if self._writer is not None:
            prefix = record.get("kind", "train")
            with self._writer.as_default(step=record["step"]):
                for name, value in record.items():
                    if name not in ("stage", "kind", "epoch", "step") and _is_number(value):
                        self._tf.summary.scalar(f"{prefix}/{name}", value)

    def drop_after(self, step: int) -> None:
        """Removes this stage's lines past `step` (the lost tail of an interrupted run)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            if not (record.get("stage") == self.stage and record.get("step", 0) > step):
                kept.append(line)
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _tensorflow_on_cpu():
    """TensorFlow for `tf.summary`, kept off accelerators (JAX owns them), imported lazily."""
    from mtkd_jax.data.tf_setup import import_tensorflow

    return import_tensorflow()


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def fit(
    state: TrainState,
    step_fn: TrainStep,
    batches_for_epoch: Callable[[int], Iterable[Mapping[str, Any]]],
    *,
    num_epochs: int,
    steps_per_epoch: int,
    workdir: str | os.PathLike,
    stage_name: str,
    resume: bool = False,
    log_every: int = 50,
    eval_fn: Callable[[TrainState, int], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    metadata: Mapping[str, Any] | None = None,
    tensorboard: bool = True,
    progress: bool = True,
) -> TrainState:
    """Runs (or resumes) the epochs of one stage and returns the final state.

    Data contract: `batches_for_epoch(epoch)` yields at least `steps_per_epoch` host batches
    (dicts of numpy arrays, equal shapes every step) for that 0-based epoch, and what it yields
    must be a deterministic function of (seed, epoch): a resumed run calls it for the next epoch
    only, and must see the same data as an uninterrupted run.

    Each epoch: steps with a tqdm bar (loss, images/s, time left); every `log_every` steps and at
    the epoch's end, the measurements since the last line are averaged and appended to
    `<workdir>/metrics.jsonl` as `{"stage", "kind": "train", "epoch", "step", <measurement>...,
    "images_per_s"}` (and to TensorBoard under `<workdir>/tensorboard/<stage>` when
    `tensorboard`); a non-finite loss or norm raises `NonFiniteLossError` with its step, before
    any checkpoint of that state; every `eval_every` epochs `eval_fn(state, epoch)` runs and its
    results are logged with `"kind": "eval"`; the state is checkpointed (atomically) to
    `<workdir>/checkpoints` after every epoch, keeping the stage's last
    `checkpoint.KEEP_PER_STAGE`. At the end the stage is marked finished, so a later run into the
    same workdir resumes (`resume=True`) or is refused.

    Args:
        state: the initial state (ignored, except as the structure to restore into, when
            resuming); donated to the step.
        step_fn: from `make_train_step`.
        batches_for_epoch: see the data contract above.
        num_epochs: epochs of the stage in total (resumed ones included).
        steps_per_epoch: steps per epoch; fewer batches than this is an error.
        workdir: the run directory.
        stage_name: e.g. "stage1"; names checkpoints, log lines and the finished marker.
        resume: continue from the latest checkpoint of this stage in `workdir`; without it a
            workdir that holds this stage is refused.
        log_every: steps between log lines (and host syncs).
        eval_fn: `eval_fn(state, epoch) -> {name: float}`; must not keep `state` (its buffers
            are donated to the next step).
        eval_every: run `eval_fn` every this many epochs (0: never).
        metadata: extra JSON stored in every checkpoint (e.g. the flags).
        tensorboard: also write TensorBoard scalars (via `tf.summary`, TensorFlow kept on CPU).
        progress: show the tqdm bars.

    Returns:
        The final state (replicated on the step's mesh).
    """
    for name, value in (("num_epochs", num_epochs), ("steps_per_epoch", steps_per_epoch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive integer. Received: log_every={log_every!r}")
    workdir = Path(workdir)
    directory = checkpoint.checkpoint_dir(workdir)
    is_writer = jax.process_index() == 0
    found = checkpoint.guard_workdir(workdir, stage_name, resume=resume)
    workdir.mkdir(parents=True, exist_ok=True)
    # Every process has read the workdir's state before process 0 writes to it.
    distributed.barrier(f"fit {stage_name}: start")
    log = _MetricsLog(workdir, stage_name, tensorboard, enabled=is_writer)

    start_epoch = 0
    if found is None:
        log.drop_after(0)  # lines of an earlier attempt that died before its first checkpoint
    else:
        found, restored, saved = checkpoint.restore_latest_readable(directory, stage_name, state)
        state = replicate(restored, step_fn.mesh)
        start_epoch = int(saved["epoch"]) + 1
        log.drop_after(int(saved["step"]))
        print(f"{stage_name}: resuming from {found} (epoch {saved['epoch']} done)")

    def save(epoch: int) -> None:
        if is_writer:
            meta = dict(metadata or {}, stage=stage_name, epoch=epoch, step=_host_int(state.step))
            meta["rng"] = np.asarray(_host(state.rng)).tolist()
            checkpoint.save(directory, state, meta)

    try:
        for epoch in range(start_epoch, num_epochs):
            state = _run_epoch(
                state,
                step_fn,
                batches_for_epoch(epoch),
                epoch=epoch,
                num_epochs=num_epochs,
                steps_per_epoch=steps_per_epoch,
                stage_name=stage_name,
                log_every=log_every,
                log=log,
                progress=progress and is_writer,
            )
            if eval_fn is not None and eval_every and (epoch + 1) % eval_every == 0:
                results = {k: float(v) for k, v in eval_fn(state, epoch).items()}
                step = _host_int(state.step)
                log.write({"stage": stage_name, "kind": "eval", "epoch": epoch, "step": step,
                           **results})  # fmt: skip
            save(epoch)
        if is_writer:
            checkpoint.mark_finished(
                workdir, stage_name, {"epochs": num_epochs, "step": _host_int(state.step)}
            )
    finally:
        log.close()
    # The others read what process 0 wrote (the finished marker) only after it wrote it.
    distributed.barrier(f"fit {stage_name}: end")
    return state


def _run_epoch(
    state, step_fn, batches, *, epoch, num_epochs, steps_per_epoch, stage_name, log_every, log,
    progress,
):  # fmt: skip
    """One epoch of steps; returns the state."""
    bar = tqdm(
        total=steps_per_epoch,
        desc=f"{stage_name} epoch {epoch + 1}/{num_epochs}",
        disable=not progress,
        dynamic_ncols=True,
    )
    pending = []
    first_step = _host_int(state.step)
    last_time, images = time.perf_counter(), 0
    taken = 0
    with bar:
        for taken, batch in enumerate(itertools.islice(batches, steps_per_epoch), start=1):
            device_batch = shard_batch(batch, step_fn.mesh)
            state, measurements = step_fn(state, device_batch)
            pending.append(measurements)
            images += next(iter(device_batch.values())).shape[0]
            bar.update(1)
            if taken % log_every == 0 or taken == steps_per_epoch:
                now = time.perf_counter()
                values = _check_finite(
                    jax.device_get(pending), stage_name, epoch, first_step + taken - len(pending)
                )
                mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
                rate = images / max(now - last_time, 1e-9)
                log.write({"stage": stage_name, "kind": "train", "epoch": epoch,
                           "step": first_step + taken, **mean, "images_per_s": rate})  # fmt: skip
                bar.set_postfix(loss=f"{mean['loss']:.4g}", img_s=f"{rate:.1f}")
                pending, last_time, images = [], now, 0
    if taken < steps_per_epoch:
        raise ValueError(
            f"batches_for_epoch({epoch}) yielded {taken} batches; {stage_name} needs "
            f"steps_per_epoch={steps_per_epoch} per epoch (the pipeline must repeat or be long "
            "enough, with drop_remainder)."
        )
    return state


def _check_finite(values: list[dict], stage_name: str, epoch: int, first_step: int) -> list[dict]:
    """Raises `NonFiniteLossError` at the first step whose loss or norms are not finite."""
    for offset, measurements in enumerate(values):
        bad = [k for k in _MUST_BE_FINITE if k in measurements and not np.isfinite(measurements[k])]
        if bad:
            raise NonFiniteLossError(
                stage=stage_name, epoch=epoch, step=first_step + offset + 1, names=bad
            )
    return values


def _host(value):
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)
    return jax.device_get(value)


def _host_int(value) -> int:
    return int(_host(value))
