"""The lists a config's data has: labeled, unlabeled, val and the optional test list, computed once, in memory.

:func:`split_lists` is the one place that decides them; it returns a :class:`SplitLists` that training, the
dataset builders and evaluation take (``eval_pairs`` is a shortcut to its val or test list). Where the training
lists come from, in this order:

1. ``data.split_dir``: a folder of ``{n}_train_supervised.txt`` / ``{n}_train_unsupervised.txt`` lists (e.g. the
   ``dataloaders/voc_splits0`` folder of a clone of the official repository), and its ``val.txt`` if it has one;
2. ``data.datalist = k`` (VOC, Cityscapes): the paper's lists shipped in the package (:mod:`cacnb.data.official`);
3. ``data.datalist = null``: a seeded, disjoint split of the training ids (``data.split_seed``). Synthetic data
   always takes this path.

val is ``data.split_dir``'s ``val.txt`` if it has one, the shipped one of ``data.datalist``, else the dataset's
own; test (reporting only) is ``data.split_dir``'s ``test.txt`` if it has one, else the dataset's own
``ImageSets/Segmentation/test.txt``, else there is none (and asking for it is an error saying why).

Nothing is ever written into the dataset folder, so a read-only (shared) copy of a dataset just works; training
records the exact lists it used in its run dir (:func:`record_splits`). The line format is :mod:`.lines`'s.

Paths in the config are taken as they are: they were made absolute where the config was loaded
(:func:`cacnb.config.load_config`).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..config import dataset_layout
from . import official
from .errors import DatasetError, with_readme
from .lines import (Pair, cityscapes_pair, format_line, pair_id, pair_paths, parse_line, read_split, voc_pair,
                    voc_pairs, write_split)

# re-exported: the line format is also read through this module
__all__ = ["Pair", "cityscapes_pair", "format_line", "pair_id", "pair_paths", "parse_line", "read_split",
           "voc_pair", "voc_pairs", "write_split"]

VOC_TRAIN_LIST = "ImageSets/Segmentation/train_aug.txt"
VOC_VAL_LIST = "ImageSets/Segmentation/val.txt"
VOC_TEST_LIST = "ImageSets/Segmentation/test.txt"  # optional: a held-out test split (reporting only)
EVAL_SPLITS = ("val", "test")
ROLES = ("labeled", "unlabeled", "val")
RECORD_SUBDIR = "splits"  # <run dir>/splits/{labeled,unlabeled,val}.txt: the lists a run trained with


class SplitLists:
    """Every list of a config's data, each computed on first use and then kept: ``labeled``, ``unlabeled``,
    ``val`` (selection) and ``test`` (reporting only; None where the dataset has none, ``test_problem`` then says
    why), and ``sources`` (role -> a file, or how the list was drawn, for messages and records). The split rule
    lives here and nowhere else; evaluating val alone never needs the training lists. Iterating yields
    ``labeled, unlabeled, val``: the lists a training run reads and records."""

    def __init__(self, data_cfg):
        self.cfg = data_config(data_cfg)

    # -- the rule ------------------------------------------------------------------------------------------------
    @functools.cached_property
    def _official(self) -> tuple[list[Pair], list[Pair], list[Pair]]:
        """The shipped lists of ``data.datalist`` for ``data.n_labeled``: labeled, unlabeled, val."""
        try:
            return official.split_pairs(self.cfg.dataset, self.cfg.datalist, self.cfg.n_labeled)
        except ValueError as e:
            raise DatasetError(str(e)) from None

    @functools.cached_property
    def _train(self) -> tuple[list[Pair], list[Pair], str, str]:
        """labeled, unlabeled and their sources: data.split_dir's lists, the shipped ones, or a seeded split."""
        cfg = self.cfg
        if cfg.split_dir:
            files = _given_train_files(cfg)
            return (read_split(files["labeled"]), read_split(files["unlabeled"]), str(files["labeled"]),
                    str(files["unlabeled"]))
        if cfg.datalist is not None:
            prefix = f"{cfg.dataset} datalist {cfg.datalist}"
            labeled, unlabeled, _ = self._official
            return labeled, unlabeled, f"{prefix}, {cfg.n_labeled} labeled", f"{prefix}, unlabeled"
        labeled, unlabeled = make_splits(train_pairs(cfg), cfg.n_labeled, cfg.split_seed)
        drawn = f"{cfg.data_dir}: seeded split (data.split_seed={cfg.split_seed}, data.n_labeled={cfg.n_labeled})"
        return labeled, unlabeled, drawn, drawn

    @functools.cached_property
    def _val(self) -> tuple[list[Pair], str]:
        """data.split_dir's val.txt if there is one, the shipped one of data.datalist, else the dataset's own."""
        cfg = self.cfg
        given = given_files(cfg)["val"] if cfg.split_dir else None
        if given is not None and given.is_file():
            return read_split(given), str(given)
        if not cfg.split_dir and cfg.datalist is not None:
            return self._official[2], f"{cfg.dataset} datalist {cfg.datalist}, val"
        return val_pairs(cfg), f"{cfg.data_dir}: the dataset's val list"

    @functools.cached_property
    def _test(self) -> tuple[Optional[list[Pair]], str]:
        """data.split_dir's test.txt if there is one, else the dataset's own; ``(None, why)`` without either.
        ``data.test_max_images`` keeps its first N images (make demo's quick test)."""
        cfg = self.cfg
        given = Path(cfg.split_dir) / "test.txt" if cfg.split_dir else None
        if given is not None and given.is_file():
            pairs, source = read_split(given), str(given)
        else:
            try:
                pairs, source = test_pairs(cfg), f"{cfg.data_dir}: the dataset's test list"
            except DatasetError as e:
                return None, str(e)
        cap = cfg.test_max_images
        if cap is not None and cap < len(pairs):
            return pairs[:cap], f"{source}, its first {cap} of {len(pairs)} images (data.test_max_images)"
        return pairs, source

    # -- the lists -----------------------------------------------------------------------------------------------
    labeled = property(lambda self: self._train[0])
    unlabeled = property(lambda self: self._train[1])
    val = property(lambda self: self._val[0])
    test = property(lambda self: self._test[0])
    test_problem = property(lambda self: None if self._test[0] is not None else self._test[1])

    @property
    def sources(self) -> dict[str, str]:
        out = {"labeled": self._train[2], "unlabeled": self._train[3], "val": self._val[1]}
        return {**out, "test": self._test[1]} if self.test is not None else out

    def __iter__(self) -> Iterator[list[Pair]]:
        return iter((self.labeled, self.unlabeled, self.val))

    def __eq__(self, other) -> bool:
        return isinstance(other, SplitLists) and list(self) == list(other) and self.sources == other.sources

    def items(self) -> Iterator[tuple[str, list[Pair]]]:
        """``(role, pairs)`` for the roles of :data:`ROLES`."""
        return zip(ROLES, self)

    def eval_split(self, split: str) -> tuple[list[Pair], str]:
        """``(pairs, source)`` of ``val`` (selection) or ``test`` (reporting only); a DatasetError saying why when
        there is no test list."""
        if split not in EVAL_SPLITS:
            raise DatasetError(f"split must be one of {list(EVAL_SPLITS)}, got {split!r}")
        if split == "val":
            return self._val
        if self.test is None:
            raise DatasetError(self._test[1])
        return self._test


