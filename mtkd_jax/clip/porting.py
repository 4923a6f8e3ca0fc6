"""The porting helper every CLIP converter shares: a checkpoint's tensors, a mapping table
(source name → model variables + transform), and `port`, which fills a model from them strictly.

A converter (`convert_openai`, `convert_hf`, `convert_keras_hub`, `convert_promptkd`) reads one
format into a `BaseCheckpoint` (or, for prompts, plain tensors) and builds that format's table
with `TableBuilder`; `mtkd_jax.clip.load` joins them. If a source tensor is neither mapped nor
explicitly ignored, a model variable is left unfilled, or a shape disagrees, `port` raises one
`CheckpointMismatchError` listing every such name and assigns nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from mtkd_jax.clip import torch_io
from mtkd_jax.clip.config import CLIPConfig
from mtkd_jax.errors import InputError

Transform = Callable[[np.ndarray], np.ndarray]
Table = dict[str, list[tuple[Any, Transform]]]


class CheckpointMismatchError(InputError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped names."""


def same(array: np.ndarray) -> np.ndarray:
    return array


def transpose(array: np.ndarray) -> np.ndarray:
    return array.T


@dataclasses.dataclass
class Source:
    """Tensors of one checkpoint with the table that maps them and the names it ignores."""

    description: str
    tensors: Mapping[str, np.ndarray]
    table: Table
    ignored: Callable[[str], bool] = lambda name: False


def port(model, sources: Iterable[Source]) -> None:
    """Assign every model variable from the sources' tables; strict.

    Raises:
        CheckpointMismatchError: naming, in one message, every model variable no table fills,
            every table entry absent from its source, every source tensor neither mapped nor
            ignored, and every tensor whose shape (after its transform) disagrees.
    """
    missing, unexpected, misshaped, filled = [], [], [], set()
    for source in sources:
        for name in source.tensors:
            if name not in source.table and not source.ignored(name):
                unexpected.append(f"{source.description}: {name}")
        for name, targets in source.table.items():
            if name not in source.tensors:
                missing.append(f"{source.description}: {name}")
                continue
            array = np.asarray(source.tensors[name])
            for variable, transform in targets:
                filled.add(id(variable))
                try:
                    value = transform(array)
                except ValueError:
                    value = None
                if value is None or tuple(value.shape) != tuple(variable.shape):
                    misshaped.append(
                        f"{source.description}: {name} {tuple(array.shape)} → {variable.path} "
                        f"expects {tuple(variable.shape)}"
                    )
                    continue
                if not missing and not misshaped and not unexpected:
                    variable.assign(value)
    unfilled = [v.path for v in model.weights if id(v) not in filled]
    if missing or unexpected or misshaped or unfilled:
        parts = []
        for title, names in (
            ("missing from the checkpoint", missing),
            ("unexpected (neither mapped nor ignored)", unexpected),
            ("mis-shaped", misshaped),
            ("model variables no table fills", unfilled),
        ):
            if names:
                parts.append(f"{len(names)} {title}:\n  " + "\n  ".join(names))
        raise CheckpointMismatchError(
            "The checkpoint does not match the model; nothing was loaded.\n"
            + "\n".join(parts)
            + "\nCheck that the files belong together (base model and prompts of the same "
            "architecture) and are complete."
        )


def build_uninitialised(build: Callable[[], Any]):
    """`build()` a Keras model without computing initial values that loading would overwrite.

    Keras defers the initialisation of variables created inside a `StatelessScope`; the loader
    then assigns every variable (strictly) and `forget_pending` drops them from Keras's list of
    variables awaiting initialisation. Saves the model's size in RAM and the compile time of
    the random initialisers (seconds for ViT-L/14).
    """
    import keras

    with keras.StatelessScope(initialize_variables=False):
        return build()


def forget_pending(model) -> None:
    """Remove `model`'s variables from Keras's deferred-initialisation list (see above)."""
    from keras.src.backend.common import global_state

    pending = global_state.get_global_attribute("uninitialized_variables") or []
    ours = {id(v) for v in model.weights}
    remaining = [v for v in pending if id(v) not in ours]
    global_state.set_global_attribute("uninitialized_variables", remaining)


class TableBuilder:
    """Collects a mapping table: `add(source name, variable, transform)`."""

    def __init__(self):
        self.table: Table = {}

    def add(self, name: str, variable, transform: Transform = same) -> None:
        self.table.setdefault(name, []).append((variable, transform))

    def layer_norm(self, name: str, layer) -> None:
        self.add(f"{name}.weight", layer.gamma)
        self.add(f"{name}.bias", layer.beta)


def heads_in(width: int, heads: int) -> Transform:
    """torch Linear weight `[out, in]` → Keras EinsumDense kernel `[in, heads, head_dim]`."""
    return lambda a: a.T.reshape(width, heads, width // heads)


def heads_bias(width: int, heads: int) -> Transform:
    return lambda a: a.reshape(heads, width // heads)


def heads_out(width: int, heads: int) -> Transform:
    """torch out_proj weight `[width, width]` → Keras kernel `[heads, head_dim, width]`."""
    return lambda a: a.T.reshape(heads, width // heads, width)


@dataclasses.dataclass
class BaseCheckpoint:
    """A base CLIP checkpoint read from disk, ready to port onto a model."""

    config: CLIPConfig
    tensors: Mapping[str, np.ndarray]
    table: Callable[[Any], Table]
    ignored: Callable[[str], bool]
    description: str


def as_float(array: np.ndarray) -> np.ndarray:
    """bfloat16 has no numpy arithmetic worth trusting here: widen it to float32."""
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def flat_state_dict(obj: Any, description: str) -> dict[str, np.ndarray]:
    """The arrays of a state dict `obj` (or of its `"state_dict"` entry, as Dassl saves it),
    bfloat16 widened to float32; other entries (ints, strings, nested settings) are dropped."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InputError(
            f"Expected a state dict (name → tensor) in {description}. "
            f"Received: an object of type {type(obj).__name__}"
        )
    return {str(k): as_float(np.asarray(v)) for k, v in obj.items() if isinstance(v, np.ndarray)}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch checkpoint (zip or TorchScript archive) as `flat_state_dict`, read only by the
    restricted reader `mtkd_jax.clip.torch_io.read_torch_file` (never `pickle.load`)."""
    return flat_state_dict(torch_io.read_torch_file(path), path)
