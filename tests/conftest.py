"""Test-wide setup: Keras runs on JAX whatever a test module imports first."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
