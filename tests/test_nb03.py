"""Notebook 03 launches training through papermill with two (gloo) workers. One worker is what every sweep run is:
tests/test_sweep.py executes it that way."""
from pathlib import Path

import pytest

from cacnb.runlog import read_metrics, split_kinds

NB = Path(__file__).resolve().parent.parent / "notebooks" / "03_training.ipynb"
TINY = {"data.n_labeled": 8, "data.crop_size": 64, "data.base_size": 80, "data.num_workers": 0,
        "data.val_max_images": 2, "loss.selected_num": 64, "loss.epoch_start_unsup": 0,
        "train.batch_size": 4, "train.batch_size_unsup": 4, "train.log_every": 1}


@pytest.mark.slow
def test_notebook_03_trains_and_plots(tmp_path, synthetic_data_dir, monkeypatch):
    import papermill

    # the kernel and its workers inherit it: one thread per worker, as the sweep gives them (conftest.py's 2 threads
    # per worker oversubscribe 2 cores and make tiny trainings several times slower)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = {"config": "synthetic", "data_dir": str(synthetic_data_dir), "nproc": 2, "epochs": 1,
              "iters_per_epoch": 2, "out_dir": str(tmp_path / "runs"), "also_supervised": True,
              "overrides": TINY, "timeout": 300}
    papermill.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters=params, kernel_name="python3",
                               cwd=str(tmp_path), progress_bar=False)
    semi = tmp_path / "runs" / "synthetic_semi"
    kinds = split_kinds(read_metrics(semi))
    assert len(kinds["train"]) == 2 and kinds["final"][0]["ranks_in_sync"]
    assert len(kinds["final"][0]["param_digests"]) == 2
    supervised = split_kinds(read_metrics(tmp_path / "runs" / "synthetic_supervised"))
    assert len(supervised["train"]) == 2 and all("loss_unsup" not in r for r in supervised["train"])
    assert "best val mIoU" in (tmp_path / "out.ipynb").read_text()
