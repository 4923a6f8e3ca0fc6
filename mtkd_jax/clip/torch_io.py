"""Reads PyTorch checkpoints into numpy without torch and without running code from the file.

A `torch.save` file is a zip archive holding a pickle (`<archive>/data.pkl`) and one raw byte
file per tensor storage (`<archive>/data/<key>`). Unpickling runs whatever callables the pickle
names, so a crafted checkpoint can run arbitrary code under `pickle.load` or
`torch.load(weights_only=False)`. This reader unpickles with `find_class` restricted to an explicit
allowlist: containers (`OrderedDict`, sets, …), torch's tensor and storage names — mapped to
functions of this module that build numpy arrays, never to torch's — TorchScript module classes
(`__torch__.*`) and torch optimizer/scheduler classes, both mapped to the inert `TorchObject`.
Any other global raises `UnsafeCheckpointError` when the pickle names it, before it is called.

Supported: `torch.save` zip files (torch ≥ 1.6: state dicts, nested dicts/lists/tuples, Dassl and
PromptKD `model-best.pth.tar` with optimizer and scheduler state, Hugging Face
`pytorch_model.bin`) and TorchScript archives (OpenAI's `ViT-B-16.pt`, read as a flat state dict).
Not supported: the legacy pre-1.6 format (a clear error says how to re-save), sparse, quantized
and nested tensors.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import re
import tarfile
import zipfile
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from mtkd_jax.errors import InputError

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_READ_CHUNK_BYTES = 1 << 24

_DTYPES = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "complex128": np.dtype(np.complex128),
    "complex64": np.dtype(np.complex64),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",  # raw bytes; `_rebuild_tensor_v3` reinterprets them
}


class UnsafeCheckpointError(InputError):
    """A checkpoint's pickle names a global outside the allowlist (it would run code)."""


class TorchObject:
    """Inert stand-in for an object the pickle rebuilds: a TorchScript module or a torch
    optimizer/scheduler. Holds what the pickle gave it, runs nothing.

    Attributes:
        torch_type: the pickled class, e.g. `"__torch__.torch.nn.modules.linear.Linear"`.
        args: constructor arguments from the pickle (usually empty).
        state: the object's pickled state, usually a dict of its attributes.
    """

    torch_type = "?"

    def __new__(cls, *args, **kwargs):
        instance = super().__new__(cls)
        instance.args = args
        instance.state = None
        return instance

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        keys = list(self.state) if isinstance(self.state, dict) else type(self.state).__name__
        return f"TorchObject({self.torch_type}, state={keys})"


_OBJECT_CLASSES: dict[str, type] = {}


def _torch_object_class(qualified_name: str) -> type:
    """A `TorchObject` subclass per pickled class name (NEWOBJ needs a class)."""
    if qualified_name not in _OBJECT_CLASSES:
        _OBJECT_CLASSES[qualified_name] = type(
            qualified_name.rsplit(".", 1)[-1], (TorchObject,), {"torch_type": qualified_name}
        )
    return _OBJECT_CLASSES[qualified_name]


