"""Check a dataset before training on it, and report every problem at once.

``check_dataset(cfg.data)`` (or a folder) looks for the expected folders and list files, then opens every listed
image and label (or the first ``max_files``) and reports: images without labels, labels without images, files that
cannot be decoded, labels that are not class-index PNGs or hold unexpected values, and image/label size mismatches.
Each problem names its file. ``report.raise_if_failed()`` turns a failed report into a :class:`DatasetError`
pointing to data_README.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..paths import resolve
from . import official, splits
from .errors import DATA_README, DatasetError

NUM_CLASSES = {"voc": 21, "synthetic": 21, "cityscapes": 19}
IGNORE = 255
_SHOWN_PER_KIND = 20

KIND_TITLES = {
    "missing_dir": "missing data folder",
    "missing_folder": "missing folders",
    "missing_list": "missing or unreadable list files",
    "missing_image": "listed images that do not exist",
    "missing_label": "images without labels",
    "unreadable": "unreadable or corrupt files",
    "bad_mode": "labels that are not class-index images",
    "bad_values": "labels with unexpected values",
    "size_mismatch": "image/label size mismatches",
    "missing_split_id": "ids of the chosen split lists missing on disk",
}


@dataclass
class Problem:
    kind: str          # a key of KIND_TITLES
    path: str          # the offending file or folder
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" if self.detail else self.path


@dataclass
class PreflightReport:
    root: str
    dataset: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: int = 0          # samples whose image and label were opened
    listed: int = 0           # samples in the lists

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, path: "str | os.PathLike", detail: str = "") -> None:
        self.problems.append(Problem(kind, str(path), detail))

    def by_kind(self) -> dict[str, list[Problem]]:
        out: dict[str, list[Problem]] = {}
        for p in self.problems:
            out.setdefault(p.kind, []).append(p)
        return out

    def __str__(self) -> str:
        head = (f"dataset check ({self.dataset}) of {self.root}: checked {self.checked} of {self.listed} listed "
                f"samples; ")
        lines = [head + ("OK" if self.ok else f"{len(self.problems)} problem(s)")]
        lines += [f"  warning: {w}" for w in self.warnings]
        for kind, items in self.by_kind().items():
            lines.append(f"  {KIND_TITLES.get(kind, kind)} ({len(items)}):")
            lines += [f"    {p}" for p in items[:_SHOWN_PER_KIND]]
            if len(items) > _SHOWN_PER_KIND:
                lines.append(f"    ... and {len(items) - _SHOWN_PER_KIND} more (report.problems has them all)")
        if not self.ok:
            lines.append(f"  See {DATA_README} (repository root) for the expected layout and where to get the data.")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise a :class:`DatasetError` listing every problem (and pointing to data_README.md) unless ok."""
        if not self.ok:
            raise DatasetError(str(self))


# ---------------------------------------------------------------------------------------------------------------
# entry point


def check_dataset(data_cfg_or_root, dataset: Optional[str] = None, *, max_files: Optional[int] = None,
                  progress: bool = True) -> PreflightReport:
    """Check a dataset and collect every problem.

    Args:
        data_cfg_or_root: a DataConfig / Config (dataset, data_dir and split_dir are taken from it), or a folder:
            for VOC the one holding ``VOCdevkit/VOC2012`` (or ``VOC2012`` itself), for Cityscapes the one holding
            ``leftImg8bit/`` and ``gtFine/``.
        dataset: synthetic | voc | cityscapes; default: the config's, or "voc" for a folder.
        max_files: open only the first ``max_files`` samples (the lists are always checked in full).
        progress: show a tqdm bar.
    """
    cfg = getattr(data_cfg_or_root, "data", data_cfg_or_root)
    split_dir = None
    if hasattr(cfg, "data_dir"):
        dataset = dataset or cfg.dataset
        data_dir, split_dir = cfg.data_dir, cfg.split_dir
    else:
        data_dir = data_cfg_or_root
    dataset = dataset or "voc"
    if dataset not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(NUM_CLASSES)}")
    folder = resolve(data_dir)
    report = PreflightReport(root=str(folder), dataset=dataset)
    if not folder.is_dir():
        hint = " (write it with `python -m cacnb.data.synthetic --root DIR`)" if dataset == "synthetic" else ""
        report.add("missing_dir", folder, f"data_dir {str(data_dir)!r} does not exist{hint}")
        return report
    if dataset == "cityscapes":
        samples = _cityscapes_samples(folder, report)
    else:
        samples = _voc_samples(folder, report)
    if split_dir:
        _check_split_dir(resolve(split_dir), getattr(cfg, "n_labeled", None), report)
    if hasattr(cfg, "data_dir"):
        check_split_ids(cfg, Path(report.root), report)
    report.listed = len(samples)
    todo = samples if max_files is None else samples[:max_files]
    _check_files(todo, set(range(NUM_CLASSES[dataset])) | {IGNORE}, report, progress)
    return report