def split_lists(data_cfg) -> SplitLists:
    """The :class:`SplitLists` of ``data_cfg`` (a DataConfig or a full Config)."""
    return SplitLists(data_cfg)


def eval_pairs(data_cfg, split: str = "val") -> tuple[list[Pair], str]:
    """``(pairs, source)`` of an evaluation split of ``data_cfg`` (:meth:`SplitLists.eval_split`)."""
    return SplitLists(data_cfg).eval_split(split)


def record_splits(lists: SplitLists, run_dir: "str | os.PathLike") -> dict[str, Path]:
    """Write the exact lists of a run to ``<run_dir>/splits/<role>.txt`` (atomically, in the line format, headed
    by a ``#`` comment naming the source), so every run documents its split. Returns ``{role: file}``."""
    folder = Path(run_dir) / RECORD_SUBDIR
    return {role: write_split(folder / f"{role}.txt", pairs, comment=lists.sources[role])
            for role, pairs in lists.items()}


def split_names(n_labeled: int) -> tuple[str, str]:
    return f"{n_labeled}_train_supervised.txt", f"{n_labeled}_train_unsupervised.txt"


def given_files(data_cfg) -> dict[str, Path]:
    """``{role: file}`` of the lists ``data.split_dir`` provides for ``data.n_labeled`` (val.txt is optional); a
    DatasetError when the folder does not exist."""
    cfg = data_config(data_cfg)
    folder = Path(cfg.split_dir)
    if not folder.is_dir():
        raise DatasetError(with_readme(f"data.split_dir={cfg.split_dir!r} does not exist"))
    return dict(zip(ROLES, (*(folder / name for name in split_names(cfg.n_labeled)), folder / "val.txt")))


