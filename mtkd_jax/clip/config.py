"""The shape of a CLIP model: one small dataclass, plus the architectures users ask for by name.

`CLIPConfig` holds every number that decides the weights' shapes (widths, layers, heads, patch and
image size, vocabulary, context length, projection size) and the deep-prompt settings. Nothing here
imports Keras, so loaders and the CLI can reason about a checkpoint before any model is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mtkd_jax.errors import InputError

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a CLIP model (OpenAI layout) and of its optional deep prompts.

    Heads split the width evenly. The MLP hidden size is 4 × width unless `vision_mlp_dim` /
    `text_mlp_dim` say otherwise (0: 4 × width, as in every OpenAI model; LAION's ViT-bigG/14 has
    width 1664 and MLP 8192), and every LayerNorm uses `layer_norm_eps` (OpenAI's 1e-5).
    Prompt lengths and depths of 0 give plain CLIP; the paper uses length 4 and depth 9 on both
    encoders. A depth `d` means: the tokens of prompt 0 enter before the first layer and layers
    `1 … d-1` each replace them with their own learnable tokens.
    """

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    vocab_size: int = 49408
    context_length: int = 77
    activation: str = "quick_gelu"
    vision_mlp_dim: int = 0
    text_mlp_dim: int = 0
    layer_norm_eps: float = 1e-5
    vision_prompt_length: int = 0
    vision_prompt_depth: int = 0
    text_prompt_length: int = 0
    text_prompt_depth: int = 0

    def __post_init__(self):
        positive = (
            "embed_dim",
            "image_size",
            "patch_size",
            "vision_width",
            "vision_layers",
            "vision_heads",
            "text_width",
            "text_layers",
            "text_heads",
            "vocab_size",
            "context_length",
        )
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(
                    f"CLIPConfig.{field} must be a positive int. Received: {field}={value!r}"
                )
        if self.image_size % self.patch_size:
            raise InputError(
                "image_size must be a multiple of patch_size. "
                f"Received: image_size={self.image_size}, patch_size={self.patch_size}"
            )
        for width, heads, tower in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if width % heads:
                raise InputError(
                    f"{tower}_width must be divisible by {tower}_heads. "
                    f"Received: {tower}_width={width}, {tower}_heads={heads}"
                )
        for field in ("vision_mlp_dim", "text_mlp_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(
                    f"CLIPConfig.{field} must be an int >= 0 (0: 4 × width). "
                    f"Received: {field}={value!r}"
                )
        # One spelling of OpenAI's 4 × width (0), so equal architectures compare equal.
        for tower in ("vision", "text"):
            if getattr(self, f"{tower}_mlp_dim") == 4 * getattr(self, f"{tower}_width"):
                object.__setattr__(self, f"{tower}_mlp_dim", 0)
        if not 0 < self.layer_norm_eps < 1:
            raise InputError(
                "CLIPConfig.layer_norm_eps must be in (0, 1). "
                f"Received: layer_norm_eps={self.layer_norm_eps!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise InputError(
                f"activation must be one of {ACTIVATIONS}. Received: activation={self.activation!r}"
            )
        for tower, layers in (("vision", self.vision_layers), ("text", self.text_layers)):
            length = getattr(self, f"{tower}_prompt_length")
            depth = getattr(self, f"{tower}_prompt_depth")
            if length < 0 or depth < 0 or (length == 0) != (depth == 0) or depth > layers:
                raise InputError(
                    f"{tower}_prompt_length and {tower}_prompt_depth must both be 0 (no prompts) "
                    f"or both positive, with depth <= {tower}_layers ({layers}). Received: "
                    f"{tower}_prompt_length={length}, {tower}_prompt_depth={depth}"
                )
        if self.text_prompt_length + 2 > self.context_length:
            raise InputError(
                "text_prompt_length leaves no room for start, end and class tokens. Received: "
                f"text_prompt_length={self.text_prompt_length}, "
                f"context_length={self.context_length}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_mlp_size(self) -> int:
        """Hidden size of the vision MLPs (`vision_mlp_dim`, or 4 × width when it is 0)."""
        return self.vision_mlp_dim or 4 * self.vision_width

    @property
    def text_mlp_size(self) -> int:
        """Hidden size of the text MLPs (`text_mlp_dim`, or 4 × width when it is 0)."""
        return self.text_mlp_dim or 4 * self.text_width

    def replace(self, **changes: Any) -> CLIPConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CLIPConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(
                f"Unknown CLIPConfig fields {unknown}. Valid fields: {sorted(names)}. "
                f"Received: {values!r}"
            )
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CLIPConfig:
        """An architecture by name (`ViT-B/32`, `ViT-B/16`, `ViT-L/14`, `ViT-L/14@336px`, `tiny`,
        `tiny-teacher`, `tiny-student`), with optional field overrides (e.g. prompt settings)."""
        if name not in PRESETS:
            raise InputError(
                f"Unknown CLIP preset. Valid names: {sorted(PRESETS)}. Received: {name!r}"
            )
        return cls(**{**PRESETS[name], **overrides})


_BASE_TEXT = dict(text_width=512, text_layers=12, text_heads=8)
PRESETS: dict[str, dict[str, Any]] = {
    "ViT-B/32": dict(
        embed_dim=512, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
        **_BASE_TEXT,
    ),
    "ViT-B/16": dict(
        embed_dim=512, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
        **_BASE_TEXT,
    ),
    "ViT-L/14": dict(
        embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
        text_width=768, text_layers=12, text_heads=12,
    ),
    "ViT-L/14@336px": dict(
        embed_dim=768, image_size=336, patch_size=14, vision_width=1024, vision_layers=24,
        vision_heads=16, text_width=768, text_layers=12, text_heads=12,
    ),
    # Tiny shapes for tests and the offline demo (32 px images, the real vocabulary).
    "tiny": dict(
        embed_dim=32, image_size=32, patch_size=8, vision_width=32, vision_layers=2,
        vision_heads=2, text_width=32, text_layers=2, text_heads=2,
    ),
    "tiny-teacher": dict(
        embed_dim=128, image_size=32, patch_size=4, vision_width=128, vision_layers=4,
        vision_heads=4, text_width=128, text_layers=4, text_heads=4,
    ),
    "tiny-student": dict(
        embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
        vision_heads=2, text_width=64, text_layers=2, text_heads=2,
    ),
}  # fmt: skip


def image_encoder_flops(config: CLIPConfig) -> int:
    """Multiply-adds × 2 of one image through the vision tower (analytic, matmuls only).

    Counts the patch embedding, every layer's QKV/output projections, attention scores and
    weighted sums, the MLP, and the final projection, including the vision prompt tokens.
    LayerNorm, softmax and activations are left out (a few percent at most).

    Returns:
        FLOPs for a single image (int).
    """
    width, patches = config.vision_width, config.num_patches
    tokens = patches + 1 + config.vision_prompt_length
    patch_embed = patches * (3 * config.patch_size**2) * width
    attention = 4 * tokens * width * width + 2 * tokens * tokens * width
    mlp = 2 * tokens * width * config.vision_mlp_size
    projection = width * config.embed_dim
    return 2 * (patch_embed + config.vision_layers * (attention + mlp) + projection)
