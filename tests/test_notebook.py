"""Executes notebooks/quickstart.ipynb (a short run of the quickstart) so it
cannot rot: every cell must run, and the notebook itself asserts that the
loss falls."""
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("LCJAX_NOTEBOOK_STEPS", "12")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # One CPU device for the kernel, whatever the test session fakes.
  monkeypatch.setenv("XLA_FLAGS", "")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                    for o in cell.get("outputs", []))
  assert "steps in" in outputs and "loss " in outputs and "final eval" in outputs
