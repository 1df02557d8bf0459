"""notebooks/01_model.ipynb executes headless under papermill and loads the weights it is given."""
from __future__ import annotations

import warnings
from pathlib import Path

import nbformat
import papermill
import pytest

from cacnb.config import load_config
from cacnb.model import build_model

from conftest import save_model_checkpoint

NB = Path(__file__).resolve().parents[1] / "notebooks" / "01_model.ipynb"


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_is_clean():
    nb = nbformat.read(NB, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_with_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it; tiny convs on a shared CPU
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "model.pretrained is None", UserWarning)
        model = build_model(load_config("synthetic"))
    ckpt = tmp_path / "ckpt.pt"
    save_model_checkpoint(model, ckpt)
    out = tmp_path / "01_out.ipynb"
    papermill.execute_notebook(str(NB), str(out), parameters={"weights": str(ckpt), "image_size": [67, 93]},
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    text = _text(nbformat.read(out, as_version=4))
    assert "loaded cacnb weights" in text
    assert "total" in text and "16,706,869" in text           # ResNet-18, 21 classes
    assert "[1, 512, 5, 6]" in text                            # backbone at ceil(67/16) x ceil(93/16)
    assert "projection norms in [1.0000, 1.0000]" in text
