"""Shared fixtures. The suite must stay fast on a 2-core CPU: tiny datasets, tiny models."""
from __future__ import annotations

import os
import signal

import pytest

# Keep each test process to the cores the machine has; torch's default thread pool oversubscribes under xdist
# or torchrun children otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "2")


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