def _given_train_files(cfg) -> dict[str, Path]:
    """data.split_dir's labeled and unlabeled lists for data.n_labeled; a DatasetError naming the sizes it has
    when they are missing."""
    files = given_files(cfg)
    missing = [files[role].name for role in ("labeled", "unlabeled") if not files[role].is_file()]
    if missing:
        split_dir = files["val"].parent
        have = sorted(p.name.split("_")[0] for p in split_dir.glob("*_train_supervised.txt"))
        raise DatasetError(with_readme(
            f"{split_dir} has no {' / '.join(missing)} for data.n_labeled={cfg.n_labeled}. "
            f"Lists there are for n_labeled in {have or 'none'}; set data.n_labeled to one of them."))
    return files


# ---------------------------------------------------------------------------------------------------------------
# drawing a split


def make_splits(ids: Sequence, n_labeled: int, seed: int) -> tuple[list, list]:
    """Seeded disjoint (labeled, unlabeled) partition of ``ids``; both keep the input order."""
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise DatasetError("the training list holds duplicate entries; a labeled/unlabeled split would overlap")
    if n_labeled < 1:
        raise DatasetError(f"data.n_labeled must be >= 1, got {n_labeled}")
    if n_labeled >= len(ids):
        raise DatasetError(f"data.n_labeled={n_labeled} but the training set has only {len(ids)} images, which "
                           f"would leave no unlabeled images. Choose n_labeled < {len(ids)} (or generate a larger "
                           f"synthetic set with num_train > {n_labeled}).")
    chosen = np.zeros(len(ids), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(ids))[:n_labeled]] = True
    return [i for i, c in zip(ids, chosen) if c], [i for i, c in zip(ids, chosen) if not c]


def data_config(data_cfg):
    """The DataConfig of ``data_cfg``: a DataConfig, or a full Config."""
    return getattr(data_cfg, "data", data_cfg)


def find_voc_root(data_dir: Path) -> "Path | None":
    """The folder holding ``JPEGImages`` under ``data_dir`` (``VOCdevkit/VOC2012``, ``VOC2012`` or itself)."""
    for candidate in (data_dir / "VOCdevkit" / "VOC2012", data_dir / "VOC2012", data_dir):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return None


