"""cacnb: a notebook-centric reproduction of CAC (Lai et al., CVPR 2021, arXiv 2106.14133).

The public surface is small:

- :func:`load_config` -- presets, JSON (ours or the official CAC files) and typed overrides
- :func:`launch` -- run training under torchrun from a notebook and return the run dir
- :func:`build_model`, :func:`load_checkpoint` -- DeepLabv3+ with the CAC classifier and projector (lazy: they
  import torch)
- :func:`load_run` -- open a run dir or checkpoint: its config, model with weights, metrics and paths (lazy)

The training loop itself is ``from cacnb.train import train`` (what ``python -m cacnb.train`` runs).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
# Imported eagerly on purpose: ``cacnb.launch`` is also a module name, and binding the function here keeps
# ``cacnb.launch(...)`` the function whatever was imported before (the module stays reachable as
# ``importlib.import_module("cacnb.launch")`` or through ``from cacnb.launch import ...``). launch.py does not
# import torch.
from .launch import launch  # noqa: E402

_LAZY = {"build_model": "cacnb.model", "load_checkpoint": "cacnb.model", "load_run": "cacnb.runs"}

__all__ = ["Config", "load_config", "launch", *sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cacnb' has no attribute {name!r}")
