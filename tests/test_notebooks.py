"""The notebooks run top to bottom, and are committed clean.

Each notebook is executed with nbclient on a kernel that runs this interpreter (the venv's), in a
temporary working directory, with a cell `smoke = True` inserted after its `parameters` cell
(papermill's convention): tiny models, generated or mock data, a handful of steps. Any cell that
raises fails the test. The kernel sees 2 host CPU devices, so the sharded batches of the
notebooks are split as they are on a multi-core TPU.
"""

import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
SMOKE_CELL = "smoke = True"


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _parameter_cells(notebook) -> list[int]:
    return [
        index
        for index, cell in enumerate(notebook.cells)
        if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]


def with_smoke_parameters(notebook):
    """A copy of `notebook` with `smoke = True` in a cell right after its parameters cell."""
    notebook = copy.deepcopy(notebook)
    (index,) = _parameter_cells(notebook)
    injected = nbformat.v4.new_code_cell(SMOKE_CELL, id="injected-parameters")
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, injected)
    return notebook


def _kernel_manager(spec_dir: Path):
    """A kernel manager whose only kernel runs `sys.executable` (never another Python found on
    the machine's Jupyter path)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernel = spec_dir / "mtkd-test-python"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "mtkd_jax test interpreter",
                "language": "python",
            }
        )
    )
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name="mtkd-test-python", kernel_spec_manager=specs)


def _kernel_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        TF_CPP_MIN_LOG_LEVEL="2",
        MTKD_CACHE_DIR=str(scratch / "cache"),
        TFDS_DATA_DIR=str(scratch / "tensorflow_datasets"),
        KERAS_HOME=str(scratch / "keras"),
    )
    env.pop("MPLBACKEND", None)  # ipykernel's inline backend, so figures become outputs
    return env


def execute(notebook, workdir: Path):
    """Runs every cell of `notebook` in a fresh kernel in `workdir`; returns the executed copy."""
    from nbclient import NotebookClient

    client = NotebookClient(
        notebook,
        km=_kernel_manager(workdir / ".kernels"),
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=_kernel_env(workdir))
    return notebook


def _text_outputs(notebook) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                texts.append(output.get("text", ""))
            elif "data" in output:
                texts.append(output["data"].get("text/plain", ""))
    return "".join(texts)


def _has_image(notebook) -> bool:
    return any(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


def test_every_notebook_is_listed():
    assert NOTEBOOKS == [
        "01_quickstart_tpu.ipynb",
        "02_losses_in_your_jax_code.ipynb",
        "03_offline_demo.ipynb",
    ]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs_and_one_parameters_cell(name):
    notebook = _read(name)
    nbformat.validate(notebook)
    assert notebook.cells[0].cell_type == "markdown", "the first cell says what the notebook does"
    parameters = _parameter_cells(notebook)
    assert len(parameters) == 1, f"{name} has {len(parameters)} cells tagged 'parameters'"
    assert "smoke = False" in notebook.cells[parameters[0]].source
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_committed_notebooks_equal_the_generator_output():
    script = NOTEBOOK_DIR / "make_notebooks.py"
    spec = importlib.util.spec_from_file_location("make_notebooks", script)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generated = generator.notebooks()
    assert sorted(generated) == NOTEBOOKS
    for name, notebook in generated.items():
        committed = json.loads((NOTEBOOK_DIR / name).read_text())
        assert json.loads(nbformat.writes(notebook)) == committed, (
            f"{name} differs from notebooks/make_notebooks.py: edit the script and run it"
        )


def test_smoke_cell_is_inserted_right_after_the_parameters_cell():
    notebook = with_smoke_parameters(_read("03_offline_demo.ipynb"))
    (index,) = _parameter_cells(notebook)
    assert notebook.cells[index + 1].source == SMOKE_CELL
    assert "if smoke:" in notebook.cells[index + 2].source


# What each notebook must have printed when it ran through (besides raising nothing).
EXPECTED_OUTPUT = {
    "01_quickstart_tpu.ipynb": ("CpuDevice(id=1)", "student_stage1", "student_stage2"),
    "02_losses_in_your_jax_code.ipynb": ("CpuDevice(id=1)", "instance_kd", "held-out inputs"),
    "03_offline_demo.ipynb": ("student_stage1", "student_stage2", "novel:"),
}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_with_smoke_settings(name, tmp_path):
    executed = execute(with_smoke_parameters(_read(name)), tmp_path)
    printed = _text_outputs(executed)
    for expected in EXPECTED_OUTPUT[name]:
        assert expected in printed, f"{name} did not print {expected!r}"
    assert _has_image(executed), f"{name} showed no figure"
