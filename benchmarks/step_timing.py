"""Timing of a jitted training step, shared by the step benchmarks (not itself a benchmark)."""

import dataclasses
import time

import jax


@dataclasses.dataclass
class StepTiming:
    compile_s: float  # the first call: trace, compile and one step
    seconds: float  # the timed steps, after one more un-timed warm-up step
    steps: int
    first_measurements: dict  # of the first step (the loss before any update)
    last_measurements: dict

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds


def time_train_step(step, state, batch, steps: int) -> StepTiming:
    """Runs `step(state, batch)` 2 + `steps` times; one host sync per timed window."""
    start = time.perf_counter()
    state, first = step(state, batch)
    first = jax.device_get(first)
    compile_s = time.perf_counter() - start
    state, measurements = step(state, batch)
    jax.block_until_ready(measurements)
    start = time.perf_counter()
    for _ in range(steps):
        state, measurements = step(state, batch)
    jax.block_until_ready(measurements)
    seconds = time.perf_counter() - start
    return StepTiming(compile_s, seconds, steps, first, jax.device_get(measurements))