def dataset_root(data_cfg) -> Path:
    """The folder that list paths are relative to: VOC2012 (VOC, synthetic) or the Cityscapes root."""
    cfg = data_config(data_cfg)
    data_dir = Path(cfg.data_dir)
    if not data_dir.is_dir():
        hint = (" Write it with `python -m cacnb.data.synthetic --root DIR` (or notebook 00)."
                if cfg.dataset == "synthetic" else "")
        raise DatasetError(with_readme(f"data.data_dir={cfg.data_dir!r} does not exist.{hint}"))
    if dataset_layout(cfg.dataset) == "cityscapes":
        missing = [d for d in ("leftImg8bit", "gtFine") if not (data_dir / d).is_dir()]
        if missing:
            raise DatasetError(with_readme(f"{data_dir} is not a Cityscapes root: missing {', '.join(missing)}/ "
                                           f"(expected leftImg8bit/ and gtFine/ side by side)"))
        return data_dir
    root = find_voc_root(data_dir)
    if root is None:
        raise DatasetError(with_readme(f"no JPEGImages/ under {data_dir} (looked for VOCdevkit/VOC2012/JPEGImages, "
                                       f"VOC2012/JPEGImages and JPEGImages)"))
    return root


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc_val_ids(root: Path) -> list[str]:
    path = root / VOC_VAL_LIST
    if not path.is_file():
        raise DatasetError(with_readme(f"{path} is missing; it lists the validation ids (part of the VOC 2012 "
                                       f"trainval archive)"))
    return _read_ids(path)


def voc_train_ids(root: Path) -> list[str]:
    """``train_aug.txt`` if present; else every SegmentationClassAug label with an image, minus the val ids."""
    path = root / VOC_TRAIN_LIST
    if path.is_file():
        return _read_ids(path)
    labels = root / "SegmentationClassAug"
    if not labels.is_dir():
        raise DatasetError(with_readme(f"neither {path} nor {labels}/ exists, so there is no training list"))
    held_out = set(voc_val_ids(root)) | (set(_read_ids(root / VOC_TEST_LIST)) if voc_has_test(root) else set())
    return sorted(p.stem for p in labels.glob("*.png")
                  if p.stem not in held_out and (root / "JPEGImages" / f"{p.stem}.jpg").is_file())


def voc_has_test(root: Path) -> bool:
    return (root / VOC_TEST_LIST).is_file()


def voc_test_ids(root: Path) -> list[str]:
    """The ids of the optional ``test.txt``, read exactly as ``val.txt``."""
    path = root / VOC_TEST_LIST
    if not path.is_file():
        raise DatasetError(with_readme(f"{path} is missing, so this dataset has no test split. A synthetic set "
                                       f"gets one when written with data.synthetic_test > 0 (both synthetic "
                                       f"presets ask for one; a set written without it, e.g. by an older cacnb, "
                                       f"is rewritten with `python -m cacnb.data.synthetic --root <its data_dir> "
                                       f"--num-test N --force`); for VOC, evaluate on val (--split val) or list "
                                       f"held-out ids there, one per line as in val.txt."))
    return _read_ids(path)


def cityscapes_pairs(root: Path, subset: str) -> list[Pair]:
    """Pairs of ``leftImg8bit/<subset>/<city>/*_leftImg8bit.png``, sorted."""
    folder = root / "leftImg8bit" / subset
    if not folder.is_dir():
        raise DatasetError(with_readme(f"{folder} is missing (unpack leftImg8bit_trainvaltest.zip into {root})"))
    images = sorted(folder.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DatasetError(with_readme(f"{folder} holds no <city>/*_leftImg8bit.png images"))
    return [cityscapes_pair("/" + p.relative_to(root).as_posix()) for p in images]


def train_pairs(data_cfg) -> list[Pair]:
    """Every training sample the dataset provides (before the labeled/unlabeled split)."""
    return _subset_pairs(data_cfg, "train")


def val_pairs(data_cfg) -> list[Pair]:
    return _subset_pairs(data_cfg, "val")


def test_pairs(data_cfg) -> list[Pair]:
    return _subset_pairs(data_cfg, "test")


def _subset_pairs(data_cfg, subset: str) -> list[Pair]:
    cfg = data_config(data_cfg)
    root = dataset_root(cfg)
    if dataset_layout(cfg.dataset) == "cityscapes":
        if subset == "test":  # the official test labels are withheld (all ignore)
            raise DatasetError(with_readme("Cityscapes test labels are not public: evaluate on val, or put a "
                                           "test.txt list of labelled images into data.split_dir"))
        return cityscapes_pairs(root, subset)
    ids = {"train": voc_train_ids, "val": voc_val_ids, "test": voc_test_ids}[subset](root)
    return voc_pairs(ids)
