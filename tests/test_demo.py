"""`make demo` drives every notebook through papermill: its parameters must match what the notebooks declare."""
from pathlib import Path

import papermill
import pytest

from cacnb.demo import DEMO_PARAMETERS, notebook_parameters, summary

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["00_data_setup", "01_model", "02_loss_walkthrough", "03_training", "04_evaluation", "05_visualization"]


def test_all_six_notebooks_exist_and_take_parameters():
    assert sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) == EXPECTED
    for stem in EXPECTED:
        declared = papermill.inspect_notebook(str(NOTEBOOKS / f"{stem}.ipynb"))
        assert declared, f"{stem} has no cell tagged 'parameters'"


@pytest.mark.parametrize("stem", EXPECTED)
def test_demo_parameters_are_declared_by_the_notebook(stem):
    wanted = DEMO_PARAMETERS[stem]
    got = notebook_parameters(NOTEBOOKS / f"{stem}.ipynb", "runs/demo")
    assert set(got) == set(wanted), f"{stem}: the notebook does not declare {set(wanted) - set(got)}"
    assert all("{out}" not in str(v) for v in got.values())


def test_notebooks_are_committed_without_outputs():
    import nbformat

    for stem in EXPECTED:
        nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{stem} has outputs"


def test_summary_reports_both_runs(tmp_path, monkeypatch):
    import json

    for name, miou in (("synthetic_supervised", 0.4), ("synthetic_semi", 0.5)):
        run = tmp_path / "out" / name
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"kind": "val", "iter": 3, "miou": miou}) + "\n")
    monkeypatch.setattr("cacnb.demo.project_root", lambda *a: tmp_path)
    text = summary("out")
    assert "supervised baseline" in text and "40.00%" in text and "CAC (semi)" in text and "50.00%" in text
