"""Opening a run: :func:`load_run` is the one way to get a trained model, its config and its metrics back.

A *run* is what training writes into its run dir (``config.json``, ``metrics.jsonl``, ``best.pt``, ``last.pt``),
or just a checkpoint file (ours, or an official CAC one). :func:`load_run` reads each of those files once and
returns a :class:`Run`: the config, the model with its weights (eval mode), the metrics records and the paths.

The config policy (one for evaluation, figures and notebooks):

* the base config is the ``config`` argument when given, else the run dir's ``config.json``, else the config saved
  in the checkpoint; ``overrides`` and ``data_dir`` apply on top, and no ImageNet file is read (weights follow);
* the architecture (:data:`ARCHITECTURE_KEYS`) is the checkpoint's own when it saved a config: the weights have
  its shapes. A base config that says otherwise is corrected; an explicit override that says otherwise is refused
  with the differing keys, before any weights are touched.

The saved-config diff (:func:`config_diff`, :func:`describe_diff`) lives here too: training uses it to decide
whether a checkpoint may be resumed, evaluation to refuse a contradicting override. Resume reads its checkpoint
with :func:`training_state`, which refuses ``best.pt``: it holds the weights, config and history, but none of
the state only resuming needs (optimiser, feature bank, RNG streams; ``last.pt`` has them).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from cacnb.checkpoint_io import (FORMAT, RESUME_ONLY_KEYS, CheckpointError, check_finite_state, load_model_state,
                                 safe_load)
from cacnb.config import Config, apply_overrides, get_key, load_config, parse_overrides, valid_keys
from cacnb.model import build_model, unwrap
from cacnb.paths import resolve
from cacnb.runlog import best_of, read_metrics

__all__ = ["Run", "load_run", "pair_outputs", "find_checkpoint", "newest_run", "training_state", "training_progress", "config_diff",
           "describe_diff", "default_device", "ARCHITECTURE_KEYS", "CHECKPOINT_NAMES"]

# the settings that give the weights their shapes
ARCHITECTURE_KEYS = ("data.num_classes", "model.backbone", "model.proj_dim", "model.output_stride")
# what a run dir's checkpoint is, in order of preference
CHECKPOINT_NAMES = ("best.pt", "last.pt")
# checkpoint entries a Run does not keep: the weights (now in the model), what only resuming needs, and best.pt's
# mark that it lacks that
_RESUME_ONLY = ("model", "state_dict", "resumable", *RESUME_ONLY_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# the saved-config diff


def config_diff(saved: Mapping[str, Any], cfg: Config, keys: Optional[Iterable[str]] = None,
                skip: Iterable[str] = ()) -> dict[str, tuple]:
    """``{key: (saved value, value in cfg)}`` for each dotted key (default: every key but ``name``) whose value
    differs between the ``saved`` config dict and ``cfg``. Keys in ``skip``, and keys the saved dict lacks
    (written by an older version), are left out; JSON lists compare equal to the tuples they stand for."""
    skip = set(skip)
    changes = {}
    for key in (valid_keys(cfg) if keys is None else keys):
        if key == "name" or key in skip:
            continue
        section, name = key.split(".")
        if name not in saved.get(section, {}):
            continue
        theirs, ours = saved[section][name], get_key(cfg, key)
        if isinstance(ours, tuple) and isinstance(theirs, list):
            theirs = tuple(theirs)
        if theirs != ours:
            changes[key] = (theirs, ours)
    return changes


def describe_diff(changes: Mapping[str, tuple], keys: Optional[Iterable[str]] = None, there: str = "there",
                  here: str = "here") -> str:
    """``"k is a there but b here; ..."`` for ``keys`` (default: all) of a :func:`config_diff` result."""
    keys = list(changes) if keys is None else keys
    return "; ".join(f"{k} is {changes[k][0]!r} {there} but {changes[k][1]!r} {here}" for k in keys)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def find_checkpoint(run_dir: "str | os.PathLike") -> Optional[Path]:
    """``best.pt`` of a run dir, else ``last.pt``, else None."""
    folder = resolve(run_dir)
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def newest_run(config_name: str, mode: str, root: "str | os.PathLike", max_depth: int = 4) -> Optional[Path]:
    """The run dir under ``root`` (at most ``max_depth`` levels down) whose ``config.json`` has this config name
    and ``train.mode`` and that holds a checkpoint, most recently written first; None if there is none. Lets a
    notebook at its defaults find a run another tool wrote elsewhere (``make demo``'s ``runs/demo/sweep/...``)."""
    root = resolve(root)
    found = []
    for depth in range(1, max_depth + 1):
        for config in root.glob("/".join(["*"] * depth) + "/config.json"):
            try:
                saved = json.loads(config.read_text())
            except (OSError, ValueError):
                continue
            checkpoint = find_checkpoint(config.parent)
            if saved.get("name") == config_name and saved.get("train", {}).get("mode") == mode and checkpoint:
                found.append((checkpoint.stat().st_mtime, config.parent))
    return max(found)[1] if found else None


def training_state(path: "str | os.PathLike") -> dict:
    """Everything a run resumes from: one of our training checkpoints, read safely and checked for the entries
    resuming needs."""
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cacnb training checkpoint (no 'format': '{FORMAT}'); to start "
                              f"from other weights use cacnb.model.load_checkpoint instead of --resume")
    if state.get("resumable") is False:
        raise CheckpointError(f"{path} is a best-on-val checkpoint: it holds the weights, config and history but "
                              f"no optimiser state (SGD momentum), feature bank or RNG streams, so a run cannot "
                              f"resume from it. Resume from last.pt ({Path(path).parent / 'last.pt'}: drop --resume "
                              f"/ train.resume, or pass that file), or start from its weights with "
                              f"cacnb.model.load_checkpoint")
    for key in ("model", "optimizer", "iteration"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}', so the run cannot resume from it")
    return state


