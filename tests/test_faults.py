"""Reliability (issue 14) with real processes: SIGTERM saves, a notebook interrupt saves, a failing rank surfaces.

Each test runs one tiny training subprocess (ResNet-18, 64-pixel crops) and stays under ~20 s on 2 CPU cores.
benchmarks/faults.py runs the long version: many random kills, then a bit-for-bit comparison.
"""
import _thread
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cacnb.config import save_config
from cacnb.runlog import read_metrics, split_kinds

from test_train import ROOT, tiny

LONG = {"train.epochs": 1, "train.iters_per_epoch": 500, "train.val_every": 0}


def _wait_for_steps(run_dir: Path, n: int, proc=None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        try:
            if len(split_kinds(read_metrics(run_dir)).get("train", [])) >= n:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no {n} training steps within {timeout} s")


def _assert_saved_where_it_stopped(run_dir: Path) -> int:
    state = torch.load(run_dir / "last.pt", weights_only=True)
    logged = [r["iter"] for r in split_kinds(read_metrics(run_dir))["train"]]
    assert logged == list(range(1, state["iteration"] + 1))  # the step in flight finished and was logged
    assert not list(run_dir.glob(".*.tmp"))
    return state["iteration"]


def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path, synthetic_data_dir):
    cfg = save_config(tiny(tmp_path, synthetic_data_dir, **LONG), tmp_path / "cfg.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cacnb.train", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(tmp_path / "run", 2, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "cacnb.train: interrupted: stopped by a signal at iteration" in err and "Traceback" not in err
    assert _assert_saved_where_it_stopped(tmp_path / "run") >= 2


def test_interrupting_the_launching_cell_saves_the_run(tmp_path, synthetic_data_dir, capsys):
    from cacnb.launch import launch

    over = {**tiny(tmp_path, synthetic_data_dir).to_dict(), "name": "synthetic"}
    over = {f"{s}.{k}": v for s, sec in over.items() if isinstance(sec, dict) for k, v in sec.items()}
    over.update(LONG)

    def interrupt_when_training():  # what the notebook's stop button does: KeyboardInterrupt in the kernel
        _wait_for_steps(tmp_path / "run", 2)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_when_training, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        launch("synthetic", overrides=over, quiet=True, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert _assert_saved_where_it_stopped(tmp_path / "run") >= 2
    assert (tmp_path / "run" / "config.json").exists() and not list((tmp_path / "run").glob(".launch.*"))


def test_a_refusing_rank_is_shown_first_under_two_processes(tmp_path, synthetic_data_dir):
    from cacnb.launch import LaunchError, launch
    from cacnb.paths import RunDirLock

    over = {"data.data_dir": str(synthetic_data_dir), "data.n_labeled": 8, "train.out_dir": str(tmp_path),
            "train.run_name": "run"}
    with RunDirLock(tmp_path / "run"), pytest.raises(LaunchError) as err:
        launch("synthetic", nproc=2, overrides=over, quiet=True, timeout=120,
               env={"OMP_NUM_THREADS": "1", "CACNB_DIST_TIMEOUT": "60"})
    lines = str(err.value).splitlines()
    assert lines[1] == "rank 0 failed first (exit code 2):", str(err.value)
    assert lines[2].startswith("cacnb.train[rank 0]: error: run dir") and "in use by another run (pid" in lines[2]


@pytest.mark.slow
def test_a_broken_file_on_one_rank_saves_on_rank_0_and_the_rerun_resumes(tmp_path, synthetic_voc):
    """2-process gloo: rank 1 alone meets a truncated JPEG at iteration 4 (of 4, mid-epoch). Both ranks stop before
    that step (neither waits in DDP for the other), rank 0 saves iteration 3, rank 1's message is the one error;
    restored, the same command finishes the run."""
    from test_dataset_rules import _voc_copy, truncate_unlabeled_image
    from test_train import _torchrun

    cfg = tiny(tmp_path, _voc_copy(synthetic_voc, tmp_path), **{
        "train.epochs": 1, "train.iters_per_epoch": 4, "train.batch_size": 4, "train.batch_size_unsup": 4, "train.log_every": 2,
        "train.val_every": 0})
    broken, original = truncate_unlabeled_image(cfg, step=3, rank=1, world=2)
    command = ["--config", str(save_config(cfg, tmp_path / "cfg.json"))]
    proc = _torchrun(command)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    errors = [line for line in log.replace("\r", "\n").splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("cacnb.train[rank 1]: error: image "), log[-3000:]
    assert f"{broken} is corrupt" in errors[0]
    assert f"after iteration 3/4 and saved it in {tmp_path / 'run' / 'last.pt'}" in log
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["iteration"] == 3 and len(state["rng"]) == 2
    assert [r["iter"] for r in split_kinds(read_metrics(tmp_path / "run"))["train"]] == [2, 3]
    broken.write_bytes(original)
    proc = _torchrun(command)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    kinds = split_kinds(read_metrics(tmp_path / "run"))
    assert [r["iter"] for r in kinds["train"]] == [2, 3, 4] and kinds["final"][0]["ranks_in_sync"] is True
