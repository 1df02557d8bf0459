"""Datasets and loaders built from a :class:`cacnb.config.DataConfig` (or a full Config).

* ``build_labeled_dataset(cfg)``: labeled training crops (official recipe)
* ``build_pair_dataset(cfg)``: overlapping crop pairs of the unlabeled images (CAC)
* ``build_val_dataset(cfg)``: whole validation images
* ``build_eval_dataset(cfg, split)``: whole images of ``val`` or (where the dataset has one) ``test``
* ``make_train_loader(dataset, batch_size, seed=, rank=, world_size=, num_workers=, start=)``: endless loader

Split lists come from :mod:`cacnb.data.splits`; the synthetic set is read by the VOC reader.
"""
from __future__ import annotations

from .cityscapes import CityscapesFiles
from .pairs import PairDataset, sample_pair_windows
from .sampling import InfiniteSampler, make_train_loader
from .transforms import MEAN, STD, denormalize
from .voc import LabeledDataset, SegFiles

__all__ = ["build_labeled_dataset", "build_pair_dataset", "build_val_dataset", "build_eval_dataset",
           "make_train_loader",
           "InfiniteSampler", "PairDataset", "LabeledDataset", "SegFiles", "CityscapesFiles",
           "sample_pair_windows", "MEAN", "STD", "denormalize"]


def _cfg(data_cfg):
    return getattr(data_cfg, "data", data_cfg)  # a DataConfig or a full Config


def _files(cfg, *which: str) -> SegFiles:
    """The files of the named split lists (``labeled``, ``unlabeled``, ``val``), concatenated in that order."""
    from . import splits

    root = splits.dataset_root(cfg)
    split_files = splits.resolve_splits(cfg)
    pairs = [pair for name in which for pair in splits.read_split(getattr(split_files, name))]
    return _files_type(cfg)(root, pairs, num_classes=cfg.num_classes, ignore_index=cfg.ignore_index)


def _files_type(cfg) -> type:
    return CityscapesFiles if cfg.dataset == "cityscapes" else SegFiles


def build_labeled_dataset(data_cfg, *, all_train: bool = False) -> LabeledDataset:
    """The labeled crops; ``all_train=True`` (``train.mode = "full"``) labels the unlabeled list too."""
    cfg = _cfg(data_cfg)
    which = ("labeled", "unlabeled") if all_train else ("labeled",)
    return LabeledDataset(_files(cfg, *which), train=True, crop_size=cfg.crop_size, base_size=cfg.base_size,
                          scale_range=cfg.scale_range, ignore_index=cfg.ignore_index, color_jitter=cfg.color_jitter)


def build_pair_dataset(data_cfg) -> PairDataset:
    cfg = _cfg(data_cfg)
    return PairDataset(_files(cfg, "unlabeled"), crop_size=cfg.crop_size, base_size=cfg.base_size,
                       scale_range=cfg.pair_scale_range, stride=cfg.stride, iou_bound=cfg.iou_bound,
                       photometric=cfg.photometric, ignore_index=cfg.ignore_index, context=cfg.context)


def build_val_dataset(data_cfg) -> LabeledDataset:
    cfg = _cfg(data_cfg)
    return LabeledDataset(_files(cfg, "val"), train=False, ignore_index=cfg.ignore_index)


def build_eval_dataset(data_cfg, split: str = "val") -> LabeledDataset:
    """Whole images of the ``val`` split (checkpoint selection) or the ``test`` split (reporting only)."""
    from . import splits

    cfg = _cfg(data_cfg)
    if split == "val":
        return build_val_dataset(cfg)
    files = _files_type(cfg)(splits.dataset_root(cfg), splits.read_split(splits.eval_split_file(cfg, split)))
    return LabeledDataset(files, train=False, ignore_index=cfg.ignore_index)
