"""Datasets and loaders built from a :class:`cacnb.config.DataConfig` (or a full Config).

* ``build_labeled_dataset(cfg)``: labeled training crops (official recipe)
* ``build_pair_dataset(cfg)``: overlapping crop pairs of the unlabeled images (CAC)
* ``build_val_dataset(cfg)``: whole validation images
* ``make_train_loader(dataset, batch_size, seed=, rank=, world_size=, num_workers=, start=)``: endless loader

Split lists come from :mod:`cacnb.data.splits`; the synthetic set is read by the VOC reader.
"""
from __future__ import annotations

from .cityscapes import CityscapesFiles
from .pairs import PairDataset, sample_pair_windows
from .sampling import InfiniteSampler, make_train_loader
from .transforms import MEAN, STD, denormalize
from .voc import LabeledDataset, SegFiles

__all__ = ["build_labeled_dataset", "build_pair_dataset", "build_val_dataset", "make_train_loader",
           "InfiniteSampler", "PairDataset", "LabeledDataset", "SegFiles", "CityscapesFiles",
           "sample_pair_windows", "MEAN", "STD", "denormalize"]


def _cfg(data_cfg):
    return getattr(data_cfg, "data", data_cfg)  # a DataConfig or a full Config


def _files(cfg, which: str) -> SegFiles:
    from . import splits

    root = splits.dataset_root(cfg)
    split_files = splits.resolve_splits(cfg)
    pairs = splits.read_split(getattr(split_files, which))
    files_type = CityscapesFiles if cfg.dataset == "cityscapes" else SegFiles
    return files_type(root, pairs, num_classes=cfg.num_classes, ignore_index=cfg.ignore_index)


def build_labeled_dataset(data_cfg) -> LabeledDataset:
    cfg = _cfg(data_cfg)
    return LabeledDataset(_files(cfg, "labeled"), train=True, crop_size=cfg.crop_size, base_size=cfg.base_size,
                          scale_range=cfg.scale_range, ignore_index=cfg.ignore_index, color_jitter=cfg.color_jitter)


def build_pair_dataset(data_cfg) -> PairDataset:
    cfg = _cfg(data_cfg)
    return PairDataset(_files(cfg, "unlabeled"), crop_size=cfg.crop_size, base_size=cfg.base_size,
                       scale_range=cfg.pair_scale_range, stride=cfg.stride, iou_bound=cfg.iou_bound,
                       photometric=cfg.photometric, ignore_index=cfg.ignore_index)


def build_val_dataset(data_cfg) -> LabeledDataset:
    cfg = _cfg(data_cfg)
    return LabeledDataset(_files(cfg, "val"), train=False, ignore_index=cfg.ignore_index)
