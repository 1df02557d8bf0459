"""Shared fixtures. The suite must stay fast on a 2-core CPU: tiny datasets, tiny models."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from pathlib import Path

import pytest

# Keep each test process to the cores the machine has; torch's default thread pool oversubscribes under xdist
# or torchrun children otherwise. Under pytest-xdist (`make test` runs two workers) each worker gets one thread,
# so that two workers use the 2 cores without four OpenMP threads spin-waiting on them (benchmarks/RESULTS.md,
# "The test suite", has the suite's times).
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")


# Per-test limits of pytest-timeout: `timeout` in pyproject.toml for every test (a hang fails that test, by
# name, instead of stalling the suite), and this larger one for the multi-process and notebook tests marked slow.
SLOW_TIMEOUT_S = 600


def pytest_collection_modifyitems(config, items):
    """Give tests marked ``slow`` the ``SLOW_TIMEOUT_S`` limit, unless a test sets its own ``timeout`` marker, and
    run them first: under ``-n 2`` a long test handed out last would leave one worker idle while it ends."""
    for item in items:
        if item.get_closest_marker("slow") and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept within each


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory):
    """A small synthetic VOC2012 tree shared by the whole session; returns the VOC2012 folder."""
    from cacnb.data.synthetic import make_synthetic_voc

    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_voc(root, num_train=24, num_val=6, seed=0)


@pytest.fixture(scope="session")
def synthetic_data_dir(synthetic_voc):
    """The folder to pass as ``data.data_dir`` (it holds VOCdevkit/VOC2012)."""
    return synthetic_voc.parent.parent


# The one trained run of the session: ResNet-18 from random weights, 16-d projector, 64-pixel crops, 2 val images.
# Three epochs of two iterations, stopped by max_iters after iteration 5: validations at 2 and 4 (best.pt is one of
# them) and last.pt at 5, so best.pt and last.pt always hold different weights, as an unfinished run's do.
TRAINED_RUN = {
    "data.n_labeled": 8, "data.crop_size": 64, "data.base_size": 80, "data.num_workers": 0,
    "data.val_max_images": 2, "model.backbone": "resnet18", "model.pretrained": None, "model.proj_dim": 16,
    "loss.selected_num": 64, "loss.epoch_start_unsup": 0, "train.epochs": 3, "train.iters_per_epoch": 2,
    "train.max_iters": 5, "train.batch_size": 2, "train.batch_size_unsup": 2, "train.log_every": 1,
    "train.run_name": "run",
}


def _digests(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _train_tiny_run(data_dir, out_dir):
    import warnings

    import torch

    from cacnb.config import load_config
    from cacnb.train import train

    over = {**TRAINED_RUN, "data.data_dir": str(data_dir), "train.out_dir": str(out_dir)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread below: about 10x faster than two threads on a loaded 2-core box
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "model.pretrained is None", UserWarning)
            return train(load_config("synthetic", over))
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _file_lock(path):
    """An exclusive lock on ``path`` (created if missing), held across processes until the block ends."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _shared_trained_run(synthetic_data_dir, tmp_path_factory):
    """Under pytest-xdist: the one run of the whole test run, trained by the first worker that asks for it while
    the others wait on a lock, in the folder all workers share (the parent of each worker's basetemp). Once per
    run is cheaper than once per worker: see the measurement in benchmarks/RESULTS.md."""
    shared = tmp_path_factory.getbasetemp().parent
    record = shared / "trained_run.json"
    with _file_lock(shared / "trained_run.lock"):
        if not record.exists():
            run = _train_tiny_run(synthetic_data_dir, shared / "trained_run")
            record.write_text(json.dumps({"run": str(run)}))
    return Path(json.loads(record.read_text())["run"])


@pytest.fixture(scope="session")
def trained_run(synthetic_data_dir, tmp_path_factory):
    """The run dir of one tiny training (see TRAINED_RUN), shared by the evaluation, visualisation, run-loading and
    notebook tests: built once per test run, also under ``-n 2``. Read it, never change it: a test that must
    change it copies it first. The session (each worker's, under xdist) fails at the end if any file in it
    changed."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run = _shared_trained_run(synthetic_data_dir, tmp_path_factory)
    else:
        run = _train_tiny_run(synthetic_data_dir, tmp_path_factory.mktemp("trained"))
    before = _digests(run)
    yield run
    assert _digests(run) == before, f"a test changed the shared run {run}; copy it before changing it"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a shared 2-core box OpenMP spin-waits make
    them up to 10x slower; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_model_checkpoint(model, path, cfg=None):
    """A minimal cacnb checkpoint (the engine's format, written the engine's way) of ``model``."""
    from cacnb.engine import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint

    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model.state_dict()}
    if cfg is not None:
        state["config"] = cfg.to_dict()
    return save_checkpoint(state, path)


# A process started in the background by a non-interactive shell inherits SIGINT *ignored*, and Python then never
# raises KeyboardInterrupt (nor do its children, which inherit the ignore across exec). The suite tests what Ctrl-C
# does, so give it the interactive disposition whatever shell started it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
