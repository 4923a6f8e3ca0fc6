"""Multi-process runs on JAX's own runtime (`jax.distributed`): start-up, who writes, barriers.

One process per host (or per GPU); every process runs the same program on its share of each
global batch (`mtkd_jax.data.pipeline`, `mtkd_jax.train.shard_batch`). What this module adds:

- `initialize`: `jax.distributed.initialize` with the launch flags (`--coordinator_address`,
  `--num_processes`, `--process_id`, `--local_device_ids`); with none of them JAX detects the
  cluster itself (TPU pods, SLURM, Open MPI, Kubernetes). On CPU it asks for JAX's gloo
  collectives, without which CPU devices of different processes cannot talk.
- `on_primary(fn)`: files are written by process 0 only; the others wait at a barrier until it
  is done (so they may read what it wrote), and an error on process 0 is raised on every
  process instead of leaving the others waiting for it.
- `primary_first(fn)`: process 0 first, then the others (e.g. a dataset download into a folder
  the hosts may share).

On one process every function here is a plain call: no barrier, no collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import numpy as np

T = TypeVar("T")

# The longest error message of process 0 passed on to the other processes (bytes of UTF-8).
_MESSAGE_BYTES = 2048


class PrimaryProcessError(RuntimeError):
    """Process 0 failed at a step every process waits for; raised on the other processes."""


def initialize(
    *,
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    local_device_ids: Sequence[int] = (),
) -> None:
    """Joins this process to the job: `jax.distributed.initialize` with the given settings.

    Args:
      coordinator_address: `HOST:PORT` of process 0's coordinator ("": detect it).
      num_processes: processes in the job (0: detect).
      process_id: this process's index in `[0, num_processes)` (-1: detect).
      local_device_ids: the local devices this process uses (empty: all, or what is detected).

    Must run before anything else touches JAX's devices.
    """
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        # CPU devices of different processes reach each other only through these collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    settings = {
        "coordinator_address": coordinator_address or None,
        "num_processes": num_processes or None,
        "process_id": None if process_id < 0 else process_id,
        "local_device_ids": list(local_device_ids) or None,
    }
    jax.distributed.initialize(**{k: v for k, v in settings.items() if v is not None})


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process got here (`name` must be the same on all of them)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def on_primary(fn: Callable[[], T], *, what: str) -> T | None:
    """Runs `fn` on process 0 only; every process returns once it is done.

    Returns `fn()`'s value on process 0 and None on the others. If `fn` raises on process 0,
    it raises there and `PrimaryProcessError` (with its message) on every other process.

    Args:
      fn: the work of process 0 (writing a file, preparing the workdir).
      what: a few words naming the work, for the other processes' error message.
    """
    if jax.process_count() == 1:
        return fn()
    result, error = None, None
    if is_primary():
        try:
            result = fn()
        except Exception as caught:  # Passed on to the other processes, then re-raised.
            error = caught
    message = _broadcast_text(f"{type(error).__name__}: {error}" if error is not None else "")
    if error is not None:
        raise error
    if message:
        raise PrimaryProcessError(f"Process 0 failed while {what}: {message}")
    return result


def primary_first(fn: Callable[[], T], *, what: str) -> T:
    """Runs `fn` on process 0, then on the other processes; every process returns `fn()`.

    For work whose result may be shared through the file system (a download into a shared
    folder): process 0 does it alone first, the others then find it done (or, where their
    folder is host-local, do it themselves).
    """
    result = on_primary(fn, what=what)
    return result if is_primary() else fn()


def _broadcast_text(text: str) -> str:
    """Process 0's `text` on every process (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    encoded = text.encode("utf-8")[:_MESSAGE_BYTES]
    buffer = np.zeros(_MESSAGE_BYTES + 4, np.uint8)
    buffer[:4] = np.frombuffer(np.uint32(len(encoded)).tobytes(), np.uint8)
    buffer[4 : 4 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
    length = int(np.frombuffer(received[:4].tobytes(), np.uint32)[0])
    return received[4 : 4 + length].tobytes().decode("utf-8", errors="replace")
