"""The safe torch checkpoint reader against `torch.load(weights_only=True)` and `torch.jit.load`."""

import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mtkd_jax.clip import torch_io
from mtkd_jax.clip.torch_io import (
    ArrayKey,
    TorchObject,
    UnsafeCheckpointError,
    flatten_state_dict,
    read_torch_file,
)

torch = pytest.importorskip("torch")


def _assert_same(ours, reference, where="root"):
    """Walks a torch.load result and ours side by side: tensors equal in value and dtype."""
    if isinstance(reference, torch.Tensor):
        reference = reference.detach()
        assert isinstance(ours, np.ndarray), f"{where}: {type(ours)}"
        assert ours.shape == tuple(reference.shape), where
        if reference.dtype == torch.bfloat16:
            assert ours.dtype.name == "bfloat16", where
            np.testing.assert_array_equal(ours.astype(np.float32), reference.float().numpy())
        else:
            assert ours.dtype == reference.numpy().dtype, where
            np.testing.assert_array_equal(ours, reference.numpy(), err_msg=where)
    elif isinstance(reference, dict):
        assert type(ours) is type(reference), f"{where}: {type(ours)} vs {type(reference)}"
        assert list(ours) == list(reference), where
        for key in reference:
            _assert_same(ours[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, list | tuple):
        assert type(ours) is type(reference) and len(ours) == len(reference), where
        for index, (mine, theirs) in enumerate(zip(ours, reference, strict=True)):
            _assert_same(mine, theirs, f"{where}[{index}]")
    else:
        assert type(ours) is type(reference) and ours == reference, f"{where}: {ours!r}"


@pytest.mark.parametrize(
    "dtype",
    [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.int32,
     torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64],
)  # fmt: skip
def test_every_dtype_matches_torch_load(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, generator=generator, dtype=torch.float64) * 50
    tensor = (
        values.to(dtype) if dtype != torch.complex64 else torch.complex(values, -values).to(dtype)
    )
    path = tmp_path / "tensors.pt"
    torch.save({"tensor": tensor, "transposed": tensor.t(), "scalar": tensor[2, 3]}, path)
    _assert_same(read_torch_file(path), torch.load(path, weights_only=True))


def test_views_offsets_strides_and_shared_storage_match_torch_load(tmp_path):
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    shared = torch.randn(4)
    checkpoint = {
        "base": base,
        "transposed": base.t(),
        "rows": base[2:5],
        "strided_columns": base[:, 1::3],
        "row": base[1],
        "element_with_offset": base.view(48)[7],
        "permuted_3d": base.view(2, 3, 8).permute(2, 0, 1),
        "broadcast": torch.randn(3, 1).expand(3, 4),
        "empty": torch.empty(0, 3),
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
        "shared_a": shared,
        "shared_b": shared,
        "shared_view": shared[1:],
    }
    path = tmp_path / "views.pt"
    torch.save(checkpoint, path)
    ours = read_torch_file(path)
    _assert_same(ours, torch.load(path, weights_only=True))
    assert np.shares_memory(ours["shared_a"], ours["shared_b"])
    assert not np.shares_memory(ours["base"], ours["rows"])  # partial views are copies


def test_dassl_promptkd_checkpoint_matches_torch_load(tmp_path):
    model = torch.nn.ModuleDict(
        {
            "prompt_learner": torch.nn.Linear(4, 3),
            "image_encoder": torch.nn.Sequential(torch.nn.LayerNorm(3), torch.nn.Linear(3, 2)),
        }
    )
    model.register_parameter("ctx", torch.nn.Parameter(torch.randn(4, 3)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    loss = model["image_encoder"](model["prompt_learner"](torch.randn(5, 4))).sum()
    (loss + model.ctx.sum()).backward()
    optimizer.step()
    scheduler.step()
    checkpoint = {
        "state_dict": model.state_dict(),
        "epoch": 20,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "val_result": 71.25,
        "meta": {"tags": {"a", "b"}, "raw": b"\x00\xffbytes", "pair": (1, None), "c": 2 + 3j},
    }
    path = tmp_path / "model-best.pth.tar"
    torch.save(checkpoint, path)
    ours = read_torch_file(path)
    _assert_same(ours, torch.load(path, weights_only=True))
    flat = flatten_state_dict(ours["state_dict"])
    assert list(flat) == list(model.state_dict())


def test_dassl_warmup_scheduler_with_successor_object_is_read_as_inert_data(tmp_path):
    # Dassl's warm-up scheduler keeps its successor scheduler (and through it the optimizer)
    # in its state dict, so the pickle holds torch.optim objects, not only plain data.
    weight = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    weight.sum().backward()
    optimizer.step()
    successor.step()
    path = tmp_path / "warmup.pth.tar"
    torch.save({"scheduler": {"successor": successor, "warmup_epoch": 1, "cons_lr": 1e-5}}, path)
    scheduler = read_torch_file(path)["scheduler"]
    restored = scheduler["successor"]
    assert isinstance(restored, TorchObject)
    assert restored.torch_type == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert restored.state["T_max"] == 10 and restored.state["last_epoch"] == 1
    saved_optimizer = restored.state["optimizer"]
    assert saved_optimizer.torch_type == "torch.optim.sgd.SGD"
    group = saved_optimizer.state["param_groups"][0]
    np.testing.assert_array_equal(group["params"][0], weight.detach().numpy())
    # The optimizer's per-parameter state is keyed by the parameter tensors themselves.
    (key, state), *_ = saved_optimizer.state["state"].items()
    assert isinstance(key, ArrayKey) and len(saved_optimizer.state["state"]) == 1
    np.testing.assert_array_equal(key.array, weight.detach().numpy())
    np.testing.assert_array_equal(
        state["momentum_buffer"], optimizer.state[weight]["momentum_buffer"].numpy()
    )


class _Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, 2)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU())
        self.c_proj = torch.nn.Linear(2 * width, width, bias=False)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.c_proj(self.mlp(x))


class _TinyCLIPVisual(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.class_embedding = torch.nn.Parameter(torch.randn(width))
        self.positional_embedding = torch.nn.Parameter(torch.randn(3, width))
        self.register_buffer("input_resolution", torch.tensor(224))
        self.resblocks = torch.nn.ModuleList([_Block(width), _Block(width)])
        self.proj = torch.nn.Parameter(torch.randn(width, 4))

    def forward(self, x):
        x = x + self.positional_embedding + self.class_embedding
        for block in self.resblocks:
            x = block(x)
        return x @ self.proj


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("mode", ["trace_float32", "script_float16"])
def test_torchscript_archive_matches_jit_load_state_dict(tmp_path, mode):
    torch.manual_seed(0)
    module = _TinyCLIPVisual().eval()
    if mode == "trace_float32":
        scripted = torch.jit.trace(module, torch.randn(3, 1, 8))
    else:
        scripted = torch.jit.script(module.half())
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(scripted, str(path))
    ours = read_torch_file(path)
    reference = torch.jit.load(str(path)).state_dict()
    assert list(ours) == list(reference)
    _assert_same(ours, dict(reference))


class _RunsShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickles_raise_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    in_zip = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _RunsShellCommand(marker)}, in_zip)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_RunsShellCommand(marker), protocol=2))
    for path in (in_zip, plain):
        with pytest.raises(UnsafeCheckpointError, match=r"(os|posix)\.system") as error:
            read_torch_file(path)
        assert str(path) in str(error.value)
        assert not marker.exists()


