"""`make demo` drives every notebook through papermill: its parameters must match what the notebooks declare."""
from pathlib import Path

import papermill
import pytest

from cacnb.demo import DEMO_PARAMETERS, notebook_parameters, summary

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["00_data_setup", "01_model", "02_loss_walkthrough", "03_training", "04_evaluation", "05_visualization",
            "06_results"]
# notebook 03 runs inside the demo's sweep (cacnb.sweep passes its parameters), every other one directly
DIRECT = [stem for stem in EXPECTED if stem != "03_training"]


def test_all_notebooks_exist_and_take_parameters():
    assert sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) == EXPECTED
    for stem in EXPECTED:
        declared = papermill.inspect_notebook(str(NOTEBOOKS / f"{stem}.ipynb"))
        assert declared, f"{stem} has no cell tagged 'parameters'"


@pytest.mark.parametrize("stem", DIRECT)
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


def test_summary_reports_both_rows_with_the_one_seed_caveat(tmp_path, monkeypatch):
    from cacnb.results import write_results_csv

    rows = [{"run": f"{mode}_s0", "mode": mode, "seed": 0, "overrides": "", "val_miou": val, "test_miou": test,
             "test_miou_final": test - 5, "best_iter": best, "final_iter": 200, "train_seconds": 1.0,
             "status": "ok", "log": "x",
             "test_agreement": test + 30, "test_margin": 0.25, "test_pos_sim": 0.75, "test_other_sim": 0.5}
            for mode, val, test, best in (("supervised", 41.0, 40.0, 200), ("semi", 52.0, 50.0, 100))]
    write_results_csv(tmp_path / "out" / "sweep" / "results.csv", rows)
    monkeypatch.setattr("cacnb.demo.project_root", lambda *a: tmp_path)
    text = summary("out")
    assert "supervised baseline" in text and "test mIoU 40.00%" in text
    assert "CAC (semi)" in text and "test mIoU 50.00%" in text
    assert "cross-context agreement 80.00%, feature margin 0.250" in text
    assert "ONE seed" in text and "make sweep" in text
    # semi's best.pt at iteration 100 is the baseline's model (CAC is on after iteration 100): the summary says so
    assert text.count("the final checkpoint (iteration 200) gives test mIoU 45.00%") == 1
    assert "precedes CAC, which switched on after iteration 100" in text and text.count("precedes CAC") == 1


def test_a_failed_training_sweep_ends_the_demo_with_a_message(tmp_path, monkeypatch, capsys):
    import cacnb.demo as demo

    monkeypatch.setattr(demo.sweep, "main", lambda argv: 1)
    monkeypatch.setattr(demo, "project_root", lambda *a: Path(__file__).resolve().parents[1])
    assert demo.main(["--out", str(tmp_path / "out"), "--only", "03"]) == 1
    assert "the demo's training sweep failed (exit 1)" in capsys.readouterr().err
