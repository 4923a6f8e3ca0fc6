"""Datasets for MTKD: names, sources, few-shot and base/novel protocol, input pipelines.

    from mtkd_jax.data import load_dataset
    from mtkd_jax.data.pipeline import make_batches

    ds = load_dataset("oxford_pets", source="auto", root="DATA")
    train, val = ds.few_shot(k=16, seed=1)
    for batch in make_batches(ds.subsample("test", "base"), image_size=224, batch_size=64,
                              training=False):
        ...  # batch["images"] [64, 224, 224, 3], batch["labels"] [64], batch["mask"] [64]

Importing this package imports neither TensorFlow nor Keras; the modules that need TensorFlow
(`pipeline`, `preprocess`, `tfds_source`) import it through `tf_setup.import_tensorflow()`,
which first hides every GPU/TPU from it, so JAX alone owns the accelerators.
"""

from mtkd_jax.data.dataset import FewShotDataset, Split
from mtkd_jax.data.loader import SOURCES, load_dataset
from mtkd_jax.data.registry import CLIP_MEAN, CLIP_STD, DATASET_NAMES

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASET_NAMES",
    "SOURCES",
    "FewShotDataset",
    "Split",
    "load_dataset",
]
