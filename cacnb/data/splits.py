"""Labeled / unlabeled / val lists in the official CAC line format.

One sample per line, image path then label path, both relative to the dataset root with a leading slash::

    /JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png                         (VOC)
    /leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png \
        /gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png                    (Cityscapes)

Where a run's lists come from, in this order:

1. ``data.split_dir``: a folder of ``{n}_train_supervised.txt`` / ``{n}_train_unsupervised.txt`` lists (e.g. the
   ``dataloaders/voc_splits0`` folder of a clone of the official repository);
2. ``data.datalist = k`` (VOC, Cityscapes): the paper's lists shipped in the package (:mod:`cacnb.data.official`),
   written out in the line format under ``<dataset root>/cacnb_splits/datalist<k>/``;
3. ``data.datalist = null``: a seeded, disjoint split of the training ids (``data.split_seed``), written under
   ``<dataset root>/cacnb_splits/seed<k>/``. Synthetic data always takes this path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from ..paths import atomic_write_text, resolve
from .errors import DatasetError, with_readme

Pair = tuple[str, str]  # (image path, label path), relative to the dataset root, leading slash kept

VOC_TRAIN_LIST = "ImageSets/Segmentation/train_aug.txt"
VOC_VAL_LIST = "ImageSets/Segmentation/val.txt"
VOC_TEST_LIST = "ImageSets/Segmentation/test.txt"  # optional: a held-out test split (reporting only)
EVAL_SPLITS = ("val", "test")
SPLITS_SUBDIR = "cacnb_splits"


class SplitFiles(NamedTuple):
    labeled: Path
    unlabeled: Path
    val: Path


# ---------------------------------------------------------------------------------------------------------------
# line format


def voc_pair(sample_id: str) -> Pair:
    return f"/JPEGImages/{sample_id}.jpg", f"/SegmentationClassAug/{sample_id}.png"


def voc_pairs(ids: Iterable[str]) -> list[Pair]:
    return [voc_pair(i) for i in ids]


def cityscapes_pair(image_rel: str) -> Pair:
    """``/leftImg8bit/train/city/X_leftImg8bit.png`` -> (that, ``/gtFine/train/city/X_gtFine_labelTrainIds.png``)."""
    image_rel = "/" + image_rel.lstrip("/")
    if not image_rel.startswith("/leftImg8bit/") or not image_rel.endswith("_leftImg8bit.png"):
        raise ValueError(f"not a Cityscapes image path: {image_rel!r} (expected /leftImg8bit/<split>/<city>/"
                         f"<name>_leftImg8bit.png)")
    label = image_rel.replace("/leftImg8bit/", "/gtFine/", 1)[: -len("_leftImg8bit.png")]
    return image_rel, label + "_gtFine_labelTrainIds.png"


def format_line(pair: Pair) -> str:
    return f"{pair[0]} {pair[1]}"


def parse_line(line: str) -> Pair:
    """A list line -> pair. Also accepts a bare VOC id (``ImageSets`` style) or an image path alone."""
    parts = line.split()
    if len(parts) == 2:
        return "/" + parts[0].lstrip("/"), "/" + parts[1].lstrip("/")
    if len(parts) != 1:
        raise ValueError(f"expected 'image_path label_path', got {line.strip()!r}")
    token = parts[0]
    if "leftImg8bit" in token:
        return cityscapes_pair(token)
    if "/" not in token and "." not in token:
        return voc_pair(token)
    if "JPEGImages/" in token and token.endswith(".jpg"):
        return voc_pair(Path(token).stem)
    raise ValueError(f"cannot tell the label path for {token!r}; write 'image_path label_path'")


def pair_paths(root: "str | os.PathLike", pair: Pair) -> tuple[Path, Path]:
    """Absolute (image, label) paths of a list entry under the dataset root."""
    root = Path(root)
    return root / pair[0].lstrip("/"), root / pair[1].lstrip("/")


def pair_id(pair: Pair) -> str:
    """A short id for messages and plots: the image file's stem (``_leftImg8bit`` dropped)."""
    return Path(pair[0]).stem.removesuffix("_leftImg8bit")


