"""Notebook 00 is stored clean and runs headless under papermill with tiny parameters."""
from __future__ import annotations

from pathlib import Path

import papermill
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "00_data_setup.ipynb"


@pytest.mark.slow
def test_notebook_00_executes(tmp_path):
    import nbformat

    source = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in source.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert source.metadata.kernelspec.name == "python3"

    data_dir = tmp_path / "data" / "synthetic"
    out = tmp_path / "00_out.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), kernel_name="python3", cwd=str(tmp_path),
                               progress_bar=False,
                               parameters={"config": "synthetic", "data_dir": str(data_dir), "grid": 4,
                                           "overrides": {"data.synthetic_train": 12, "data.synthetic_val": 4,
                                                         "data.n_labeled": 4}})
    assert not (data_dir / "VOCdevkit" / "VOC2012" / "cacnb_splits").exists()   # lists in memory, not on disk
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert "OK" in text and "labeled        4" in text and "unlabeled      8" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2      # the grid and the bar chart
