"""The configuration schema: the five sections of a :class:`Config`, their types, and every value check.

Also the typed access by dotted key (``train.epochs``) that JSON files and overrides go through: an unknown key
is a :class:`ConfigError` naming the closest valid ones, and a value is coerced to the declared type or refused.
This module imports nothing of cacnb at load time; everything else under :mod:`cacnb.config` builds on it.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

LAYOUTS = {"synthetic": "voc", "voc": "voc", "cityscapes": "cityscapes"}  # dataset -> the file layout it uses
DATASETS = tuple(LAYOUTS)
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
MODES = ("semi", "supervised", "full")  # full: every training image labeled (the upper bound)
PRECISIONS = ("fp32", "tf32", "bf16")
EVAL_MODES = ("whole", "slide")
SYNTHETIC_STYLES = ("context", "objects")  # the scene styles of cacnb.data.synthetic.STYLES
# Stride of the features CAC compares: the stride-4 decoder output, 2x2 average pooled (cacnb.model). The pair
# crops' offsets and overlap boxes are multiples of it, so data.stride must equal it.
FEATURE_STRIDE = 8


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which and what to do."""


def dataset_layout(dataset: str) -> str:
    """``"voc"`` or ``"cityscapes"``: the folder layout, list format and class set of ``dataset`` (the synthetic
    sets are written in the VOC layout with VOC's 21 classes). The one place that decides it."""
    try:
        return LAYOUTS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}") from None


@dataclass
class DataConfig:
    dataset: str = "synthetic"            # synthetic | voc | cityscapes
    data_dir: str = "data/synthetic"      # VOC: folder holding VOCdevkit/VOC2012 (or VOC2012 itself)
    n_labeled: int = 1323                 # size of the labeled split
    split_seed: int = 0                   # seed of generated splits (used when datalist is None)
    split_dir: Optional[str] = None       # folder with lists {n}_train_(un)supervised.txt (wins over datalist)
    datalist: Optional[int] = None        # the paper's shipped lists 0/1/2 (VOC, Cityscapes); None: seeded split
    num_classes: int = 21
    ignore_index: int = 255
    base_size: int = 400                  # long side before the random rescale
    crop_size: int = 320
    scale_range: tuple[float, float] = (0.5, 2.0)       # labeled rescale range
    pair_scale_range: tuple[float, float] = (0.8, 2.0)  # unlabeled pair rescale range
    iou_bound: tuple[float, float] = (0.1, 1.0)
    stride: int = 8                       # feature stride the crop offsets are multiples of
    color_jitter: bool = False            # colour jitter on labeled crops (official: Cityscapes only)
    photometric: bool = True              # per-crop photometric augmentation on pairs
    context: bool = True                  # false (ablation): both pair crops from one window, no context change
    num_workers: int = 4                  # DataLoader workers per rank
    val_max_images: Optional[int] = None  # evaluate only the first N val images (quick runs)
    test_max_images: Optional[int] = None  # test split: only the first N images (make demo; evaluation reads it)
    synthetic_train: int = 240            # images the synthetic generator writes, when it has to
    synthetic_val: int = 40
    synthetic_test: int = 0               # held-out test images (0: no test split)
    synthetic_style: str = "objects"      # objects (quick demo set) | context (look-alike classes benchmark)


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    output_stride: int = 16
    pretrained: Optional[str] = "pretrained/resnet50-19c8e357.pth"  # torchvision state dict; None: random
    proj_dim: int = 128
    sync_bn: bool = True                  # converted only for multi-GPU CUDA runs
    channels_last: bool = False


@dataclass
class LossConfig:
    weight_unsup: float = 0.1
    temperature: float = 0.1
    pos_thresh: float = 0.75
    selected_num: int = 6400              # negatives sampled per crop per rank (official)
    step_save: int = 1                    # extra steps kept in the feature bank
    epoch_start_unsup: int = 5
    neg_total: Optional[int] = None       # fix the total negatives whatever the world size (wins over paper_n_gpu)
    paper_n_gpu: Optional[int] = None     # GPUs of the paper's run: keep its negatives total at any world size
    chunk_size: int = 4096                # negatives per chunk of the streaming logsumexp
    precision: str = "fp32"               # fp32 | tf32 | bf16 similarity matmuls (tf32/bf16: CUDA only)
    directional: bool = True              # false (ablation): no confidence rule, both sides pulled together
    neg_filter: bool = True               # false (ablation): keep negatives with the anchor's pseudo-label


@dataclass
class OptimConfig:
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 0.1
    poly_power: float = 0.9