def read_split(path: "str | os.PathLike") -> list[Pair]:
    """Read a list file; errors name the file (and line) and say what to do."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(with_readme(f"split list {path} does not exist. Check data.split_dir / data.data_dir, "
                                       f"or leave data.split_dir unset to generate the lists."))
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            pairs.append(parse_line(line))
        except ValueError as e:
            raise DatasetError(with_readme(f"{path}, line {number}: {e}")) from None
    if not pairs:
        raise DatasetError(with_readme(f"split list {path} is empty"))
    return pairs


def write_split(path: "str | os.PathLike", pairs: Iterable[Pair]) -> Path:
    """Write pairs one per line, atomically (temporary file + rename)."""
    path = Path(path)
    atomic_write_text(path, "".join(format_line(p) + "\n" for p in pairs))
    return path


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


# ---------------------------------------------------------------------------------------------------------------
# dataset roots and the lists a dataset provides


def _data_cfg(data_cfg):
    """Accept a DataConfig or a full Config."""
    return getattr(data_cfg, "data", data_cfg)


def _kind(dataset: str) -> str:
    return "cityscapes" if dataset == "cityscapes" else "voc"


def find_voc_root(data_dir: Path) -> "Path | None":
    """The folder holding ``JPEGImages`` under ``data_dir`` (``VOCdevkit/VOC2012``, ``VOC2012`` or itself)."""
    for candidate in (data_dir / "VOCdevkit" / "VOC2012", data_dir / "VOC2012", data_dir):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return None


def dataset_root(data_cfg) -> Path:
    """The folder that list paths are relative to: VOC2012 (VOC, synthetic) or the Cityscapes root."""
    cfg = _data_cfg(data_cfg)
    data_dir = resolve(cfg.data_dir)
    if not data_dir.is_dir():
        hint = (" Write it with `python -m cacnb.data.synthetic --root DIR` (or notebook 00)."
                if cfg.dataset == "synthetic" else "")
        raise DatasetError(with_readme(f"data.data_dir={cfg.data_dir!r} does not exist (looked at {data_dir}).{hint}"))
    if _kind(cfg.dataset) == "cityscapes":
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
        raise DatasetError(with_readme(f"{path} is missing, so this dataset has no test split. The synthetic "
                                       f"generators write one; for VOC, evaluate on val (--split val) or list "
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
    cfg = _data_cfg(data_cfg)
    root = dataset_root(cfg)
    if _kind(cfg.dataset) == "cityscapes":
        if subset == "test":  # the official test labels are withheld (all ignore)
            raise DatasetError(with_readme("Cityscapes test labels are not public: evaluate on val, or put a "
                                           "test.txt list of labelled images into data.split_dir"))
        return cityscapes_pairs(root, subset)
    ids = {"train": voc_train_ids, "val": voc_val_ids, "test": voc_test_ids}[subset](root)
    return voc_pairs(ids)


def eval_split_file(data_cfg, split: str = "val") -> Path:
    """The list file of an evaluation split: ``val`` (selection) or ``test`` (reporting only).

    ``val`` is :func:`resolve_splits`'s. ``test`` is ``<data.split_dir>/test.txt`` when that exists, else the
    dataset's own ``ImageSets/Segmentation/test.txt`` copied (once) into the generated split folder.
    """
    if split not in EVAL_SPLITS:
        raise DatasetError(f"split must be one of {list(EVAL_SPLITS)}, got {split!r}")
    cfg = _data_cfg(data_cfg)
    if split == "val":
        return resolve_splits(cfg).val
    if cfg.split_dir and (resolve(cfg.split_dir) / "test.txt").is_file():
        return resolve(cfg.split_dir) / "test.txt"
    path = generated_split_dir(cfg) / "test.txt"
    if not path.is_file():
        _write_generated(path, test_pairs(cfg))
    return path


# ---------------------------------------------------------------------------------------------------------------
# the three files a run reads


def split_names(n_labeled: int) -> tuple[str, str]:
    return f"{n_labeled}_train_supervised.txt", f"{n_labeled}_train_unsupervised.txt"


def generated_split_dir(data_cfg) -> Path:
    cfg = _data_cfg(data_cfg)
    return dataset_root(cfg) / SPLITS_SUBDIR / f"seed{cfg.split_seed}"


def resolve_splits(data_cfg) -> SplitFiles:
    """The labeled, unlabeled and val list files of a run, generating (seeded, disjoint) ones when needed.

    With ``data.split_dir`` set, ``{n}_train_supervised.txt`` and ``{n}_train_unsupervised.txt`` are taken from
    there, and ``val.txt`` too if it is there. Anything not given is written (once; reused afterwards) into
    ``<dataset root>/cacnb_splits/seed<split_seed>/``. The files are deterministic, so ranks that race to write
    them write the same bytes, each by atomic rename.
    """
    cfg = _data_cfg(data_cfg)
    labeled_name, unlabeled_name = split_names(cfg.n_labeled)
    if cfg.split_dir:
        given = _given_splits(cfg, labeled_name, unlabeled_name)
        if given.val.is_file():
            return given
        return given._replace(val=_ensure_val(cfg))
    if getattr(cfg, "datalist", None) is not None:
        return _official_split_files(cfg, labeled_name, unlabeled_name)
    out = generated_split_dir(cfg)
    files = SplitFiles(out / labeled_name, out / unlabeled_name, out / "val.txt")
    if not (files.labeled.is_file() and files.unlabeled.is_file()):
        labeled, unlabeled = make_splits(train_pairs(cfg), cfg.n_labeled, cfg.split_seed)
        _write_generated(files.unlabeled, unlabeled)
        _write_generated(files.labeled, labeled)
    _ensure_val(cfg)
    return files


def official_split_dir(data_cfg) -> Path:
    cfg = _data_cfg(data_cfg)
    return dataset_root(cfg) / SPLITS_SUBDIR / f"datalist{cfg.datalist}"


def _official_split_files(cfg, labeled_name: str, unlabeled_name: str) -> SplitFiles:
    """The shipped lists of ``data.datalist`` for ``data.n_labeled``, written (once) in the line format."""
    from . import official  # lazy: official imports this module for the line format

    out = official_split_dir(cfg)
    files = SplitFiles(out / labeled_name, out / unlabeled_name, out / "val.txt")
    if not all(f.is_file() for f in files):
        try:
            labeled, unlabeled, val = official.split_pairs(cfg.dataset, cfg.datalist, cfg.n_labeled)
        except ValueError as e:
            raise DatasetError(str(e)) from None
        for path, pairs in zip(files, (labeled, unlabeled, val)):
            _write_generated(path, pairs)
    return files


def _given_splits(cfg, labeled_name: str, unlabeled_name: str) -> SplitFiles:
    split_dir = resolve(cfg.split_dir)
    if not split_dir.is_dir():
        raise DatasetError(with_readme(f"data.split_dir={cfg.split_dir!r} does not exist (looked at {split_dir})"))
    files = SplitFiles(split_dir / labeled_name, split_dir / unlabeled_name, split_dir / "val.txt")
    missing = [f.name for f in files[:2] if not f.is_file()]
    if missing:
        have = sorted(p.name.split("_")[0] for p in split_dir.glob("*_train_supervised.txt"))
        raise DatasetError(with_readme(
            f"{split_dir} has no {' / '.join(missing)} for data.n_labeled={cfg.n_labeled}. "
            f"Lists there are for n_labeled in {have or 'none'}; set data.n_labeled to one of them."))
    return files


def _ensure_val(cfg) -> Path:
    path = generated_split_dir(cfg) / "val.txt"
    if not path.is_file():
        _write_generated(path, val_pairs(cfg))
    return path


def _write_generated(path: Path, pairs: Sequence[Pair]) -> None:
    try:
        write_split(path, pairs)
    except PermissionError:
        raise DatasetError(with_readme(
            f"cannot write the split list {path} (permission denied). Make the dataset folder writable, or "
            f"write the lists elsewhere and pass that folder as data.split_dir.")) from None