class _StorageType:
    """What the pickle's storage class names (`torch.FloatStorage`, …) resolve to."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _DTYPES[_STORAGE_DTYPES[name]]


class _TypeMarker:
    """What `torch.Tensor` / `torch.nn.Parameter` resolve to (only passed to rebuild functions)."""

    def __init__(self, name: str):
        self.name = name


# ---------------------------------------------------------------------- rebuilding tensors


def _tensor_from_storage(storage: np.ndarray, offset, size, stride) -> np.ndarray:
    """The tensor `storage[offset + sum(index * stride)]` of shape `size`, bounds-checked."""
    try:
        offset = int(offset)
        size = tuple(int(n) for n in size)
        stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError) as error:
        raise InputError(
            f"Malformed tensor in checkpoint. Received: offset={offset!r}, size={size!r}, "
            f"stride={stride!r}."
        ) from error
    if len(size) != len(stride) or offset < 0 or min((*size, *stride, 0)) < 0:
        raise InputError(
            f"Malformed tensor view: sizes, strides and offset must be non-negative and match. "
            f"Received: offset={offset}, size={size}, stride={stride}."
        )
    count = int(np.prod(size, dtype=np.int64))
    if count == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise InputError(
            f"Tensor view reads past its storage ({storage.size} elements). "
            f"Received: offset={offset}, size={size}, stride={stride}."
        )
    contiguous, step = [], 1
    for n in reversed(size):
        contiguous.insert(0, step)
        step *= n
    is_contiguous = all(n == 1 or s == c for n, s, c in zip(size, stride, contiguous, strict=True))
    if is_contiguous and offset == 0 and count == storage.size:
        return storage.reshape(size)  # the whole storage: share it, as torch does
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:],
        shape=size,
        strides=tuple(s * itemsize for s in stride),
        writeable=False,
    )
    return view.copy()


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    if not isinstance(dtype, np.dtype):
        raise InputError(f"Unsupported tensor dtype in checkpoint. Received: dtype={dtype!r}.")
    return _tensor_from_storage(storage.view(dtype), storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


def _rebuild_from_type_v2(function, new_type, args, state):
    if function not in _REBUILD_FUNCTIONS:
        raise UnsafeCheckpointError(
            f"`_rebuild_from_type_v2` may only call a tensor rebuild function. "
            f"Received: {function!r}."
        )
    return function(*args)


def _unsupported_tensor(kind: str):
    def refuse(*args, **kwargs):
        raise InputError(
            f"{kind} tensors are not supported by this reader; convert them to dense tensors "
            "(`tensor.to_dense()` / `tensor.dequantize()`) and save the checkpoint again."
        )

    return refuse


_REBUILD_FUNCTIONS = (
    _rebuild_tensor,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
    _rebuild_parameter_with_state,
)


# ---------------------------------------------------------------------- other allowed globals


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode`, which protocol-2 pickles use for `bytes`; only the latin-1 case."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(
            f"`_codecs.encode` is only allowed as the latin-1 encoding of a str. "
            f"Received: encoding={encoding!r}."
        )
    return text.encode("latin1")


class ArrayKey:
    """A tensor used as a dict key (a pickled optimizer's `state` is keyed by its parameters);
    hashes by identity like a torch tensor. The array is `.array`."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __repr__(self):
        return f"ArrayKey(shape={self.array.shape}, dtype={self.array.dtype})"


class _TensorKeyedDefaultdict(defaultdict):
    """A defaultdict that stores array keys as `ArrayKey` (numpy arrays are unhashable)."""

    def __setitem__(self, key, value):
        super().__setitem__(ArrayKey(key) if isinstance(key, np.ndarray) else key, value)


def _defaultdict(default_factory=None, *args):
    if default_factory not in (None, dict, list, set, OrderedDict):
        raise UnsafeCheckpointError(
            f"A defaultdict's factory must be dict, list, set or OrderedDict. "
            f"Received: {default_factory!r}."
        )
    return _TensorKeyedDefaultdict(default_factory, *args)


def _jit_list(values):
    return list(values)


def _restore_type_tag(value, type_string):
    return value


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "Counter"): Counter,
    ("collections", "defaultdict"): _defaultdict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _latin1_encode,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._utils", "_rebuild_sparse_tensor"): _unsupported_tensor("Sparse"),
    ("torch._utils", "_rebuild_sparse_csr_tensor"): _unsupported_tensor("Sparse"),
    ("torch._utils", "_rebuild_qtensor"): _unsupported_tensor("Quantized"),
    ("torch._utils", "_rebuild_nested_tensor"): _unsupported_tensor("Nested"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _unsupported_tensor("Meta"),
    ("torch._utils", "_rebuild_wrapper_subclass"): _unsupported_tensor("Subclass"),
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.Parameter"),
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("torch.jit._pickle", "build_intlist"): _jit_list,
    ("torch.jit._pickle", "build_doublelist"): _jit_list,
    ("torch.jit._pickle", "build_boollist"): _jit_list,
    ("torch.jit._pickle", "build_tensorlist"): _jit_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}
for _name in _STORAGE_DTYPES:
    _ALLOWED_GLOBALS[("torch", _name)] = _StorageType(_name)
    _ALLOWED_GLOBALS[("torch.storage", _name)] = _StorageType(_name)
for _name, _dtype in _DTYPES.items():
    _ALLOWED_GLOBALS[("torch", _name)] = _dtype
# Classes whose pickled state is plain data: TorchScript modules and torch optimizers/schedulers
# (a Dassl warm-up scheduler's state holds its successor scheduler, which holds the optimizer).
_INERT_CLASS_MODULES = ("__torch__", "torch.optim")