def test_whole_pickled_module_is_refused_with_advice(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(
        UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear.*state_dict"
    ):
        read_torch_file(path)


def test_files_that_are_not_supported_checkpoints_raise_clear_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        read_torch_file(text)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("folder/readme.txt", "hello")
    with pytest.raises(ValueError, match="data.pkl"):
        read_torch_file(other_zip)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy .*weights_only=True"):
        read_torch_file(legacy)
    with pytest.raises(FileNotFoundError):
        read_torch_file(tmp_path / "missing.pt")


def test_storage_smaller_than_its_declaration_is_refused(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(4)}, good)
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, data[:8] if info.filename.endswith("data/0") else data)
    with pytest.raises(ValueError, match="holds 8 bytes, but the pickle declares 16"):
        read_torch_file(bad)


def test_tensor_views_outside_their_storage_are_refused():
    storage = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(
        torch_io._tensor_from_storage(storage, 1, (2, 2), (3, 1)),
        torch.arange(6, dtype=torch.float32).as_strided((2, 2), (3, 1), 1).numpy(),
    )
    for offset, size, stride in [(3, (2, 2), (3, 1)), (-1, (2,), (1,)), (0, (2,), (-1,))]:
        with pytest.raises(ValueError, match="storage|non-negative"):
            torch_io._tensor_from_storage(storage, offset, size, stride)


def test_reader_works_without_torch_installed(tmp_path):
    path = tmp_path / "weights.pt"
    expected = torch.randn(3, 4)
    torch.save({"w": expected.to(torch.bfloat16), "v": expected.t()}, path)
    np.save(tmp_path / "expected.npy", expected.numpy())
    script = f"""
import importlib.util, sys
import numpy as np
sys.modules["torch"] = None  # any `import torch` now fails
spec = importlib.util.spec_from_file_location("torch_io", {torch_io.__file__!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
state = module.read_torch_file({str(path)!r})
expected = np.load({str(tmp_path / "expected.npy")!r})
np.testing.assert_array_equal(state["v"], expected.T)
assert np.abs(state["w"].astype(np.float32) - expected).max() <= 0.01 * np.abs(expected).max()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
