"""Where a configuration enters: a preset name, a JSON file (cacnb's own or an official CAC one), a dict or a
:class:`Config`, followed by typed overrides ``{"train.epochs": 3}`` or ``["train.epochs=3"]`` (the CLI's
``--set``); and where it leaves, as the run dir's ``config.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..paths import atomic_write_text, resolve
from .official import from_official, is_official_json
from .overrides import apply_overrides
from .presets import PRESETS
from .schema import Config, ConfigError, get_key

def load_config(source: "str | os.PathLike | Mapping[str, Any] | Config | None" = "synthetic",
                overrides: Iterable[str] | Mapping[str, Any] | None = None) -> Config:
    """Build a validated Config from a preset name, a JSON path (ours or official), a dict, or a Config.

    Its paths come back absolute (:func:`absolute_paths`): this is where a configuration enters, so relative
    paths are resolved here, once, against the caller's working directory or the project root; everything
    downstream (data, training, subprocesses) takes them as they are.

    >>> cfg = load_config("voc_r50_1323", {"train.epochs": 2})
    """
    if source is None:
        source = "synthetic"
    if isinstance(source, Config):
        cfg = source
    elif isinstance(source, Mapping):
        cfg = _from_json(source, overrides)
    elif str(source) in PRESETS:
        cfg = PRESETS[str(source)]()
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"config {str(source)!r} is neither a preset ({', '.join(PRESETS)}) nor an "
                              f"existing JSON file")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        cfg = _from_json(d, overrides)
    return absolute_paths(apply_overrides(cfg, overrides).validate())


def _from_json(d: Mapping[str, Any], overrides) -> Config:
    """An official file (overrides applied first, so its notes describe the run) or one of ours."""
    return from_official(d, overrides) if is_official_json(d) else Config.from_dict(d)


def save_config(cfg: Config, path: "str | os.PathLike") -> Path:
    """Write ``cfg`` as JSON atomically (temporary file + rename)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2) + "\n")
    return path


def absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` with its data, split, weight, output and resume paths made absolute (see
    :func:`cacnb.paths.resolve`), so every rank and subprocess agrees on them whatever its working directory."""
    over = {"data.data_dir": str(resolve(cfg.data.data_dir)), "train.out_dir": str(resolve(cfg.train.out_dir))}
    for key in ("data.split_dir", "model.pretrained", "train.resume"):
        if get_key(cfg, key):
            over[key] = str(resolve(get_key(cfg, key)))
    return apply_overrides(cfg, over)
