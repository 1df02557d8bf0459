"""The official CAC JSON configs (its ``configs/*.json``), read into a :class:`cacnb.config.Config` key by key.

Every key of the official files has one of four fates, listed in :data:`RULES`:

* **mapped** onto a cacnb key (``n_gpu`` -> ``loss.paper_n_gpu``, ``datalist`` -> ``data.datalist``, ...);
* **fixed**: cacnb implements only the paper's value (``lr_scheduler: "Poly"``, ``model.out_dim: 256``, ...); any
  other value is a :class:`ConfigError` naming the key;
* **ignored**: bookkeeping of the official trainer (``save_dir``, ``tensorboardX``, the val loader's workers, ...)
  or a key the official code reads but never acts on; it is listed in one line of notes;
* anything else (a misspelt key) is a :class:`ConfigError` naming it, as for cacnb's own JSON files.

:func:`from_official` is the entry point (it prints the notes); :func:`import_official` returns the Config and the
note lines. Every error is one :class:`ConfigError` starting ``official config:``, raised where it is found.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .overrides import apply_overrides
from .presets import _cityscapes, _voc
from .schema import Config, ConfigError

_DATASETS = {"voc": "voc", "cityscapes": "cityscapes", "city": "cityscapes"}


def _leaves(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_leaves(v, key + "."))
        else:
            out[key] = v
    return out


def _set(attr: str, cast: Callable = lambda v: v) -> Callable[[Config, Any], None]:
    """A handler writing ``cast(value)`` to the dotted cacnb key ``attr``."""
    section, name = attr.split(".")

    def handler(cfg: Config, value: Any) -> None:
        setattr(getattr(cfg, section), name, cast(value))
    return handler


def _tuple_of_floats(v) -> tuple:
    return tuple(float(x) for x in v)


def _set_pretrained(cfg: Config, value: Any) -> None:
    if not value:
        cfg.model.pretrained = None


def _set_diff_lrs(cfg: Config, value: Any) -> None:
    cfg.optim.backbone_lr_mult = 0.1 if value else 1.0


def _set_scale(cfg: Config, value: Any) -> None:
    # official labeled loader: "scale": false resizes the long side to exactly base_size
    if not value:
        cfg.data.scale_range = (1.0, 1.0)


def _set_val(cfg: Config, value: Any) -> None:
    if not value:
        cfg.train.val_every = 0


def _set_val_per_epochs(cfg: Config, value: Any) -> None:
    if cfg.train.val_every:
        cfg.train.val_every = int(value)


# official key -> handler. ``_fixed(v)`` keys must hold v; ``_IGNORED`` keys are noted, never acted on.
def _fixed(expected: Any, why: str) -> tuple:
    return ("fixed", expected, why)


_IGNORED = ("ignored",)

RULES: dict[str, Any] = {
    # top level
    "name": _fixed("CAC", "cacnb implements the CAC model only"),
    "experim_name": lambda cfg, value: setattr(cfg, "name", str(value)),
    "dataset": None,                                          # read first: it chooses the preset
    "data_dir": _set("data.data_dir", str),
    "datalist": _set("data.datalist", int),
    "n_gpu": _set("loss.paper_n_gpu", int),
    "n_labeled_examples": None,                               # read first, with dataset
    "diff_lrs": _set_diff_lrs,
    "ramp_up": _IGNORED,                                      # read by no official code (a CCT leftover)
    "unsupervised_w": _IGNORED,                               # idem
    "ignore_index": _set("data.ignore_index", int),
    "lr_scheduler": _fixed("Poly", "cacnb's schedule is the official poly decay (optim.poly_power)"),
    "use_weak_lables": _fixed(False, "weak labels are not part of CAC (the official code breaks with them)"),
    "weakly_loss_w": _IGNORED,                                # only read with use_weak_lables
    "pretrained": _set_pretrained,
    "random_seed": _set("train.seed", int),
    # model
    "model.supervised": None,                                 # with model.semi: train.mode
    "model.semi": None,
    "model.supervised_w": _fixed(1, "the supervised loss has weight 1 in cacnb"),
    "model.sup_loss": _fixed("CE", "the supervised loss is cross-entropy"),
    "model.layers": None,                                     # read first: it chooses the backbone
    "model.downsample": _fixed(True, "CAC's features are the 2x2-pooled stride-8 decoder features"),
    "model.proj_final_dim": _set("model.proj_dim", int),
    "model.out_dim": _fixed(256, "the decoder has 256 channels"),
    "model.backbone": _fixed("deeplab_v3+", "cacnb builds DeepLabv3+ only"),
    "model.pos_thresh_value": _set("loss.pos_thresh", float),
    "model.weight_unsup": _set("loss.weight_unsup", float),
    "model.epoch_start_unsup": _set("loss.epoch_start_unsup", int),
    "model.selected_num": _set("loss.selected_num", int),
    "model.temp": _set("loss.temperature", float),
    "model.step_save": _set("loss.step_save", int),
    "model.stride": _set("data.stride", int),
    # optimizer
    "optimizer.type": _fixed("SGD", "cacnb trains with SGD"),
    "optimizer.args.lr": _set("optim.lr", float),
    "optimizer.args.weight_decay": _set("optim.weight_decay", float),
    "optimizer.args.momentum": _set("optim.momentum", float),
    # labeled loader
    "train_supervised.batch_size": _set("train.batch_size", int),
    "train_supervised.crop_size": _set("data.crop_size", int),
    "train_supervised.base_size": _set("data.base_size", int),
    "train_supervised.shuffle": _fixed(True, "cacnb always shuffles the training sets"),
    "train_supervised.scale": _set_scale,
    "train_supervised.augment": _fixed(True, "the labeled crops are always augmented"),
    "train_supervised.flip": _fixed(True, "the labeled crops are always flipped at random"),
    "train_supervised.rotate": _fixed(False, "cacnb has no rotation augmentation"),
    "train_supervised.blur": _IGNORED,                        # the official labeled loader never applies it
    "train_supervised.split": _fixed("train_supervised", "the labeled list is chosen by datalist / n_labeled"),
    "train_supervised.num_workers": _set("data.num_workers", int),
    "train_supervised.jitter": _set("data.color_jitter", bool),
    # unlabeled pairs: the official pair loaders ignore scale, augment, flip, rotate and blur
    "train_unsupervised.batch_size": _set("train.batch_size_unsup", int),
    "train_unsupervised.crop_size": None,                     # must equal the labeled one (one data.crop_size)
    "train_unsupervised.base_size": None,                     # idem
    "train_unsupervised.shuffle": _fixed(True, "cacnb always shuffles the training sets"),
    "train_unsupervised.scale": _IGNORED,
    "train_unsupervised.augment": _IGNORED,
    "train_unsupervised.flip": _IGNORED,
    "train_unsupervised.rotate": _IGNORED,
    "train_unsupervised.blur": _IGNORED,
    "train_unsupervised.split": _fixed("train_unsupervised", "the unlabeled list is the rest of the training set"),
    "train_unsupervised.num_workers": _IGNORED,               # cacnb has one data.num_workers (the labeled one)
    "train_unsupervised.iou_bound": _set("data.iou_bound", _tuple_of_floats),
    "train_unsupervised.stride": None,                        # must equal model.stride
    # validation loader
    "val_loader.batch_size": _IGNORED,                        # cacnb evaluates whole images one at a time
    "val_loader.val": _fixed(True, "the val loader evaluates"),
    "val_loader.split": _fixed("val", "the val list is the official one"),
    "val_loader.shuffle": _fixed(False, "evaluation reads the val list in order"),
    "val_loader.num_workers": _IGNORED,
    # trainer
    "trainer.epochs": _set("train.epochs", int),
    "trainer.save_dir": _IGNORED,                             # cacnb writes to train.out_dir / train.run_name
    "trainer.save_period": _IGNORED,                          # cacnb writes last.pt every epoch (train.ckpt_every)
    "trainer.monitor": _fixed("max Mean_IoU", "best.pt is chosen by val mIoU"),
    "trainer.early_stop": _IGNORED,                           # checked: harmless unless it stops training early
    "trainer.tensorboardX": _IGNORED,                         # cacnb writes TensorBoard events when installed
    "trainer.log_dir": _IGNORED,
    "trainer.log_per_iter": _set("train.log_every", int),
    "trainer.val": _set_val,
    "trainer.val_per_epochs": _set_val_per_epochs,
}


def import_official(d: Mapping[str, Any]) -> tuple[Config, list[str]]:
    """(Config, note lines) of an official JSON config; ConfigError for a key or value cacnb cannot honour."""
    leaves = _leaves(d)
    unknown = [k for k in leaves if k not in RULES]
    if unknown:
        close = {k: difflib.get_close_matches(k, RULES, n=1) for k in unknown}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise ConfigError(f"official config: unknown key(s) {hints}. The official files have: {', '.join(RULES)}")
    cfg = _base(leaves)
    notes: list[str] = []
    ignored = []
    for key, value in leaves.items():
        rule = RULES[key]
        if rule is None:
            continue
        if rule == _IGNORED:
            ignored.append(key)
        elif isinstance(rule, tuple):
            _check_fixed(key, value, rule)
        else:
            try:
                rule(cfg, value)  # the handlers only cast and assign: they never raise a ConfigError
            except (TypeError, ValueError):
                raise ConfigError(f"official config: {key}={value!r} has the wrong type") from None
    _check_special(leaves, cfg)
    if ignored:
        notes.append(f"official config: ignored {', '.join(ignored)} (bookkeeping of the official trainer, or "
                     f"keys its code never acts on; see FIDELITY.md)")
    return cfg, notes


def data_dir_note(d: Mapping[str, Any], cfg: Config) -> list[str]:
    """One line when the file's data_dir (another machine's path) is still the run's and does not exist here."""
    data_dir = d.get("data_dir")
    if data_dir is None or cfg.data.data_dir != str(data_dir) or Path(str(data_dir)).exists():
        return []
    return [f"official config: data_dir {data_dir!r} does not exist on this machine; set data.data_dir "
            f"(--set data.data_dir=PATH) to your copy of the dataset"]


