"""Shared fixtures. The suite must stay fast on a 2-core CPU: tiny datasets, tiny models."""
from __future__ import annotations

import os

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
