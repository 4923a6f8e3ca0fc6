"""mtkd_jax: multi-level two-stage few-shot knowledge distillation of CLIP, in Keras 3 and JAX.

Importing the package imports neither Keras nor TensorFlow: `mtkd_jax.losses` stays a pure JAX
module. It only sets the Keras backend to JAX (unless the user chose one already) so that any
later `import keras` from this package, or from the user's code, gets the backend we are built on.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

__version__ = "0.1.0"
