"""notebooks/02_loss_walkthrough.ipynb executes headless under papermill on a real synthetic pair."""
from __future__ import annotations

from pathlib import Path

import nbformat
import papermill
import pytest

NB = Path(__file__).resolve().parents[1] / "notebooks" / "02_loss_walkthrough.ipynb"
TINY = {"data.n_labeled": 4, "data.crop_size": 64, "data.base_size": 80, "loss.selected_num": 128}


def _outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") + str(out.get("data", {}).get("text/markdown", "")))
    return "".join(parts)


def test_notebook_is_clean_and_parameterised():
    nb = nbformat.read(NB, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    for name in ("config", "data_dir", "checkpoint", "pair_index", "pos_thresh", "seed"):
        assert f"{name} = " in code[0].source
    assert all(not c.outputs and c.execution_count is None for c in code)
    text = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "\\log" in text and "w_i" in text                 # the equations are in the narrative


@pytest.mark.slow
def test_notebook_runs_and_checks_the_fast_loss(tmp_path, synthetic_data_dir, trained_run, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt = trained_run / "best.pt"  # the session's trained run (conftest.py); its architecture wins over the preset
    out = tmp_path / "02_out.ipynb"
    # gamma = 0.3: a barely trained model is rarely confident, and the terms should not all be empty
    params = {"data_dir": str(synthetic_data_dir), "checkpoint": str(ckpt), "pair_index": 1, "pos_thresh": 0.3,
              "overrides": TINY}
    papermill.execute_notebook(str(NB), str(out), parameters=params, kernel_name="python3", cwd=str(tmp_path),
                               progress_bar=False)
    text = _outputs(nbformat.read(out, as_version=4))
    assert "loaded" in text and "overlap positions on a" in text
    assert "negatives; the same-label filter removes" in text
    assert "fast loss == plain formula (values and gradients, rtol 1e-5): OK" in text
