"""Benchmark: convert a ViT-L/14 CLIP checkpoint (OpenAI layout, float16) into our format.

    .venv/bin/python benchmarks/bench_convert.py [--workdir DIR] [--preset ViT-L/14]

Writes a random state dict with OpenAI's names and shapes (float16 plus the int buffers, as in
OpenAI's `ViT-L-14.pt`; a plain `torch.save` file, so torch is needed for this setup step only),
then runs `python -m mtkd_jax.convert` on it in a child process and reports its wall time and
peak resident memory (`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`). Targets (issue 3):
under 90 s on a 2-core CPU, and peak RAM under 3 × the model's float32 size.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def openai_state_dict(config, rng):
    """Random tensors with OpenAI CLIP's names and shapes (float16), plus its int buffers."""
    import torch

    def tensor(*shape):
        return torch.from_numpy(
            rng.standard_normal(shape, dtype=np.float32).astype(np.float16) * 0.02
        )

    state = {}

    def blocks(prefix, width, layers):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            state[f"{p}.attn.in_proj_weight"] = tensor(3 * width, width)
            state[f"{p}.attn.in_proj_bias"] = tensor(3 * width)
            state[f"{p}.attn.out_proj.weight"] = tensor(width, width)
            state[f"{p}.attn.out_proj.bias"] = tensor(width)
            for norm in ("ln_1", "ln_2"):
                state[f"{p}.{norm}.weight"] = tensor(width)
                state[f"{p}.{norm}.bias"] = tensor(width)
            state[f"{p}.mlp.c_fc.weight"] = tensor(4 * width, width)
            state[f"{p}.mlp.c_fc.bias"] = tensor(4 * width)
            state[f"{p}.mlp.c_proj.weight"] = tensor(width, 4 * width)
            state[f"{p}.mlp.c_proj.bias"] = tensor(width)

    vw, tw = config.vision_width, config.text_width
    state["visual.conv1.weight"] = tensor(vw, 3, config.patch_size, config.patch_size)
    state["visual.class_embedding"] = tensor(vw)
    state["visual.positional_embedding"] = tensor(config.num_patches + 1, vw)
    for norm in ("ln_pre", "ln_post"):
        state[f"visual.{norm}.weight"] = tensor(vw)
        state[f"visual.{norm}.bias"] = tensor(vw)
    blocks("visual.transformer", vw, config.vision_layers)
    state["visual.proj"] = tensor(vw, config.embed_dim)
    state["token_embedding.weight"] = tensor(config.vocab_size, tw)
    state["positional_embedding"] = tensor(config.context_length, tw)
    blocks("transformer", tw, config.text_layers)
    state["ln_final.weight"] = tensor(tw)
    state["ln_final.bias"] = tensor(tw)
    state["text_projection"] = tensor(tw, config.embed_dim)
    state["logit_scale"] = torch.tensor(4.6052, dtype=torch.float32)
    state["input_resolution"] = torch.tensor(config.image_size)
    state["context_length"] = torch.tensor(config.context_length)
    state["vocab_size"] = torch.tensor(config.vocab_size)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--preset", default="ViT-L/14")
    args = parser.parse_args()

    import torch

    from mtkd_jax.clip.config import CLIPConfig

    config = CLIPConfig.preset(args.preset)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    source = os.path.join(workdir, "random-openai.pt")
    destination = os.path.join(workdir, "converted")
    start = time.perf_counter()
    state = openai_state_dict(config, np.random.default_rng(0))
    parameters = sum(v.numel() for k, v in state.items() if v.is_floating_point())
    torch.save(state, source)
    del state
    print(f"setup: wrote {source} ({os.path.getsize(source) / 2**30:.2f} GiB, "
          f"{parameters:,} parameters) in {time.perf_counter() - start:.1f} s")  # fmt: skip

    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mtkd_jax.convert", source, destination, "--overwrite"], check=True
    )
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kilobytes on Linux
    float32 = 4 * parameters
    print(
        f"convert {args.preset}: {wall:.1f} s wall (target < 90 s); "
        f"peak RSS {peak / 2**30:.2f} GiB = {peak / float32:.2f} × float32 size "
        f"{float32 / 2**30:.2f} GiB (target < 3 ×)"
    )


if __name__ == "__main__":
    main()