# ---------------------------------------------------------------------- the unpickler


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, storages: _StorageReader | None):
        super().__init__(file)
        self._source = source
        self._storages = storages

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles name Python 2 modules (`__builtin__`, `copy_reg`); translate first.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if any(module == m or module.startswith(m + ".") for m in _INERT_CLASS_MODULES):
            return _torch_object_class(f"{module}.{name}")
        raise UnsafeCheckpointError(
            f"Refusing to unpickle {self._source!r}: it names the global '{module}.{name}', which "
            "is not a tensor, storage, container or other plain-data type, so loading it could "
            "run code from the file. Nothing was executed. If you trust the file, re-save only "
            "its tensors (e.g. `torch.save(model.state_dict(), path)` or "
            "`torch.save(torch.load(src, weights_only=False)['state_dict'], dst)` in a sandbox) "
            "and load that."
        )

    def persistent_load(self, persistent_id):
        if (
            self._storages is None
            or not isinstance(persistent_id, tuple)
            or len(persistent_id) < 5
            or persistent_id[0] != "storage"
            or not isinstance(persistent_id[1], _StorageType)
        ):
            raise InputError(
                f"Unexpected persistent reference in {self._source!r}: only tensor storages "
                f"of a torch zip archive are supported. Received: {persistent_id!r:.200}."
            )
        _, storage_type, key, _location, numel = persistent_id[:5]
        return self._storages.read(str(key), storage_type.dtype, int(numel))


class _StorageReader:
    """Reads each `<archive>/data/<key>` once into a writable numpy buffer."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, source: str):
        self._archive = archive
        self._prefix = prefix
        self._source = source
        self._buffers: dict[str, np.ndarray] = {}
        self._archive_bytes = os.path.getsize(source)
        byteorder_name = f"{prefix}/byteorder"
        names = set(archive.namelist())
        self._big_endian = (
            byteorder_name in names and archive.read(byteorder_name).strip() == b"big"
        )

    def read(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        if key not in self._buffers:
            self._buffers[key] = self._read_bytes(key, numel * dtype.itemsize)
        raw = self._buffers[key]
        if raw.size != numel * dtype.itemsize:
            raise InputError(
                f"Storage {key!r} of {self._source!r} holds {raw.size} bytes, but the pickle "
                f"declares {numel} elements of {dtype} ({numel * dtype.itemsize} bytes)."
            )
        if self._big_endian and dtype.itemsize > 1:
            return raw.view(dtype.newbyteorder(">")).astype(dtype)
        return raw.view(dtype)

    def _read_bytes(self, key: str, declared_bytes: int) -> np.ndarray:
        if "/" in key or key in ("", ".", ".."):
            raise InputError(f"Malformed storage key in {self._source!r}. Received: {key!r}.")
        name = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise InputError(
                f"{self._source!r} references the storage {name!r}, which the archive lacks."
            ) from None
        # Check sizes before allocating, so a crafted header cannot ask for unbounded memory.
        if info.file_size != declared_bytes:
            raise InputError(
                f"Storage {name!r} of {self._source!r} holds {info.file_size} bytes, but the "
                f"pickle declares {declared_bytes} bytes."
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size > self._archive_bytes:
            raise InputError(
                f"Storage {name!r} claims {info.file_size} bytes, more than the whole file "
                f"{self._source!r} ({self._archive_bytes} bytes): the archive is corrupt."
            )
        buffer = np.empty(info.file_size, np.uint8)
        view = memoryview(buffer)
        with self._archive.open(info) as file:
            position = 0
            while position < info.file_size:
                chunk = file.read(min(_READ_CHUNK_BYTES, info.file_size - position))
                if not chunk:
                    raise InputError(f"Storage {name!r} of {self._source!r} is truncated.")
                view[position : position + len(chunk)] = chunk
                position += len(chunk)
        return buffer


# ---------------------------------------------------------------------- public API


def read_torch_file(path: str | os.PathLike) -> Any:
    """Reads a PyTorch checkpoint safely, with numpy arrays in place of tensors.

    Args:
        path: a `torch.save` file (zip format, torch ≥ 1.6) or a TorchScript archive.

    Returns:
        For a `torch.save` file, the saved object with every tensor a `np.ndarray` (same dtype;
        bfloat16 as `ml_dtypes.bfloat16`; views materialised with their offset and strides;
        tensors sharing a whole storage share memory); dicts, lists, tuples and scalars as saved;
        optimizer/scheduler objects as inert `TorchObject`s. For a TorchScript archive, the flat
        state dict `{dotted.name: np.ndarray}` that `torch.jit.load(path).state_dict()` gives.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allowlist; nothing ran.
        ValueError: the file is not a supported PyTorch checkpoint.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"No such checkpoint file. Received: path={source!r}.")
    if not zipfile.is_zipfile(source):
        _raise_for_non_zip(source)
    with zipfile.ZipFile(source) as archive:
        prefix = _archive_prefix(archive, source)
        storages = _StorageReader(archive, prefix, source)
        with archive.open(f"{prefix}/data.pkl") as file:
            obj = _RestrictedUnpickler(file, source, storages).load()
        if _is_torchscript(archive, prefix):
            return _torchscript_state_dict(obj, _module_classes(archive, prefix), source)
    return obj


