"""Reading `.safetensors` files with every check of the format, memory-mapped (no copy).

The format (https://huggingface.co/docs/safetensors, "Format"): 8 bytes little-endian `N`, then
`N` bytes of a UTF-8 JSON object `{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}`, then the byte buffer. Offsets are relative to the buffer. The
checks are the `safetensors` library's own (`safetensors/src/tensor.rs`, `validate`): a header
size that fits the file and stays under 100 MB, a JSON object with no repeated name, known
dtypes, non-negative integer shapes whose byte size equals `end - begin`, and offsets that tile
the buffer exactly, in order, without hole or overlap. A file that breaks any of them is refused
with one message naming the file and the tensor; nothing is read as weights.

Arrays come back read-only, mapped from the file; bfloat16 as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from mtkd_jax.errors import InputError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}  # fmt: skip


class SafetensorsError(InputError):
    """A `.safetensors` file that breaks the format; the message names the file and tensor."""


def _fail(path, what: str) -> SafetensorsError:
    return SafetensorsError(
        f"{str(path)!r} is not a valid .safetensors file: {what}. It is truncated, corrupt or "
        "crafted; download or convert it again."
    )


def _no_repeated_names(pairs):
    seen = {}
    for name, value in pairs:
        if name in seen:
            raise ValueError(f"the name {name!r} appears twice in the header")
        seen[name] = value
    return seen


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def read_header(path: str | os.PathLike) -> tuple[int, dict]:
    """`(header_size, header)` of a `.safetensors` file, after the format's checks."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise _fail(path, f"{file_size} bytes, shorter than the 8-byte header size")
        header_size = int.from_bytes(prefix, "little")
        if header_size > MAX_HEADER_BYTES or 8 + header_size > file_size:
            raise _fail(
                path,
                f"the header claims {header_size} bytes, the file has {file_size} (limit "
                f"{MAX_HEADER_BYTES})",
            )
        raw = file.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeated_names)
    except (UnicodeDecodeError, ValueError) as error:
        raise _fail(path, f"its header is not a UTF-8 JSON object ({error})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "its __metadata__ is not an object of strings")
    return header_size, header


def _extent(path, name, info) -> tuple[int, int, np.dtype, tuple[int, ...]]:
    """Checks one header entry; returns `(begin, end, dtype, shape)`."""
    where = f"tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"{where} needs exactly dtype, shape and data_offsets; got {info!r:.200}")
    if info["dtype"] not in DTYPES:
        raise _fail(path, f"{where} has the unknown dtype {info['dtype']!r} (valid: "
                    f"{', '.join(DTYPES)})")  # fmt: skip
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(path, f"{where} has the shape {shape!r}, not a list of integers >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(path, f"{where} has the data_offsets {offsets!r}, not [begin, end] with "
                    "0 <= begin <= end")  # fmt: skip
    dtype = _dtype(DTYPES[info["dtype"]])
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise _fail(
            path,
            f"{where} ({info['dtype']} {shape}) needs {expected} bytes and its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}",
        )
    return offsets[0], offsets[1], dtype, tuple(shape)


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checked `.safetensors` file, as read-only memory-mapped numpy arrays.

    Raises:
        SafetensorsError: the file breaks the format (message names the file and the tensor).
    """
    header_size, header = read_header(path)
    buffer_size = os.path.getsize(path) - 8 - header_size
    entries = sorted(
        ((*_extent(path, name, info), name) for name, info in header.items()
         if name != "__metadata__"),
        key=lambda entry: (entry[0], entry[1]),
    )  # fmt: skip
    position, previous = 0, None
    for begin, end, _, _, name in entries:
        if begin != position:
            what = "overlaps" if begin < position else "leaves a gap after"
            other = f"tensor {previous!r}" if previous is not None else "the start of the data"
            raise _fail(path, f"tensor {name!r} (data_offsets [{begin}, {end}]) {what} {other}")
        position, previous = end, name
    if position != buffer_size:
        raise _fail(
            path,
            f"the tensors end at byte {position} of the data and the file holds {buffer_size}"
            + (f" (last tensor: {previous!r})" if previous is not None else ""),
        )
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if buffer_size else None
    start = 8 + header_size
    tensors = {}
    for begin, end, dtype, shape, name in entries:
        if end == begin:
            tensors[name] = np.zeros(shape, dtype)
        else:
            tensors[name] = mapped[start + begin : start + end].view(dtype).reshape(shape)
    return tensors
