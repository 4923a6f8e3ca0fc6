"""One short warning instead of a traceback per layer when a flash-attention kernel refuses.

In bfloat16 on a GPU (or TPU), Keras's multi-head attention first tries cuDNN's (or Splash)
flash-attention kernel and, where the kernel refuses the shapes, logs the whole traceback and
computes the same attention with XLA. For CLIP that happens to every block of an encoder that
trains with an odd number of tokens (ViT-B/16 with 4 prompts: 201), at every trace: measured
on an H200 (JAX 0.11.2, `benchmarks/bench_stage1.py`), 12 tracebacks per stage-1 step trace,
while the teacher's forward runs on cuDNN, which makes the bfloat16 step 1.17x faster than
XLA attention everywhere. So Keras keeps its choice and this filter replaces those tracebacks
with one warning per process.
"""

from __future__ import annotations

import logging

# The start of the messages Keras (3.15) logs before falling back to XLA attention.
FALLBACK_MESSAGES = (
    "Failed to apply cudnn implementation of jax.nn.dot_product_attention",
    "Failed to apply Splash kernel for flash attention",
)


class FlashFallbackFilter(logging.Filter):
    """Drops Keras's flash-attention fallback tracebacks; warns once, with the kernel's reason."""

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(FALLBACK_MESSAGES):
            return True
        self.dropped += 1
        if self.dropped == 1:
            reason = record.exc_info[1] if record.exc_info else "no reason given"
            logging.getLogger("mtkd_jax").warning(
                "A flash-attention kernel refused some attention shapes (%s); those layers use "
                "XLA attention instead: the same result, a little slower. Shown once.",
                reason,
            )
        return False


def install() -> FlashFallbackFilter:
    """Adds the filter to absl's logger (which Keras logs through), once per process."""
    logger = logging.getLogger("absl")
    for existing in logger.filters:
        if isinstance(existing, FlashFallbackFilter):
            return existing
    installed = FlashFallbackFilter()
    logger.addFilter(installed)
    return installed