def flatten_state_dict(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """All arrays in nested dicts/lists/`TorchObject`s, keyed by dotted path.

    Example: `{"state_dict": {"a.b": x}, "epoch": 3}` → `{"state_dict.a.b": x}`.
    """
    flat: dict[str, np.ndarray] = {}

    def visit(value, name):
        if isinstance(value, np.ndarray):
            flat[name] = value
        elif isinstance(value, TorchObject):
            visit(value.state, name)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                visit(item, f"{name}.{index}" if name else str(index))

    visit(obj, prefix)
    return flat


# ---------------------------------------------------------------------- helpers


def _raise_for_non_zip(source: str):
    if tarfile.is_tarfile(source):
        raise InputError(
            f"{source!r} is a tar archive: torch's oldest (< 0.4) checkpoint format, which this "
            "reader does not support. Re-save it with a recent torch: "
            "`torch.save(torch.load(src, weights_only=True), dst)`."
        )
    with open(source, "rb") as file:
        head = file.read(2)
        file.seek(0)
        if head[:1] == b"\x80":  # a pickle: torch's legacy (< 1.6) format, or a plain pickle
            magic = _RestrictedUnpickler(file, source, storages=None).load()
            if magic == _LEGACY_MAGIC_NUMBER:
                raise InputError(
                    f"{source!r} uses torch's legacy (< 1.6) serialization, which this reader "
                    "does not support. Re-save it with torch ≥ 1.6: "
                    "`torch.save(torch.load(src, weights_only=True), dst)`."
                )
    raise InputError(
        f"{source!r} is not a PyTorch checkpoint: expected a zip archive written by torch.save "
        "(torch ≥ 1.6) or torch.jit.save."
    )


def _archive_prefix(archive: zipfile.ZipFile, source: str) -> str:
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise InputError(
            f"{source!r} is a zip archive but not a PyTorch checkpoint: expected exactly one "
            f"'<archive>/data.pkl'. Received: {len(pickles)} such entries."
        )
    return pickles[0].split("/", 1)[0]


def _is_torchscript(archive: zipfile.ZipFile, prefix: str) -> bool:
    return any(name.startswith(f"{prefix}/code/") for name in archive.namelist())


_CLASS_LINE = re.compile(r"class (\w+)\((\w*)\):")
_NAMES_LINE = re.compile(r"\s+(__parameters__|__buffers__) = \[(.*)\]")


def _module_classes(archive: zipfile.ZipFile, prefix: str) -> dict[str, dict[str, Any]]:
    """Parameter and buffer names of every TorchScript class, read (never run) from its code.

    The archive's `code/<module path>.py` declares each class with lines such as
    `__parameters__ = ["weight", "bias", ]`; these say which tensor attributes are in the state
    dict.
    """
    classes: dict[str, dict[str, Any]] = {}
    code_root = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(code_root) and name.endswith(".py")):
            continue
        module = name[len(code_root) : -len(".py")].replace("/", ".")
        current = None
        for line in archive.read(name).decode("utf-8", errors="replace").splitlines():
            if match := _CLASS_LINE.match(line):
                current = {"is_module": match.group(2) == "Module"}
                current.update(__parameters__=[], __buffers__=[])
                classes[f"{module}.{match.group(1)}"] = current
            elif current is not None and (match := _NAMES_LINE.match(line)):
                current[match.group(1)] = re.findall(r'"([^"]*)"', match.group(2))
    return classes


def _torchscript_state_dict(root: Any, classes: dict, source: str) -> dict[str, np.ndarray]:
    """`module.state_dict()` of a TorchScript module tree: each module's parameters, then its
    buffers, then its submodules' entries, in declaration order."""
    if not isinstance(root, TorchObject):
        raise InputError(
            f"{source!r} is a TorchScript archive whose data is not a module. "
            f"Received: {type(root).__name__}."
        )
    state_dict: dict[str, np.ndarray] = {}

    def visit(module: TorchObject, prefix: str):
        attributes = module.state if isinstance(module.state, dict) else {}
        info = classes.get(module.torch_type)
        if info is None:  # no declaration found: every tensor attribute is state
            names = [n for n, value in attributes.items() if isinstance(value, np.ndarray)]
        else:
            names = info["__parameters__"] + info["__buffers__"]
        for name in names:
            if isinstance(attributes.get(name), np.ndarray):
                state_dict[prefix + name] = attributes[name]
        for name, value in attributes.items():
            if isinstance(value, TorchObject) and _is_module(value, classes):
                visit(value, f"{prefix}{name}.")

    visit(root, "")
    return state_dict


def _is_module(obj: TorchObject, classes: dict) -> bool:
    info = classes.get(obj.torch_type)
    if info is not None:
        return info["is_module"]
    return isinstance(obj.state, dict) and "training" in obj.state
