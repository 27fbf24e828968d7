"""notebooks/quickstart.ipynb: kept without outputs, and runs top to bottom at smoke size.

The run follows papermill's convention: a cell inserted after the one tagged "parameters" sets
SMOKE = True (tiny models, 20 steps) and the test's data directory; any error in any cell fails
the test. It takes one to two minutes on 2 CPU cores.
"""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 900


def parameters_index(notebook) -> int:
    tagged = [
        i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, f"{NOTEBOOK.name} needs exactly one cell tagged 'parameters'"
    return tagged[0]


def test_notebook_is_kept_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"code cells {dirty} of {NOTEBOOK} hold outputs or execution counts: clear them "
        "(Jupyter: Edit > Clear All Outputs) before committing"
    )
    parameters = notebook.cells[parameters_index(notebook)].source
    assert "SMOKE = False" in parameters and "DATA_DIR = None" in parameters


def python_kernel(directory: Path) -> str:
    """A kernelspec for this interpreter in `directory` (on JUPYTER_PATH): the notebook runs in
    the test's environment even where another `python3` kernel is installed."""
    name = "diffussm_test"
    spec = directory / "kernels" / name
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": name, "language": "python"})
    )
    return name


def outputs_of(cell) -> tuple[str, set[str]]:
    """(printed text, MIME types of displayed data) of an executed cell."""
    text = "".join(output.get("text", "") for output in cell.outputs)
    kinds = {kind for output in cell.outputs for kind in output.get("data", {})}
    return text, kinds


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_at_smoke_size(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    data_dir = os.environ["DIFFUSSM_TEST_DATA_DIR"]  # conftest: never ~/tensorflow_datasets
    injected = nbformat.v4.new_code_cell(
        f"SMOKE = True\nDATA_DIR = {data_dir!r}", metadata={"tags": ["injected-parameters"]}
    )
    notebook.cells.insert(parameters_index(notebook) + 1, injected)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel = python_kernel(tmp_path / "jupyter")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a Colab CPU runtime or a laptop
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name=kernel,
        resources={"metadata": {"path": str(REPO)}},
    )
    try:
        client.execute(env=env)  # raises CellExecutionError, with the cell and traceback
    finally:
        nbformat.write(notebook, tmp_path / "executed.ipynb")  # for a look after a failure

    sources = [cell.source for cell in notebook.cells]
    table_cell = next(i for i, s in enumerate(sources) if "training.setup(config)" in s)
    text, _ = outputs_of(notebook.cells[table_cell])
    assert "blocks" in text and "total" in text
    train_cell = next(i for i, s in enumerate(sources) if s.startswith("def train("))
    _, kinds = outputs_of(notebook.cells[train_cell])
    assert {"text/html", "image/png"} <= kinds  # the progress bar and the live plot
    score_cell = next(i for i, s in enumerate(sources) if "digits_quality(images" in s)
    text, kinds = outputs_of(notebook.cells[score_cell])
    assert "classified as the requested digit" in text and "image/png" in kinds
    _, kinds = outputs_of(notebook.cells[-2])  # DiffuSSM and DiT side by side
    assert "image/png" in kinds
