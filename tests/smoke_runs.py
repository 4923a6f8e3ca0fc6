"""What tests of the driver share: the smoke run (the demo's settings shrunk to seconds) and a
reader of the weights files runs write.

Imported by test modules as `from smoke_runs import smoke_config, read_weights` (pytest puts
`tests/` on `sys.path`, as for `conftest.py`).
"""

import numpy as np

from mtkd_jax import config as config_lib


def read_weights(path) -> dict[str, np.ndarray]:
    """Every array of a Keras `.weights.h5` file, by its path inside the file."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
        )
    return arrays


def smoke_config(workdir, *, epochs, adapter_epochs, log_every, **overrides):
    """2 shots of the shapes world, the K-shot pool as stage 1's unlabeled images, one epoch of
    stage 0, batch 16, no baselines; `epochs` (stage 1), `adapter_epochs` (stage 2) and
    `log_every` differ between the tests, so each caller states them."""
    settings = dict(
        workdir=str(workdir),
        shots=2,
        unlabeled_pool="fewshot",
        epochs=epochs,
        teacher_epochs=1,
        adapter_epochs=adapter_epochs,
        batch_size=16,
        eval_batch_size=128,
        log_every=log_every,
        baselines=(),
    )
    settings.update(overrides)
    return config_lib.demo_config(**settings)