def training_progress(state: Mapping[str, Any]) -> Optional[tuple[int, int]]:
    """``(iterations done, iterations planned)`` of a read cacnb training checkpoint, None for other weights."""
    if "iteration" not in state or not isinstance(state.get("config"), Mapping):
        return None
    train = state["config"].get("train", {})
    planned = int(train.get("epochs", 0)) * int(train.get("iters_per_epoch", 0))
    return int(state["iteration"]), planned


# ---------------------------------------------------------------------------------------------------------------
# runs


@dataclass
class Run:
    """An opened run. ``model`` is in eval mode on the requested device; ``checkpoint`` is None for a randomly
    initialised model (``load_run(..., allow_random=True)`` without a checkpoint); ``run_dir`` is None for a
    checkpoint outside a run dir. ``state``: the checkpoint's entries other than weights and resume-only state
    (``iteration``, ``epoch``, ``history``, ``best_miou``, ``config`` as saved, ...), plus ``source`` (``cacnb``,
    ``official`` or ``state_dict``) and ``kept_at_init`` (weights the file did not hold)."""
    config: Config
    model: torch.nn.Module
    checkpoint: Optional[Path] = None
    run_dir: Optional[Path] = None
    metrics: list = field(default_factory=list)
    state: dict = field(default_factory=dict)

    @property
    def progress(self) -> Optional[tuple[int, int]]:
        """``(iterations done, iterations planned)``, None for weights that are not a cacnb training checkpoint."""
        return training_progress(self.state)

    def best_val(self) -> Optional[dict]:
        """The validation record of ``metrics.jsonl`` with the highest mIoU, or None."""
        return best_of(self.metrics)


def _locate(path: Path, allow_random: bool) -> tuple[Optional[Path], Optional[Path]]:
    """``(run_dir, checkpoint)`` of a run dir or checkpoint path."""
    if path.is_dir():
        checkpoint = find_checkpoint(path)
        if checkpoint is None and not allow_random:
            raise FileNotFoundError(f"no {' or '.join(CHECKPOINT_NAMES)} in {path}: train first (notebook 03 or "
                                    f"`python -m cacnb.demo`), or pass a checkpoint path")
        return path, checkpoint
    if path.is_file():
        parent = path.parent
        is_run = any((parent / name).is_file() for name in ("config.json", "metrics.jsonl"))
        return (parent if is_run else None), path
    if not allow_random:
        raise FileNotFoundError(f"{path} is neither a run dir nor a checkpoint: train first (notebook 03 or "
                                f"`python -m cacnb.demo`) or pass another path")
    return None, None


