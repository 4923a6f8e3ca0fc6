"""Convert a CLIP checkpoint (and optionally PromptKD prompts) into our own Keras format.

    python -m mtkd_jax.convert SRC DST [--prompts CKPT] [--overwrite]

SRC is anything `mtkd_jax.clip.load` reads (OpenAI `.pt`, Hugging Face directory, `hf:<repo>`,
`keras_hub:<preset>`). DST becomes a directory with `clip_config.json`, `model.weights.h5`,
`vocab.json` and `merges.txt`, which `mtkd_jax.clip.load(DST)` reads without torch. The
directory is written under a temporary name and renamed when complete, so an interrupted
conversion never leaves a half-written DST; an existing DST is kept unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

import mtkd_jax  # noqa: F401  (sets KERAS_BACKEND before Keras is imported)


def convert(source: str, destination: str, prompts: str | None = None, overwrite: bool = False):
    """Load `source` (+ `prompts`) and write it to `destination` atomically; returns the model."""
    from mtkd_jax.clip import load, load_tokenizer, save

    destination = os.path.abspath(destination)
    if os.path.exists(destination) and not overwrite:
        raise FileExistsError(
            f"The destination exists. Pass overwrite=True (--overwrite) to replace it. "
            f"Received: destination={destination!r}"
        )
    model = load(source, prompts=prompts)
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{os.path.basename(destination)}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        save(model, temporary, tokenizer=load_tokenizer(source))
        if os.path.exists(destination):
            retired = f"{temporary}-old"
            os.rename(destination, retired)
            os.rename(temporary, destination)
            shutil.rmtree(retired)
        else:
            os.rename(temporary, destination)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mtkd_jax.convert", description=__doc__)
    parser.add_argument("source", help="OpenAI .pt, HF directory, hf:<repo>, keras_hub:<preset>")
    parser.add_argument("destination", help="output directory (our format)")
    parser.add_argument("--prompts", default=None, help="PromptKD/PromptSRC model-best.pth.tar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    if os.path.exists(args.destination) and not args.overwrite:
        parser.error(f"{args.destination!r} exists; pass --overwrite to replace it")
    start = time.perf_counter()
    model = convert(args.source, args.destination, args.prompts, args.overwrite)
    parameters = sum(int(np.prod(v.shape)) for v in model.weights)
    print(
        f"Wrote {args.destination} ({parameters:,} parameters, config {model.config}) "
        f"in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
