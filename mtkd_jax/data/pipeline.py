"""Batches of preprocessed images for JAX: tf.data decoding and augmentation, numpy out.

`make_batches(split, image_size=, batch_size=, training=, seed=)` yields dicts of numpy arrays:
  * "images": float32 `[B, S, S, 3]` (NHWC, CLIP-normalised);
  * "labels": int32 `[B]`, only when `labeled=True`. Stage-1 (unlabeled) batches are built from
    a stream that never carries the labels, so the key does not exist, rather than being ignored;
  * "mask": bool `[B]`, False on padding.

Order and sharding are decided in numpy, then tf.data reads, decodes (in parallel) and
augments:
  * evaluation: every example exactly once, in split order; host p of P reads examples p, p+P,
    ...; every host yields the same number of batches (`steps_per_epoch`), the last ones padded
    with zeros and mask False, so no test image is dropped or counted twice;
  * training: a reshuffled permutation per epoch (seeded, identical on all hosts), cut into
    full global batches as one continuous stream, so a split smaller than a batch still gives
    full batches; host p takes the p-th block of rows of every global batch, so the global
    batch (hosts' blocks in process order, as `mtkd_jax.train.shard_batch` assembles it) and
    its augmentation are the same whatever the number of hosts; `epochs * steps_per_epoch`
    batches, or endless with `epochs=None`. With `partial_batches=True` a split smaller than
    the batch gives instead one batch per epoch holding each of its examples once (as Dassl
    keeps the partial batch), the rest of the rows filled with copies of real ones and "mask"
    False on them, so losses that honour the mask see each example once and BatchNorm
    statistics see real images only.
`batch_size` is the global batch; each host yields `batch_size // process_count` rows.

Image files are checked and made decodable as upright RGB by `mtkd_jax.data.images`. With
`strict=True` (the runs' default, `--strict_data`) an unusable image stops the iteration with
`BadImageError` naming the file and why; with `strict=False` it is skipped, listed in
`BatchIterator.skipped`, recorded (`images.record_skipped`, for results.json) and every one of
them is named in a warning when the iteration ends. TensorFlow never sees an accelerator
(`tf_setup`).
"""

import functools
import itertools
import logging
import math
from collections import deque

import numpy as np

from mtkd_jax.data import fewshot, images, preprocess
from mtkd_jax.data.dataset import Split
from mtkd_jax.data.tf_setup import import_tensorflow
from mtkd_jax.errors import InputError

tf = import_tensorflow()
logger = logging.getLogger(__name__)


def _hosts(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            "Need 0 <= process_index < process_count. Received: "
            f"process_index={process_index!r}, process_count={process_count!r}"
        )
    return process_index, process_count


