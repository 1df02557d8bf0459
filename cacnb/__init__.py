"""cacnb: a notebook-centric reproduction of CAC (Lai et al., CVPR 2021, arXiv 2106.14133).

The public surface is small and imported lazily, so ``import cacnb`` stays cheap:

- :func:`load_config` -- presets, JSON (ours or the official CAC files) and typed overrides
- :func:`build_model` -- DeepLabv3+ with the CAC classifier and projector
- :func:`launch` -- run training under torchrun from a notebook and return the run dir
- :func:`train` -- the training loop itself (what ``python -m cacnb.train`` runs)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_config": "cacnb.config",
    "Config": "cacnb.config",
    "build_model": "cacnb.model",
    "load_checkpoint": "cacnb.model",
    "launch": "cacnb.launch",
    "train": "cacnb.train",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cacnb' has no attribute {name!r}")