def _requested_config(config, run_dir: Optional[Path], saved: Optional[Mapping], extra: dict,
                      where: Path) -> Config:
    if config is not None:
        source = config
    elif run_dir is not None and (run_dir / "config.json").is_file():
        source = run_dir / "config.json"
    elif saved is not None:
        source = saved
    else:
        raise FileNotFoundError(f"{where} holds no config (no config.json beside it, none saved in the "
                                f"checkpoint): pass the config it was trained with (config=, or --config of "
                                f"`python -m cacnb.evaluate`: a preset or JSON file)")
    cfg = load_config(source, extra)
    cfg.model.pretrained = None  # the checkpoint's weights replace any initialisation
    return cfg


def _with_architecture(cfg: Config, saved: Mapping, extra: Mapping, checkpoint: Path) -> Config:
    """``cfg`` with the architecture of the checkpoint's saved config; refuses an override that contradicts it."""
    trained = load_config(saved)
    changes = config_diff(trained.to_dict(), cfg, keys=ARCHITECTURE_KEYS)
    forced = [k for k in changes if k in extra]
    if forced:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the requested model: "
                              f"{describe_diff(changes, forced, 'in the checkpoint', 'in the config')}. Drop the "
                              f"override, or use a checkpoint trained with that setting")
    return apply_overrides(cfg, {k: theirs for k, (theirs, _) in changes.items()})


def load_run(path: "str | os.PathLike", *, config: "str | os.PathLike | Config | None" = None,
             overrides: "Iterable[str] | Mapping[str, Any] | None" = None, data_dir: Optional[str] = None,
             device: "torch.device | str | None" = None, allow_random: bool = False) -> Run:
    """Open a run dir (its ``best.pt``, else ``last.pt``) or a checkpoint file (ours or official CAC).

    ``config``/``overrides``/``data_dir``: the config policy of the module docstring. ``device``: default CUDA
    if there is one, else CPU. ``allow_random``: without a checkpoint, a randomly initialised model of
    ``config`` (``Run.checkpoint`` None) instead of :class:`FileNotFoundError`.

    Errors keep their own type: :class:`FileNotFoundError`, :class:`cacnb.config.ConfigError`, and
    :class:`cacnb.checkpoint_io.CheckpointError` (unsafe or corrupt file, keys or shapes that do not fit,
    non-finite weights).
    """
    where = resolve(path)
    run_dir, checkpoint = _locate(where, allow_random)
    state = safe_load(checkpoint) if checkpoint is not None else None
    saved = state.get("config") if isinstance(state, Mapping) else None
    saved = saved if isinstance(saved, Mapping) else None
    extra = parse_overrides(overrides)
    if data_dir:
        extra["data.data_dir"] = data_dir
    cfg = _requested_config(config, run_dir, saved, extra, where)
    if saved is not None:
        cfg = _with_architecture(cfg, saved, extra, checkpoint)
    with warnings.catch_warnings():  # weights follow, or the caller says the model is random
        warnings.filterwarnings("ignore", message="model.pretrained is None")
        model = build_model(cfg)
    info: dict = {}
    if state is not None:
        info = load_model_state(model, state, str(checkpoint))
        check_finite_state(model.state_dict(), f"checkpoint {checkpoint}")
    kept = {k: v for k, v in info.items() if k not in _RESUME_ONLY}
    metrics = read_metrics(run_dir) if run_dir is not None and (run_dir / "metrics.jsonl").is_file() else []
    device = torch.device(device) if device is not None else default_device()
    return Run(config=cfg, model=model.to(device).eval(), checkpoint=checkpoint, run_dir=run_dir, metrics=metrics,
               state=kept)


# ---------------------------------------------------------------------------------------------------------------
# running an opened model


@torch.inference_mode()
def pair_outputs(model: torch.nn.Module, item: Mapping) -> list[dict]:
    """``model.crop_outputs`` of both crops of a pair item (:class:`cacnb.data.pairs.PairDataset`), in eval mode
    (the model's mode is restored): two ``{"feat", "proj", "logits"}`` at stride 8, batch dim dropped, on the CPU."""
    net = unwrap(model)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        outs = []
        for k in range(2):
            out = net.crop_outputs(item["image"][k:k + 1].to(device))
            outs.append({name: value[0].float().cpu() for name, value in out.items()})
    finally:
        net.train(was_training)
    return outs
