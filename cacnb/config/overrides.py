"""Overrides: ``["train.epochs=3"]`` (the CLI's ``--set``), a mapping ``{"train.epochs": 3}``, or the
``overrides`` papermill parameter of the notebooks, applied to a :class:`Config` with typed values.

An unknown key is a :class:`ConfigError` naming the closest valid keys (:func:`cacnb.config.schema.set_keys`), so
a typo never silently does nothing.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from .schema import Config, ConfigError, set_keys


def parse_overrides(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["a.b=1", "c.d=x"]`` or a mapping -> ``{"a.b": "1", ...}``."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=3")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def apply_overrides(cfg: Config, overrides: Iterable[str] | Mapping[str, Any] | None) -> Config:
    """Return a copy of ``cfg`` with typed overrides applied. Unknown keys raise :class:`ConfigError`."""
    return set_keys(cfg, parse_overrides(overrides))


def overrides_from_parameters(config: "Config | str", *, mode: Optional[str] = None,
                              data_dir: Optional[str] = None, epochs: Optional[int] = None,
                              iters_per_epoch: Optional[int] = None, out_dir: Optional[str] = None,
                              run_name: Optional[str] = None, resume: Optional[str] = None,
                              amp: Optional[bool] = None, extra: Optional[Mapping[str, object]] = None) -> dict:
    """Turn notebook 03's papermill parameters into typed config overrides; ``None`` keeps the config's value.

    The run dir is ``<out_dir>/<config name>_<mode>`` unless ``run_name`` is given, so a supervised baseline and a
    CAC run of the same config sit side by side.
    """
    over: dict = {}
    for key, value in (("train.mode", mode), ("train.run_name", run_name), ("data.data_dir", data_dir),
                       ("train.epochs", epochs), ("train.iters_per_epoch", iters_per_epoch), ("train.out_dir", out_dir),
                       ("train.resume", resume), ("train.amp", amp)):
        if value is not None:
            over[key] = value
    over.update(extra or {})
    return over
