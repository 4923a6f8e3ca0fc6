"""`.safetensors` files are read with the format's checks: what the `safetensors` library writes
loads exactly, and every crafted file is refused naming the file and the tensor (and the
`safetensors` library refuses it too)."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from mtkd_jax import errors
from mtkd_jax.clip import safetensors_io

safetensors_numpy = pytest.importorskip("safetensors.numpy")
safetensors_lib = pytest.importorskip("safetensors")


def _craft(path, header: dict, data: bytes, *, header_size: int | None = None) -> str:
    raw = json.dumps(header).encode()
    size = len(raw) if header_size is None else header_size
    path.write_bytes(struct.pack("<Q", size) + raw + data)
    return str(path)


def _library_refuses(path) -> bool:
    try:
        with safetensors_lib.safe_open(path, framework="numpy") as file:
            for name in file.keys():
                file.get_tensor(name)
    except Exception:
        return True
    return False


def test_files_written_by_the_safetensors_library_load_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float16),
        "ids": np.arange(7, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "flag": np.array([True, False]),
    }
    path = str(tmp_path / "model.safetensors")
    safetensors_numpy.save_file(tensors, path, metadata={"format": "np"})
    loaded = safetensors_io.read(path)
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value), name


def test_bfloat16_is_read_as_the_library_stores_it(tmp_path):
    # The library's numpy API cannot hold bfloat16; the bytes are the upper halves of float32.
    values = np.array([[1.5, -2.25], [3.0, 1e-3]], np.float32)
    bf16 = values.astype(ml_dtypes.bfloat16)
    path = _craft(
        tmp_path / "bf16.safetensors",
        {"x": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}},
        bf16.tobytes(),
    )
    loaded = safetensors_io.read(path)["x"]
    assert loaded.dtype == ml_dtypes.bfloat16 and np.array_equal(loaded, bf16)
    flax = pytest.importorskip("safetensors.flax")
    np.testing.assert_array_equal(np.asarray(flax.load_file(path)["x"]), bf16)


A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "name, header, data, header_size, message",
    [
        ("offsets into the header", {"a": A, "b": {**A, "data_offsets": [-8, 0]}},
         b"\0" * 8, None, "tensor 'b'.*data_offsets"),
        ("two tensors share bytes", {"a": A, "b": A}, b"\0" * 8, None, "tensor '[ab]'.*overlaps"),
        ("offsets past the end", {"a": {**A, "data_offsets": [0, 8]},
                                  "b": {**A, "data_offsets": [8, 16]}},
         b"\0" * 12, None, "end at byte 16.*holds 12"),
        ("a gap between tensors", {"a": A, "b": {**A, "data_offsets": [12, 20]}},
         b"\0" * 20, None, "tensor 'b'.*gap after tensor 'a'"),
        ("bytes after the last tensor", {"a": A}, b"\0" * 12, None, "end at byte 8.*'a'"),
        ("size and shape disagree", {"a": {**A, "shape": [3]}}, b"\0" * 8, None,
         "tensor 'a'.*needs 12 bytes"),
        ("a negative dimension", {"a": {**A, "shape": [-2]}}, b"\0" * 8, None, "tensor 'a'.*shape"),
        ("an unknown dtype", {"a": {**A, "dtype": "F128"}}, b"\0" * 8, None,
         "tensor 'a'.*unknown dtype"),
        ("a header larger than the file", {"a": A}, b"\0" * 8, 10**6, "header claims 1000000"),
        ("a header above the limit", {"a": A}, b"\0" * 8, 2**40, "header claims"),
        ("a header that is a list", [], b"", None, "not an object"),
    ],
    ids=lambda value: value if isinstance(value, str) and " " in value else "",
)  # fmt: skip
def test_a_crafted_file_is_refused_naming_the_file_and_the_tensor(
    tmp_path, name, header, data, header_size, message
):
    path = _craft(tmp_path / "crafted.safetensors", header, data, header_size=header_size)
    with pytest.raises(errors.UserError, match=message) as raised:
        safetensors_io.read(path)
    assert path in str(raised.value)
    assert _library_refuses(path), f"the safetensors library reads {name!r}"


def test_a_repeated_name_and_a_short_file_are_refused(tmp_path):
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
    raw += b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    path = tmp_path / "twice.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(safetensors_io.SafetensorsError, match="'a' appears twice"):
        safetensors_io.read(str(path))
    (tmp_path / "short.safetensors").write_bytes(b"\1\0")
    with pytest.raises(safetensors_io.SafetensorsError, match="shorter than the 8-byte"):
        safetensors_io.read(str(tmp_path / "short.safetensors"))
