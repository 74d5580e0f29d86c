"""Every notebook in colabs/ runs top to bottom (its own asserts check its claims)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      f"{path.name} has outputs saved: strip them before committing.")
  NotebookClient(nb, timeout=240, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()


def test_every_notebook_has_a_colab_badge():
  for path in NOTEBOOKS:
    first = nbformat.read(path, as_version=4).cells[0].source
    assert "colab-badge.svg" in first and path.name in first
