"""notebooks/losses.ipynb runs top to bottom in this interpreter's kernel and is committed clean."""

import copy
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "losses.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_executes_in_this_interpreter():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    run = copy.deepcopy(nb)  # executed in memory only: the committed file is never written
    run.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    # jupyter_client starts kernel "python3" with sys.executable, i.e. this (the venv's) Python;
    # the last cell checks it.
    client = NotebookClient(run, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    assert run.cells[-1].outputs[0]["text"].strip() == sys.prefix
    images = [o for c in run.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 2
    assert nbformat.read(NOTEBOOK, as_version=4) == nb
