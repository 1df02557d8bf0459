"""One typed configuration object for every cacnb run.

A :class:`Config` has five sections (``data``, ``model``, ``loss``, ``optim``, ``train``). It comes from

* a preset name (``voc_r50_1323``, ``cityscapes_r50_372``, ``synthetic``, ... see :data:`PRESETS`),
* a JSON file written by cacnb (``config.json`` in every run dir), or
* an official CAC JSON file (``configs/voc_cac_deeplabv3+_resnet50_1over8_datalist0.json`` etc.),

followed by typed overrides ``{"train.epochs": 3}`` or ``["train.epochs=3"]`` (the CLI's ``--set``).
Unknown keys are errors that name the closest valid ones, so a typo never silently does nothing.

The modules, each importing only those above it:

* :mod:`.schema`: the dataclasses, value and range checks, typed access by dotted key, :class:`ConfigError`;
* :mod:`.presets`: :data:`PRESETS`;
* :mod:`.overrides`: ``--set a.b=v`` / mapping / papermill ``overrides`` parsing and application;
* :mod:`.official`: the official CAC JSON import (every key mapped, checked or noted);
* :mod:`.load`: :func:`load_config` and :func:`save_config`, where a configuration enters and leaves.

This package re-exports the names the rest of cacnb, the notebooks and the tests import from ``cacnb.config``.
"""
from __future__ import annotations

from .load import absolute_paths, load_config, save_config
from .official import from_official, is_official_json
from .overrides import apply_overrides, overrides_from_parameters, parse_overrides
from .presets import PAPER_PRETRAINED, PRESETS
from .schema import (BACKBONES, DATASETS, EVAL_MODES, FEATURE_STRIDE, LAYOUTS, MODES, NUMERIC_RANGES, PRECISIONS,
                     SYNTHETIC_STYLES, Config, ConfigError, DataConfig, LossConfig, ModelConfig, OptimConfig,
                     TrainConfig, check_paper_settings, coerce, dataset_layout, get_key, per_rank_batch, set_keys,
                     valid_keys)

__all__ = ["absolute_paths", "load_config", "save_config", "from_official", "is_official_json", "apply_overrides",
           "overrides_from_parameters", "parse_overrides", "PAPER_PRETRAINED", "PRESETS", "BACKBONES", "DATASETS",
           "EVAL_MODES", "FEATURE_STRIDE", "LAYOUTS", "MODES", "NUMERIC_RANGES", "PRECISIONS", "SYNTHETIC_STYLES",
           "Config", "ConfigError", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig",
           "check_paper_settings", "coerce", "dataset_layout", "get_key", "per_rank_batch", "set_keys", "valid_keys"]