@dataclass
class TrainConfig:
    mode: str = "semi"                    # semi (CAC) | supervised (labeled-only) | full (all train images labeled)
    epochs: int = 80
    iters_per_epoch: int = 1157
    batch_size: int = 8                   # global labeled batch, split over ranks
    batch_size_unsup: int = 8             # global number of unlabeled pairs, split over ranks
    seed: int = 42
    log_every: int = 20
    val_every: int = 1                    # validate every N epochs (0: never)
    ckpt_every: int = 0                   # also write last.pt every N iterations (0: epochs only)
    amp: bool = False                     # bf16 autocast, CUDA only
    compile: bool = False                 # torch.compile the model
    out_dir: str = "runs"
    run_name: Optional[str] = None        # default: <config name>_<mode>
    resume: Optional[str] = None          # checkpoint path; last.pt in the run dir resumes automatically
    eval_mode: str = "whole"              # whole | slide
    max_iters: Optional[int] = None       # stop after this many iterations in total (smoke tests)
    tensorboard: bool = False             # also write TensorBoard scalars to <run dir>/tb (pip install cacnb[tensorboard])


@dataclass
class Config:
    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """Strict: every key must exist; values are coerced to the declared types."""
        return set_keys(cls(), _flatten(d))

    def validate(self) -> "Config":
        _check_choice("data.dataset", self.data.dataset, DATASETS)
        _check_choice("model.backbone", self.model.backbone, BACKBONES)
        _check_choice("train.mode", self.train.mode, MODES)
        _check_choice("loss.precision", self.loss.precision, PRECISIONS)
        _check_choice("train.eval_mode", self.train.eval_mode, EVAL_MODES)
        _check_choice("data.synthetic_style", self.data.synthetic_style, SYNTHETIC_STYLES)
        _check_ranges(self)  # first: the checks below divide by some of these
        if self.model.output_stride not in (8, 16):
            raise ConfigError(f"model.output_stride must be 8 or 16, got {self.model.output_stride}")
        if self.data.crop_size % self.data.stride:
            raise ConfigError(f"data.crop_size ({self.data.crop_size}) must be a multiple of "
                              f"data.stride ({self.data.stride})")
        check_paper_settings(self)
        lo, hi = self.data.iou_bound
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"data.iou_bound must satisfy 0 <= lo <= hi <= 1, got {self.data.iou_bound}")
        return self

    @property
    def run_dir(self) -> Path:
        """``<out_dir>/<run_name>``, by default ``<out_dir>/<config name>_<mode>``, so a CAC run and its supervised
        baseline never share a run dir (and never resume each other's checkpoints)."""
        return Path(self.train.out_dir) / (self.train.run_name or f"{self.name}_{self.train.mode}")


def _at_least(lo: float) -> typing.Callable[[Any], bool]:
    return lambda v: v >= lo


def _positive(v: Any) -> bool:
    return v > 0


