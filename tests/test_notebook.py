"""docs/colab.ipynb runs end to end on CPU (a tiny model, a few steps) and is committed without outputs."""

import json
import pathlib
import sys

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "docs" / "colab.ipynb"
KERNEL = "arjax-test-python"  # a name no user kernel has, so no other installed kernelspec can win

# What the test runs instead of the notebook's settings: seconds on 2 CPU cores, same code path.
TEST_PARAMETERS = """\
MODEL = "tiny"
MODEL_OVERRIDES = {}
SEQ_LEN = 32
BATCH_SIZE = 4
STEPS = 5
EVAL_INTERVAL = 5
MAX_NEW_TOKENS = 16
"""


def _kernel_env(tmp_path, monkeypatch) -> None:
    """A kernelspec that starts this interpreter (the venv's, wherever ipykernel's own spec points) on CPU.

    Jupyter's runtime files and IPython's profile also go under ``tmp_path``, not the user's home.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "arjax test",
        "language": "python",
        "env": {"JAX_PLATFORMS": "cpu"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_notebook_is_clean():
    nbformat = pytest.importorskip(
        "nbformat", reason="the notebook extra (pip install -e '.[notebook]') is not installed"
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), (
        "clear the notebook's outputs before committing"
    )
    assert [c.id for c in code if "parameters" in c.metadata.get("tags", [])] == ["parameters"]


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    pytest.importorskip("nbclient", reason="the notebook extra (pip install -e '.[notebook]') is not installed")
    pytest.importorskip("ipykernel", reason="the notebook extra (pip install -e '.[notebook]') is not installed")
    import nbformat
    from nbclient import NotebookClient

    _kernel_env(tmp_path, monkeypatch)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    run_dir = tmp_path / "run"
    # papermill's convention: the overrides go in a cell right after the one tagged "parameters".
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(TEST_PARAMETERS + f"RUN_DIR = {str(run_dir)!r}\n")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import json; print(json.dumps({'samples': samples, 'final_step': result['final_step']}))"
        )
    )

    work = tmp_path / "cwd"
    work.mkdir()
    # Raises CellExecutionError, naming the cell, if any cell fails.
    NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(work)}}).execute()

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    devices = "".join(o.get("text", "") for o in nb.cells[at + 2].outputs)
    assert "cpu device(s)" in devices, devices
    plot = next(c for c in nb.cells if "plt.show()" in c.source)
    assert any("image/png" in o.get("data", {}) for o in plot.outputs), "the loss plot was not displayed"
    assert (run_dir / "loss.png").stat().st_size > 0 and (run_dir / "metrics.jsonl").is_file()
    report = json.loads(nb.cells[-1].outputs[-1]["text"])
    assert report["final_step"] == 5
    assert len(report["samples"]) == 2 and all(len(s) > 0 for s in report["samples"]), report
    assert not any(work.iterdir()), "the notebook wrote outside RUN_DIR"
