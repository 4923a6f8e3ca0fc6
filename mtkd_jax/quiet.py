"""A quiet start: TensorFlow's and JAX's accelerator probing kept off the user's screen.

On a CPU-only machine, importing TensorFlow and starting JAX print a screenful that looks like
failures: TensorFlow's C++ banners (once per shared library), `failed call to cuInit`, and JAX's
`Unable to initialize backend 'tpu' ... libtpu.so`. None of it says anything about the run.
`start_quietly()` does that start-up (TensorFlow with the accelerators hidden from it, then
JAX's backends) with the process's native stderr (file descriptor 2) captured, and writes back
every captured line except the known probing messages of `PROBING_NOISE`: a real warning or
error raised meanwhile still shows. JAX's own "backend not found" INFO lines are left out the
same way (they are logged, not printed).

This module imports neither Keras nor TensorFlow at import time.
"""

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable

# Substrings of start-up lines that only report probing for accelerators (or banners).
PROBING_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "cudart_stub.cc",
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning: Could not find TensorRT",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions",
    "Unable to initialize backend",
    "libtpu.so",
)
_JAX_PROBE_LOGGER = "jax._src.xla_bridge"


@contextlib.contextmanager
def filtered_native_stderr(noise=PROBING_NOISE):
    """Captures file descriptor 2 in the block; then writes back the lines without `noise`."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not any(pattern in line for pattern in noise)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def start_quietly(before_backends: Callable[[], None] | None = None) -> None:
    """Imports TensorFlow (accelerators hidden from it) and Keras, and starts JAX's backends,
    without their probing noise. Safe to call again: later calls do nothing new.

    Args:
      before_backends: run after the imports and before JAX starts its backends (what
        `jax.distributed.initialize` needs: a multi-process run initialises there).
    """
    probe_logger = logging.getLogger(_JAX_PROBE_LOGGER)
    level = probe_logger.level
    probe_logger.setLevel(logging.WARNING)
    try:
        with filtered_native_stderr():
            with contextlib.suppress(ImportError):
                from mtkd_jax.data.tf_setup import import_tensorflow

                import_tensorflow()
            import jax
            import keras  # noqa: F401  (keras-hub and Keras may import TensorFlow too)

            if before_backends is not None:
                before_backends()
            jax.devices()
    finally:
        probe_logger.setLevel(level)
