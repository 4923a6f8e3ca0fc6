"""TensorFlow for input pipelines only: imported once here and kept off every accelerator.

The data code uses TensorFlow (tf.data, image decoding, TFDS) on the host CPU while JAX owns
the GPUs/TPUs. Every module of `mtkd_jax.data` that needs TensorFlow imports it through
`import_tensorflow()`, which hides the accelerators from TensorFlow the first time, before
TensorFlow touches them, so it neither grabs GPU memory nor competes with JAX.
"""

import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def import_tensorflow():
    """Returns the `tensorflow` module with GPUs and TPUs made invisible to it (once)."""
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError) as error:  # already initialised, or no such kind
            logger.debug("Could not hide %s devices from TensorFlow: %s", kind, error)
    return tf