# ---------------------------------------------------------------------------------------------------------------
# layout and lists


def _voc_samples(folder: Path, report: PreflightReport) -> list[tuple[Path, Path]]:
    root = splits.find_voc_root(folder)
    if root is None:
        # say which of the expected spots is missing rather than just "not found"
        root = folder / "VOCdevkit" / "VOC2012" if (folder / "VOCdevkit").is_dir() else folder
    report.root = str(root)
    missing = [sub for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation")
               if not (root / sub).is_dir()]
    for sub in missing:
        report.add("missing_folder", root / sub, "expected in the VOC 2012 layout")
    if "ImageSets/Segmentation" in missing:
        return []
    ids = []
    for name in (splits.VOC_TRAIN_LIST, splits.VOC_VAL_LIST):
        path = root / name
        if not path.is_file():
            if name == splits.VOC_TRAIN_LIST:
                report.warnings.append(f"{path} is missing; the training list will be every "
                                       f"SegmentationClassAug label not in val.txt")
            else:
                report.add("missing_list", path, "the validation list is required")
            continue
        ids += _read_list_ids(path, report)
    ids = list(dict.fromkeys(ids))  # unique, in order
    if not (root / splits.VOC_TRAIN_LIST).is_file() and (root / "SegmentationClassAug").is_dir():
        listed = set(ids)  # built once: the glob can yield ~10k labels
        ids += sorted(p.stem for p in (root / "SegmentationClassAug").glob("*.png") if p.stem not in listed)
    return [tuple(splits.pair_paths(root, splits.voc_pair(i))) for i in ids]


def _read_list_ids(path: Path, report: PreflightReport) -> list[str]:
    try:
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        report.add("missing_list", path, f"cannot be read ({e.__class__.__name__})")
        return []
    if not ids:
        report.add("missing_list", path, "is empty")
    return ids


def _cityscapes_samples(folder: Path, report: PreflightReport) -> list[tuple[Path, Path]]:
    samples = []
    for top in ("leftImg8bit", "gtFine"):
        for subset in ("train", "val"):
            if not (folder / top / subset).is_dir():
                report.add("missing_folder", folder / top / subset, "expected in the Cityscapes layout")
    for subset in ("train", "val"):
        images = sorted((folder / "leftImg8bit" / subset).glob("*/*_leftImg8bit.png"))
        if not images and (folder / "leftImg8bit" / subset).is_dir():
            report.add("missing_list", folder / "leftImg8bit" / subset, "holds no <city>/*_leftImg8bit.png")
        for image in images:
            pair = splits.cityscapes_pair("/" + image.relative_to(folder).as_posix())
            samples.append(splits.pair_paths(folder, pair))
    return samples


def _check_split_dir(split_dir: Path, n_labeled: Optional[int], report: PreflightReport) -> None:
    if not split_dir.is_dir():
        report.add("missing_list", split_dir, "data.split_dir does not exist")
        return
    if n_labeled is None:
        return
    for name in splits.split_names(n_labeled):
        path = split_dir / name
        if not path.is_file():
            report.add("missing_list", path, f"needed for data.n_labeled={n_labeled}")
            continue
        try:
            splits.read_split(path)
        except DatasetError as e:
            report.add("missing_list", path, str(e).splitlines()[0])