def _unit(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def _interval(v: Any) -> bool:
    return 0.0 < v[0] <= v[1]


def _optional(check: typing.Callable[[Any], bool]) -> typing.Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# (key, predicate, allowed range as the error message states it); NaN fails every predicate. One row per numeric
# key, so a new key gets its check here and nowhere else.
NUMERIC_RANGES: tuple[tuple[str, typing.Callable[[Any], bool], str], ...] = (
    ("data.n_labeled", _at_least(1), ">= 1"),
    ("data.split_seed", _at_least(0), ">= 0"),
    ("data.num_classes", lambda v: 1 <= v <= 255, "1..255 (class ids are 8-bit, 255 is the ignore label)"),
    ("data.ignore_index", lambda v: 0 <= v <= 255, "0..255"),
    ("data.base_size", _at_least(1), ">= 1 pixel"),
    ("data.crop_size", _at_least(1), ">= 1 pixel"),
    ("data.scale_range", _interval, "0 < low <= high"),
    ("data.pair_scale_range", _interval, "0 < low <= high"),
    ("data.stride", _at_least(1), ">= 1 pixel"),
    ("data.num_workers", _at_least(0), ">= 0 (0: load in the training process)"),
    ("data.val_max_images", _optional(_at_least(1)), ">= 1, or null for all"),
    ("data.test_max_images", _optional(_at_least(1)), ">= 1, or null for all"),
    ("data.synthetic_train", _at_least(1), ">= 1"),
    ("data.synthetic_val", _at_least(1), ">= 1"),
    ("data.synthetic_test", _at_least(0), ">= 0 (0: no test split)"),
    ("data.datalist", _optional(_at_least(0)), ">= 0 (the paper's lists 0, 1, 2), or null for a seeded split"),
    ("model.proj_dim", _at_least(1), ">= 1"),
    ("loss.weight_unsup", _at_least(0.0), ">= 0"),
    ("loss.temperature", _positive, "> 0 (the paper uses 0.1)"),
    ("loss.pos_thresh", _unit, "0..1 (a confidence)"),
    ("loss.selected_num", _at_least(1), ">= 1"),
    ("loss.step_save", _at_least(0), ">= 0"),
    ("loss.epoch_start_unsup", _at_least(0), ">= 0"),
    ("loss.neg_total", _optional(_at_least(1)), ">= 1, or null for selected_num per crop"),
    ("loss.paper_n_gpu", _optional(_at_least(1)), ">= 1, or null for the official per-process rule"),
    ("loss.chunk_size", _at_least(1), ">= 1"),
    ("optim.lr", _positive, "> 0"),
    ("optim.momentum", lambda v: 0.0 <= v < 1.0, "0 <= momentum < 1"),
    ("optim.weight_decay", _at_least(0.0), ">= 0"),
    ("optim.backbone_lr_mult", _at_least(0.0), ">= 0"),
    ("optim.poly_power", _at_least(0.0), ">= 0"),
    ("train.epochs", _at_least(1), ">= 1"),
    ("train.iters_per_epoch", _at_least(1), ">= 1"),
    ("train.batch_size", _at_least(1), ">= 1"),
    ("train.batch_size_unsup", _at_least(1), ">= 1"),
    ("train.seed", _at_least(0), ">= 0"),
    ("train.log_every", _at_least(1), ">= 1 iteration"),
    ("train.val_every", _at_least(0), ">= 0 epochs (0: never)"),
    ("train.ckpt_every", _at_least(0), ">= 0 iterations (0: at epoch ends only)"),
    ("train.max_iters", _optional(_at_least(1)), ">= 1, or null for the whole schedule"),
)


def _check_ranges(cfg: "Config") -> None:
    for key, ok, allowed in NUMERIC_RANGES:
        value = get_key(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def _check_choice(key: str, value: Any, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def check_paper_settings(cfg: "Config") -> None:
    """Settings that must agree with the model or with the shipped split lists (see FIDELITY.md)."""
    if cfg.data.stride != FEATURE_STRIDE:
        raise ConfigError(f"data.stride must be {FEATURE_STRIDE}, the stride of the features CAC compares (decoder "
                          f"stride 4, 2x2 average pooled), got {cfg.data.stride}: the pair offsets and overlap "
                          f"boxes are cut on that grid, and any other value gathers the wrong feature cells")
    if cfg.data.datalist is not None and not cfg.data.split_dir:
        from ..data import official  # lazy: cacnb.data imports this package (a cycle at load time)

        problem = official.choice_problem(cfg.data.dataset, cfg.data.datalist, cfg.data.n_labeled)
        if problem:
            raise ConfigError(problem)


# ---------------------------------------------------------------------------------------------------------------
# keys and typed values


def valid_keys(cfg: Config | None = None) -> list[str]:
    """All dotted keys a Config accepts, e.g. ``train.epochs``."""
    cfg = cfg or Config()
    keys = ["name"]
    for sec in dataclasses.fields(cfg):
        if sec.name == "name":
            continue
        keys += [f"{sec.name}.{f.name}" for f in dataclasses.fields(getattr(cfg, sec.name))]
    return keys


def _field(cfg: Config, key: str) -> tuple[Any, str, Any]:
    """(owner object, attribute name, declared type) of a dotted key; else a ConfigError naming the closest keys."""
    parts = key.split(".")
    if key == "name":
        return cfg, "name", str
    if len(parts) == 2 and parts[0] in {f.name for f in dataclasses.fields(cfg)} and parts[0] != "name":
        owner = getattr(cfg, parts[0])
        hints = typing.get_type_hints(type(owner))
        if parts[1] in hints:
            return owner, parts[1], hints[parts[1]]
    keys = valid_keys(cfg)
    close = [k for k in keys if parts[-1] in k or k.endswith(parts[-1])] or difflib.get_close_matches(key, keys)
    hint = f" Did you mean {close}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}.{hint} Valid keys: {', '.join(keys)}")


def get_key(cfg: Config, key: str) -> Any:
    owner, attr, _ = _field(cfg, key)
    return getattr(owner, attr)


def coerce(value: Any, tp: Any, key: str = "?") -> Any:
    """Convert ``value`` (often a string from the CLI) to the declared type ``tp``; raise ConfigError if it can't."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text) if text.startswith("[") else [v for v in text.strip("()").split(",") if v]
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: cannot parse {value!r} as a list ({e})") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_types = args if origin is tuple and Ellipsis not in args else [args[0]] * len(value)
        if origin is tuple and len(item_types) != len(value):
            raise ConfigError(f"{key}: expected {len(item_types)} values, got {list(value)}")
        out = [coerce(v, t, key) for v, t in zip(value, item_types)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")

def set_keys(cfg: Config, values: Mapping[str, Any]) -> Config:
    """A copy of ``cfg`` with ``{dotted key: value}`` set, each value coerced to its key's declared type."""
    cfg = _copy(cfg)
    for key, value in values.items():
        owner, attr, tp = _field(cfg, key)
        setattr(owner, attr, coerce(value, tp, key))
    return cfg


def _copy(cfg: Config) -> Config:
    return Config(
        name=cfg.name,
        **{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "name"},
    )


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                if isinstance(v2, Mapping):
                    raise ConfigError(f"config key {k}.{k2} is nested too deeply; valid keys: "
                                      f"{', '.join(valid_keys())}")
                out[f"{k}.{k2}"] = v2
        else:
            out[k] = v
    return out


def per_rank_batch(global_batch: int, world_size: int, key: str = "train.batch_size") -> int:
    """Batch sizes are global; each rank takes ``global / world``. It must divide."""
    if global_batch % world_size:
        raise ConfigError(f"{key}={global_batch} is a global batch and must divide by the world size "
                          f"({world_size}); choose a multiple of {world_size} or change --nproc_per_node")
    return global_batch // world_size