def _base(leaves: Mapping[str, Any]) -> Config:
    """The preset the file's dataset / layers / n_labeled select, before the other keys are applied."""
    dataset = _DATASETS.get(leaves.get("dataset", "voc"))
    if dataset is None:
        raise ConfigError(f"official config: dataset {leaves.get('dataset')!r} is not supported; cacnb reads "
                          f"'voc' and 'cityscapes'")
    n_labeled = _integer(leaves, "n_labeled_examples", 1323 if dataset == "voc" else 372)
    layers = _integer(leaves, "model.layers", 50)
    if layers not in (50, 101):
        raise ConfigError(f"official config: model.layers must be 50 or 101 (as in the paper), got {layers}")
    backbone = f"resnet{layers}"
    return _voc(backbone, n_labeled) if dataset == "voc" else _cityscapes(n_labeled, backbone)


def _integer(leaves: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``int(leaves[key])``, ``default`` when the key is absent; a ConfigError naming the key when the value is not
    an integer."""
    if key not in leaves:
        return default
    value = leaves[key]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"official config: {key}={value!r} must be an integer") from None


def _check_fixed(key: str, value: Any, rule: tuple) -> None:
    _, expected, why = rule
    if value != expected or isinstance(value, bool) != isinstance(expected, bool):
        raise ConfigError(f"official config: {key}={value!r} cannot be honoured: cacnb supports only "
                          f"{expected!r} ({why}). Remove the key or set it to {expected!r}")


def _check_special(leaves: Mapping[str, Any], cfg: Config) -> None:
    """Keys that depend on each other: the mode, one crop / base size, one stride, early stopping."""
    supervised, semi = leaves.get("model.supervised", False), leaves.get("model.semi", True)
    if bool(supervised) == bool(semi):
        raise ConfigError(f"official config: model.supervised={supervised!r} and model.semi={semi!r}: exactly "
                          f"one must be true (as the official model asserts)")
    cfg.train.mode = "supervised" if supervised else "semi"
    for key in ("crop_size", "base_size"):
        theirs = _integer(leaves, f"train_unsupervised.{key}")
        if theirs is not None and theirs != getattr(cfg.data, key):
            raise ConfigError(f"official config: train_unsupervised.{key}={theirs} differs from "
                              f"train_supervised.{key}={getattr(cfg.data, key)}; cacnb uses one data.{key} for "
                              f"both loaders")
    stride = _integer(leaves, "train_unsupervised.stride")
    if stride is not None and stride != cfg.data.stride:
        raise ConfigError(f"official config: train_unsupervised.stride={stride} differs from model.stride="
                          f"{cfg.data.stride}; both are the feature stride (data.stride)")
    if stride is not None:
        cfg.data.stride = stride
    early = _integer(leaves, "trainer.early_stop")
    if early is not None and early < cfg.train.epochs:
        raise ConfigError(f"official config: trainer.early_stop={early} < trainer.epochs={cfg.train.epochs} "
                          f"cannot be honoured: cacnb trains every epoch (no early stopping)")


def is_official_json(d: Mapping[str, Any]) -> bool:
    return "n_labeled_examples" in d or "train_supervised" in d


def from_official(d: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any] | None = None) -> Config:
    """Map an official CAC JSON config (as shipped in its ``configs/``) onto a :class:`Config`, then apply
    ``overrides``.

    Every key is mapped, checked or noted (:data:`RULES`); the notes are printed as one line each, by rank 0 only.
    A misspelt key, or a value cacnb cannot honour, is a :class:`ConfigError` naming the key.
    """
    cfg, notes = import_official(d)
    cfg = apply_overrides(cfg, overrides)
    if os.environ.get("RANK", "0") == "0":
        for line in notes + data_dir_note(d, cfg):
            print(line, flush=True)
    return cfg