def _local_batch(batch_size: int, process_count: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % process_count:
        raise ValueError(
            "batch_size (the global batch) must be a positive multiple of the number of hosts "
            f"({process_count}). Received: batch_size={batch_size!r}"
        )
    return batch_size // process_count


def steps_per_epoch(
    split_len: int, batch_size: int, training: bool, process_count: int | None = None
) -> int:
    """Batches per epoch on every host.

    Training: max(1, N // B) full global batches, whatever the number of hosts P. Evaluation:
    ceil(ceil(N / P) / (B // P)) batches, enough for every example once.
    """
    _, process_count = _hosts(0, process_count)
    local = _local_batch(batch_size, process_count)
    if training:
        return max(1, split_len // batch_size)
    return math.ceil(math.ceil(split_len / process_count) / local)


def make_batches(
    split: Split,
    *,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int = 0,
    labeled: bool = True,
    epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    strict: bool = False,
    min_crop_scale: float = preprocess.CROP_SCALE[0],
    partial_batches: bool = False,
) -> "BatchIterator":
    """An iterable of batches of `split` (see the module docstring for their content).

    Args:
      split: the examples (file paths, encoded bytes or a uint8 array).
      image_size: output side S (the model's resolution).
      batch_size: global batch size B.
      training: random resized crop + flip and reshuffling, or the deterministic eval transform.
      seed: seeds the order and the augmentation (training only).
      labeled: include "labels"; False for stage 1, whose batches then have no labels key.
      epochs: training epochs to yield (None: endless); evaluation always makes one pass.
      process_index, process_count: this host and the number of hosts (default: JAX's).
      strict: fail naming the file on the first unreadable image instead of skipping it.
      min_crop_scale: the smallest area of the training random resized crop, as a fraction of
        the image (torchvision's and the paper's 0.08).
      partial_batches: training on a split with fewer examples per host than the local batch:
        one masked batch per epoch (see the module docstring) instead of batches that wrap
        around into the next epoch's order.
    """
    if not isinstance(split, Split):
        raise ValueError(f"make_batches needs a Split. Received: {type(split).__name__}")
    if len(split) == 0:
        raise ValueError("The split is empty: there is nothing to batch.")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int. Received: image_size={image_size!r}")
    if not 0.0 < min_crop_scale <= 1.0:
        raise ValueError(f"min_crop_scale must be in (0, 1]. Received: {min_crop_scale!r}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be a positive int or None. Received: epochs={epochs!r}")
    index, count = _hosts(process_index, process_count)
    if training and len(split) < count:
        raise ValueError(
            f"A training split needs at least one example per host. Received: {len(split)} "
            f"examples for {count} hosts"
        )
    if training and partial_batches and count > 1 and len(split) < batch_size:
        # Each host reads a block of every global batch; a masked partial batch would need
        # blocks of unequal sizes, which this layout does not make.
        raise InputError(
            f"A training split of {len(split)} examples is smaller than the global batch "
            f"({batch_size}) on {count} hosts; a partial batch is only made on one host. Lower "
            f"--batch_size to at most {len(split) - len(split) % count} or run on one host."
        )
    if training and epochs is None:
        num_batches = None
    else:
        num_batches = steps_per_epoch(len(split), batch_size, training, count) * (
            epochs if training else 1
        )
    return BatchIterator(
        split,
        image_size=image_size,
        local_batch=_local_batch(batch_size, count),
        training=training,
        seed=seed,
        labeled=labeled,
        num_batches=num_batches,
        process_index=index,
        process_count=count,
        strict=strict,
        min_crop_scale=min_crop_scale,
        partial_batches=partial_batches,
    )


class BatchIterator:
    """Iterable of numpy batch dicts; `len()` is the number of batches (when finite).

    Attributes:
      skipped: ids of the images that could not be read or decoded so far.
    """

    def __init__(
        self,
        split: Split,
        *,
        image_size: int,
        local_batch: int,
        training: bool,
        seed: int,
        labeled: bool,
        num_batches: int | None,
        process_index: int,
        process_count: int,
        strict: bool,
        min_crop_scale: float = preprocess.CROP_SCALE[0],
        partial_batches: bool = False,
    ):
        self.split = split
        self.image_size = image_size
        self.local_batch = local_batch
        self.training = training
        self.seed = seed
        self.labeled = labeled
        self.num_batches = num_batches
        self.process_index = process_index
        self.process_count = process_count
        self.strict = strict
        self.min_crop_scale = min_crop_scale
        per_host = len(split) // process_count
        # A training split smaller than the batch: one partial batch per epoch (then padded).
        self.epoch_batch = (
            per_host if training and partial_batches and per_host < local_batch else None
        )
        self.skipped: list[str] = []
        self.problems: dict[str, str] = {}  # path (or id) -> why it could not be used

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("An endless training iterator (epochs=None) has no length.")
        return self.num_batches

    # The stream of (position in split, augmentation counter), this host's share.
    def _order(self):
        n, p, count = len(self.split), self.process_index, self.process_count
        if not self.training:
            for position in range(p, n, count):
                yield position, position
            return
        # The i-th row of this host is row p * local + i % local of global batch i // local,
        # at place `index` of the stream of epochs' permutations (and its augmentation counter).
        local = self.local_batch
        epoch, perm = -1, None
        for i in itertools.count():
            index = (i // local) * local * count + p * local + i % local
            if index // n != epoch:
                epoch = index // n
                perm = fewshot.stable_rng("train-order", self.seed, epoch).permutation(n)
            yield int(perm[index % n]), index

    def _payload(self, position: int):
        """The image of one example as the pipeline wants it, or None if unreadable."""
        split = self.split
        if split.kind == "images":
            return split.images[position]
        if split.kind == "encoded":
            return split.encoded[position]
        path = str(split.paths[position])
        try:
            return images.encoded_rgb(path)
        except images.BadImageError as error:
            self.problems.setdefault(path, error.reason)
            return None

    def _dataset(self, emitted: deque):
        split = self.split
        labeled = self.labeled
        if split.kind == "images":
            payload_spec = tf.TensorSpec(split.images.shape[1:], tf.uint8)
        else:
            payload_spec = tf.TensorSpec([], tf.string)
        signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64), payload_spec)
        if labeled:
            signature += (tf.TensorSpec([], tf.int32),)

        def generate():
            for position, counter in self._order():
                payload = self._payload(position)
                if payload is None:
                    self.skipped.append(str(split.ids[position]))
                    continue
                emitted.append(position)
                item = (position, counter, payload)
                yield item + (split.labels[position],) if labeled else item

        transform = _transform(
            signature,
            image_size=self.image_size,
            training=self.training,
            decode=split.kind != "images",
            min_crop_scale=self.min_crop_scale,
        )
        seed = tf.constant(self.seed, tf.int64)
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
        ds = ds.map(
            lambda *item: transform(seed, *item),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.ignore_errors()
        ds = ds.batch(self.epoch_batch or self.local_batch, drop_remainder=self.training)
        return ds.prefetch(tf.data.AUTOTUNE)

    def __iter__(self):
        self.skipped, self.problems = [], {}
        try:
            yield from self._batches()
        finally:  # also when the consumer stops early (a training epoch takes what it needs)
            self._report_skipped()

    def _batches(self):
        emitted: deque = deque()
        produced = 0
        for batch in self._dataset(emitted).as_numpy_iterator():
            if self.num_batches is not None and produced == self.num_batches:
                break
            for position in batch.pop("position"):
                while emitted and emitted[0] != position:
                    self._decode_failed(emitted.popleft())
                emitted.popleft()
            self._check_strict()
            yield self._pad(batch)
            produced += 1
        if not self.training:
            # Images dropped after the last delivered one.
            while emitted:
                self._decode_failed(emitted.popleft())
            self._check_strict()
            while produced < self.num_batches:
                yield self._pad(None)
                produced += 1

    def _decode_failed(self, position: int) -> None:
        """TensorFlow could not decode or transform an image that passed the file checks."""
        split = self.split
        self.skipped.append(str(split.ids[position]))
        where = split.paths[position] if split.paths is not None else split.ids[position]
        self.problems.setdefault(str(where), "TensorFlow cannot decode it (corrupt image data)")

    def _check_strict(self):
        if self.strict and self.problems:
            path, reason = next(iter(self.problems.items()))
            raise images.bad_image(path, reason)

    def _report_skipped(self):
        if not self.problems:
            return
        for path, reason in self.problems.items():
            images.record_skipped(path, reason)
        logger.warning(
            "Skipped %d unusable image(s); they are left out of every batch (--strict_data "
            "stops on them instead):\n  %s",
            len(self.problems),
            "\n  ".join(f"{path}: {reason}" for path, reason in self.problems.items()),
        )

    def _pad(self, batch):
        """Pads a short (or missing) batch to the local batch size; adds the mask."""
        size, b = self.image_size, self.local_batch
        n = 0 if batch is None else len(batch["images"])
        if n == b:
            batch["mask"] = np.ones((b,), bool)
            return batch
        out = {"images": np.zeros((b, size, size, 3), np.float32)}
        if self.labeled:
            out["labels"] = np.zeros((b,), np.int32)
        if batch is not None:
            for key in out:
                out[key][:n] = batch[key]
        if self.epoch_batch and n:  # Training: fill with copies of real rows (masked out).
            for key in out:
                out[key][n:] = batch[key][np.arange(b - n) % n]
        out["mask"] = np.arange(b) < n
        return out


@functools.cache
def _transform(signature, *, image_size, training, decode, min_crop_scale):
    """The per-example map function, traced once per setting and reused by every epoch's
    pipeline (an epoch only changes the seed, an argument), which saves a retrace per epoch.

    `transform(seed, position, counter, payload[, label])` → `{"position", "images"[,
    "labels"]}`; the training augmentation is seeded by `(seed, counter)`.
    """

    @tf.function(input_signature=(tf.TensorSpec([], tf.int64), *signature))
    def transform(seed, position, counter, payload, *label):
        image = preprocess.decode_rgb(payload) if decode else payload
        if training:
            image = preprocess.train_transform(
                image, image_size, tf.stack([seed, counter]), min_crop_scale
            )
        else:
            image = preprocess.eval_transform(image, image_size)
        out = {"position": position, "images": image}
        if label:
            out["labels"] = label[0]
        return out

    return transform
