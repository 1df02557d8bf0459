"""Notebook 03 launches training through papermill, with one and two (gloo) workers."""
from pathlib import Path

import pytest

from cacnb.runlog import read_metrics, split_kinds

NB = Path(__file__).resolve().parent.parent / "notebooks" / "03_training.ipynb"
TINY = {"data.n_labeled": 8, "data.crop_size": 64, "data.base_size": 80, "data.num_workers": 0,
        "data.val_max_images": 2, "loss.selected_num": 64, "loss.epoch_start_unsup": 0,
        "train.batch_size": 4, "train.batch_size_unsup": 4, "train.log_every": 1}


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_notebook_03_trains_and_plots(tmp_path, synthetic_data_dir, nproc, monkeypatch):
    import papermill

    # the kernel and its workers inherit it: one thread per worker, as the sweep gives them (conftest.py's 2 threads
    # per worker oversubscribe 2 cores and make tiny trainings several times slower)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = {"config": "synthetic", "data_dir": str(synthetic_data_dir), "nproc": nproc, "epochs": 1,
              "iters_per_epoch": 2, "out_dir": str(tmp_path / "runs"), "also_supervised": nproc == 1,
              "overrides": TINY, "timeout": 300}
    papermill.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters=params, kernel_name="python3",
                               cwd=str(tmp_path), progress_bar=False)
    semi = tmp_path / "runs" / "synthetic_semi"
    kinds = split_kinds(read_metrics(semi))
    assert len(kinds["train"]) == 2 and kinds["final"][0]["ranks_in_sync"]
    assert len(kinds["final"][0]["param_digests"]) == nproc
    assert (tmp_path / "runs" / "synthetic_supervised" / "last.pt").exists() == (nproc == 1)
    assert "best val mIoU" in (tmp_path / "out.ipynb").read_text()