def chosen_lists(cfg) -> dict[str, list[splits.Pair]]:
    """The lists a run of ``cfg`` will read, by name, when they are given rather than drawn from the files on
    disk: ``data.split_dir``'s, or the shipped lists of ``data.datalist``. {} for generated splits."""
    if cfg.split_dir:
        folder = resolve(cfg.split_dir)
        names = [*splits.split_names(cfg.n_labeled), "val.txt"]
        out = {}
        for name in names:
            try:
                out[str(folder / name)] = splits.read_split(folder / name)
            except DatasetError:
                continue  # reported by _check_split_dir (val.txt is optional)
        return out
    if getattr(cfg, "datalist", None) is None:
        return {}
    labeled, unlabeled, val = official.split_pairs(cfg.dataset, cfg.datalist, cfg.n_labeled)
    prefix = f"{cfg.dataset} datalist {cfg.datalist}"
    return {f"{prefix}, {cfg.n_labeled} labeled": labeled, f"{prefix}, unlabeled": unlabeled,
            f"{prefix}, val": val}


def check_split_ids(cfg, root: Path, report: PreflightReport) -> None:
    """Report, by id and list, every image or label that a chosen list names and that is not under ``root``."""
    try:
        lists = chosen_lists(cfg)
    except ValueError as e:  # no official list for this count; the config check says the same
        report.add("missing_list", f"data.datalist={cfg.datalist}", str(e))
        return
    for name, pairs in lists.items():
        for pair in pairs:
            for path in splits.pair_paths(root, pair):
                if not path.is_file():
                    report.add("missing_split_id", path, f"id {splits.pair_id(pair)} of {name}")


# ---------------------------------------------------------------------------------------------------------------
# files


def _check_files(samples, allowed: set[int], report: PreflightReport, progress: bool) -> None:
    from tqdm.auto import tqdm

    for image_path, label_path in tqdm(samples, desc="checking dataset", unit="img", disable=not progress):
        report.checked += 1
        has_image, has_label = image_path.is_file(), label_path.is_file()
        if not has_image:
            report.add("missing_image", image_path, "listed but not on disk")
        if not has_label:
            report.add("missing_label", label_path, f"no label for {image_path.name}")
        image_size = _image_size(image_path, report) if has_image else None
        label_size = _check_label(label_path, allowed, report) if has_label else None
        if image_size and label_size and image_size != label_size:
            report.add("size_mismatch", label_path, f"label is {label_size[0]}x{label_size[1]} but "
                                                    f"{image_path.name} is {image_size[0]}x{image_size[1]} (WxH)")


def _image_size(path: Path, report: PreflightReport) -> Optional[tuple[int, int]]:
    """Decode the whole image (a truncated JPEG only fails on load); None, with a problem, if it can't be."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as e:  # PIL raises many types for broken files; all mean "unreadable" here
        report.add("unreadable", path, _describe(e))
        return None


def _check_label(path: Path, allowed: set[int], report: PreflightReport) -> Optional[tuple[int, int]]:
    try:
        with Image.open(path) as im:
            im.load()
            size, mode = im.size, im.mode
            values = np.unique(np.asarray(im)) if mode in ("P", "L") else None
    except Exception as e:
        report.add("unreadable", path, _describe(e))
        return None
    if values is None:
        report.add("bad_mode", path, f"mode {mode}: expected an 8-bit class-index PNG (mode P or L), not colours")
        return size
    bad = sorted(set(values.tolist()) - allowed)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        report.add("bad_values", path, f"values {shown} outside 0..{max(allowed - {IGNORE})} and {IGNORE}")
    return size


def _describe(e: Exception) -> str:
    text = str(e).strip() or e.__class__.__name__
    return f"cannot be decoded ({text})"
