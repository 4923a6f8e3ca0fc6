"""PromptKD / PromptSRC prompt checkpoints (Dassl's `model-best.pth.tar`), and the MTKD reference
code's prompt names, → the deep-prompt variables of our CLIP.

Only the prompts come from such a file: the frozen CLIP weights that Dassl checkpoints also carry
are ignored, since the base model comes from its own source. The prompt length and depth of each
tower are read from the tensors (`prompt_settings`). The MTKD names (`image_encoder.initial_prompt`,
`…resblocks.<i>.new_prompt`) are renamed to PromptSRC's (`VPT`, `VPT_shallow`) on reading.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from mtkd_jax.clip.porting import Table, TableBuilder, read_state_dict
from mtkd_jax.errors import InputError

PROMPTKD_VISION = re.compile(
    r"image_encoder\.transformer\.resblocks\.(\d+)\.(VPT_shallow|new_prompt)$"
)
PROMPTKD_TEXT = re.compile(
    r"text_encoder\.transformer\.resblocks\.(\d+)\.(VPT_shallow|new_prompt)$"
)


_PROMPT_RENAMES = (
    (re.compile(r"^image_encoder\.initial_prompt$"), "image_encoder.VPT"),
    (
        re.compile(r"^(image_encoder|text_encoder)(\.transformer\.resblocks\.\d+)\.new_prompt$"),
        r"\1\2.VPT_shallow",
    ),
)
_PROMPT_NAMES = re.compile(
    r"^(image_encoder\.VPT|prompt_learner\.ctx|"
    r"(image_encoder|text_encoder)\.transformer\.resblocks\.\d+\.VPT_shallow)$"
)


def ignored_in_prompts(name: str) -> bool:
    """Derived buffers, and the frozen CLIP weights that Dassl checkpoints also carry: the base
    model comes from `source`, only the prompts come from this file."""
    if name.startswith(("prompt_learner.token_prefix", "prompt_learner.token_suffix")):
        return True
    frozen = name.startswith(("image_encoder.", "text_encoder.")) or name == "logit_scale"
    return frozen and not _PROMPT_NAMES.match(name)


def read_prompts(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a PromptKD/PromptSRC (or MTKD reference) checkpoint, with the MTKD names
    (`initial_prompt`, `new_prompt`) renamed to PromptSRC's (`VPT`, `VPT_shallow`)."""
    path = os.fspath(path)
    tensors = read_state_dict(path)
    renamed = {}
    for name, array in tensors.items():
        name = name.removeprefix("module.")
        for pattern, replacement in _PROMPT_RENAMES:
            name = pattern.sub(replacement, name)
        renamed[name] = array
    return renamed


def prompt_settings(tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Prompt lengths and depths of a prompt checkpoint (0 where a tower has no prompts)."""
    settings = {}
    for tower, first, pattern in (
        ("vision", "image_encoder.VPT", PROMPTKD_VISION),
        ("text", "prompt_learner.ctx", PROMPTKD_TEXT),
    ):
        layers = {int(m.group(1)): name for name in tensors if (m := pattern.match(name))}
        length = 0
        if first in tensors:
            length = tensors[first].shape[0]
        elif layers:
            length = tensors[layers[min(layers)]].shape[0]
        depth = (max(layers) + 1) if layers else (1 if first in tensors else 0)
        settings[f"{tower}_prompt_length"] = int(length)
        settings[f"{tower}_prompt_depth"] = int(depth)
    if not any(settings.values()):
        raise InputError(
            "No prompt tensors found: expected 'prompt_learner.ctx', 'image_encoder.VPT' and "
            "'…resblocks.<i>.VPT_shallow' (or the MTKD names 'image_encoder.initial_prompt', "
            f"'…new_prompt'). Received names such as {sorted(tensors)[:8]}"
        )
    return settings


def prompt_table(model) -> Table:
    """PromptSRC/PromptKD prompt names → our prompt variables (after `read_prompts`' renames)."""
    builder = TableBuilder()
    if model.visual.prompts is not None:
        tokens = model.visual.prompts.tokens
        builder.add("image_encoder.VPT", tokens[0])
        for i in range(1, len(tokens)):
            builder.add(f"image_encoder.transformer.resblocks.{i}.VPT_shallow", tokens[i])
    if model.text.prompts is not None:
        tokens = model.text.prompts.tokens
        builder.add("prompt_learner.ctx", tokens[0])
        for i in range(1, len(tokens)):
            builder.add(f"text_encoder.transformer.resblocks.{i}.VPT_shallow", tokens[i])
    return builder.table
