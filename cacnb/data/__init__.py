"""Datasets and loaders built from a :class:`cacnb.config.DataConfig` (or a full Config).

* ``build_labeled_dataset(cfg)``: labeled training crops (official recipe)
* ``build_pair_dataset(cfg)``: overlapping crop pairs of the unlabeled images (CAC)
* ``build_val_dataset(cfg)``: whole validation images
* ``build_eval_dataset(cfg, split)``: whole images of ``val`` or (where the dataset has one) ``test``
* ``build_eval_pair_dataset(cfg, split)``: crop pairs of those images, photometric augmentation off (the
  consistency metrics of :mod:`cacnb.consistency`)
* ``make_train_loader(dataset, batch_size, seed=, rank=, world_size=, num_workers=, start=)``: endless loader

Split lists come from :mod:`cacnb.data.splits` (computed in memory: building a dataset never writes into the
dataset folder); the synthetic set is read by the VOC reader.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..config import dataset_layout
from .cityscapes import CityscapesFiles
from .pairs import PairDataset, sample_pair_windows
from .sampling import InfiniteSampler, make_train_loader
from .splits import Pair, SplitLists, data_config, dataset_root, split_lists
from .transforms import MEAN, STD, denormalize
from .voc import LabeledDataset, SegFiles

__all__ = ["build_labeled_dataset", "build_pair_dataset", "build_val_dataset", "build_eval_dataset",
           "build_eval_pair_dataset",
           "make_train_loader",
           "InfiniteSampler", "PairDataset", "LabeledDataset", "SegFiles", "CityscapesFiles",
           "sample_pair_windows", "MEAN", "STD", "denormalize"]


def build_labeled_dataset(data_cfg, *, all_train: bool = False,
                          lists: Optional[SplitLists] = None) -> LabeledDataset:
    """The labeled crops; ``all_train=True`` (``train.mode = "full"``) labels the unlabeled list too.

    ``data_cfg`` is a DataConfig or a full Config. ``lists``: the run's :func:`~cacnb.data.splits.split_lists`,
    when the caller already has them (training computes them once, records them and passes them to every
    builder); by default they are computed here."""
    cfg = data_config(data_cfg)
    lists = split_lists(cfg) if lists is None else lists
    pairs = lists.labeled + lists.unlabeled if all_train else lists.labeled
    return LabeledDataset(_files(cfg, pairs), train=True, crop_size=cfg.crop_size, base_size=cfg.base_size,
                          scale_range=cfg.scale_range, ignore_index=cfg.ignore_index, color_jitter=cfg.color_jitter)


def build_pair_dataset(data_cfg, *, lists: Optional[SplitLists] = None) -> PairDataset:
    """Overlapping crop pairs of the unlabeled list (``lists`` as for :func:`build_labeled_dataset`)."""
    cfg = data_config(data_cfg)
    unlabeled = (split_lists(cfg) if lists is None else lists).unlabeled
    return PairDataset(_files(cfg, unlabeled), crop_size=cfg.crop_size,
                       base_size=cfg.base_size, scale_range=cfg.pair_scale_range, stride=cfg.stride,
                       iou_bound=cfg.iou_bound, photometric=cfg.photometric, ignore_index=cfg.ignore_index,
                       context=cfg.context)


def build_val_dataset(data_cfg, *, lists: Optional[SplitLists] = None) -> LabeledDataset:
    return build_eval_dataset(data_cfg, "val", lists=lists)


def build_eval_dataset(data_cfg, split: str = "val", *, lists: Optional[SplitLists] = None) -> LabeledDataset:
    """Whole images of the ``val`` split (checkpoint selection) or the ``test`` split (reporting only)."""
    cfg = data_config(data_cfg)
    pairs = (split_lists(cfg) if lists is None else lists).eval_split(split)[0]
    return LabeledDataset(_files(cfg, pairs), train=False, ignore_index=cfg.ignore_index)


def build_eval_pair_dataset(data_cfg, split: str = "test", *, lists: Optional[SplitLists] = None) -> PairDataset:
    """Crop pairs of the ``split`` images as the pair sampler draws them in training (same crop, scale range,
    stride and IoU bound), with photometric augmentation off, so that the two crops of a pair hold identical
    pixels in their overlap. The two crops always come from two windows, whatever ``data.context`` says: these
    pairs measure cross-context consistency, and a run trained without context (``data.context=false``, both
    crops from one window) must be measured on the same two-context pairs as every other run."""
    cfg = data_config(data_cfg)
    pairs = (split_lists(cfg) if lists is None else lists).eval_split(split)[0]
    return PairDataset(_files(cfg, pairs), crop_size=cfg.crop_size, base_size=cfg.base_size,
                       scale_range=cfg.pair_scale_range, stride=cfg.stride, iou_bound=cfg.iou_bound,
                       photometric=False, ignore_index=cfg.ignore_index, context=True)


def _files(cfg, pairs: Sequence[Pair]) -> SegFiles:
    return _files_type(cfg)(dataset_root(cfg), pairs, num_classes=cfg.num_classes, ignore_index=cfg.ignore_index)


def _files_type(cfg) -> type:
    return CityscapesFiles if dataset_layout(cfg.dataset) == "cityscapes" else SegFiles
