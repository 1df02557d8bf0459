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

from PIL import Image
from tqdm.auto import tqdm

from ..config import dataset_layout
from . import splits
from .errors import DATA_README, DatasetError
from .palette import class_names
from .validate import SampleError, file_problem, label_id_problem, list_problems
from .voc import read_index_png

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
    "symlink_loop": "symlink loops",
    "duplicate_id": "ids listed more than once",
    "labeled_and_unlabeled": "ids both labeled and unlabeled",
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
        data_cfg_or_root: a DataConfig / Config (dataset, data_dir and split_dir are taken from it), or a folder
            (absolute, or relative to the working directory):
            for VOC the one holding ``VOCdevkit/VOC2012`` (or ``VOC2012`` itself), for Cityscapes the one holding
            ``leftImg8bit/`` and ``gtFine/``.
        dataset: synthetic | voc | cityscapes; default: the config's, or "voc" for a folder.
        max_files: open only the first ``max_files`` samples (the lists are always checked in full).
        progress: show a tqdm bar.
    """
    cfg = splits.data_config(data_cfg_or_root)
    split_dir = None
    if hasattr(cfg, "data_dir"):
        dataset = dataset or cfg.dataset
        data_dir, split_dir = cfg.data_dir, cfg.split_dir
    else:
        data_dir = data_cfg_or_root
    dataset = dataset or "voc"
    layout = dataset_layout(dataset)  # a ValueError for an unknown dataset
    folder = Path(data_dir)
    report = PreflightReport(root=str(folder), dataset=dataset)
    if not folder.is_dir():
        hint = " (write it with `python -m cacnb.data.synthetic --root DIR`)" if dataset == "synthetic" else ""
        report.add("missing_dir", folder, f"data_dir {str(data_dir)!r} does not exist{hint}")
        return report
    if layout == "cityscapes":
        samples = _cityscapes_samples(folder, report)
    else:
        samples = _voc_samples(folder, report)
    if split_dir:
        _check_split_dir(cfg, report)
    if hasattr(cfg, "data_dir"):
        check_split_ids(cfg, Path(report.root), report)
    report.listed = len(samples)
    todo = samples if max_files is None else samples[:max_files]
    num_classes = getattr(cfg, "num_classes", len(class_names(dataset)))
    _check_files(todo, (num_classes, getattr(cfg, "ignore_index", IGNORE)), report, progress)
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
    ids, lists = [], {}
    for name in (splits.VOC_TRAIN_LIST, splits.VOC_VAL_LIST):
        path = root / name
        if not path.is_file():
            if name == splits.VOC_TRAIN_LIST:
                report.warnings.append(f"{path} is missing; the training list will be every "
                                       f"SegmentationClassAug label not in val.txt")
            else:
                report.add("missing_list", path, "the validation list is required")
            continue
        lists[Path(name).stem] = (path, _read_list_ids(path, report))
        ids += lists[Path(name).stem][1]
    _add_all(report, list_problems(lists))
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


def _check_split_dir(cfg, report: PreflightReport) -> None:
    """The labeled and unlabeled lists ``data.split_dir`` must hold, read as training reads them."""
    if not Path(cfg.split_dir).is_dir():
        report.add("missing_list", cfg.split_dir, "data.split_dir does not exist")
        return
    lists = {}
    for role, path in splits.given_files(cfg).items():
        if role == "val":  # optional: the dataset's own val list stands in
            continue
        if not path.is_file():
            report.add("missing_list", path, f"needed for data.n_labeled={cfg.n_labeled}")
            continue
        try:
            lists[role] = (path, [splits.pair_id(p) for p in splits.read_split(path)])
        except DatasetError as e:
            report.add("missing_list", path, str(e).splitlines()[0])
    _add_all(report, list_problems(lists))


def _add_all(report: PreflightReport, problems) -> None:
    for p in problems:
        report.add(p.kind, p.path, p.detail)


def chosen_lists(cfg) -> dict[str, list[splits.Pair]]:
    """The lists a run of ``cfg`` will read, by name, when they are given rather than drawn from the files on
    disk: ``data.split_dir``'s, or the shipped lists of ``data.datalist``. {} for generated splits."""
    if cfg.split_dir:
        out = {}
        for path in splits.given_files(cfg).values():
            try:
                out[str(path)] = splits.read_split(path)
            except DatasetError:
                continue  # reported by _check_split_dir (val.txt is optional)
        return out
    if getattr(cfg, "datalist", None) is None:
        return {}
    lists = splits.split_lists(cfg)
    return {lists.sources[role]: pairs for role, pairs in lists.items()}


def check_split_ids(cfg, root: Path, report: PreflightReport) -> None:
    """Report, by id and list, every image or label that a chosen list names and that is not under ``root``."""
    try:
        lists = chosen_lists(cfg)
    except DatasetError as e:  # no official list for this count; the config check says the same
        report.add("missing_list", f"data.datalist={cfg.datalist}", str(e))
        return
    for name, pairs in lists.items():
        for pair in pairs:
            for path in splits.pair_paths(root, pair):
                if not path.is_file():
                    report.add("missing_split_id", path, f"id {splits.pair_id(pair)} of {name}")


# ---------------------------------------------------------------------------------------------------------------
# files


def _check_files(samples, classes: tuple[int, int], report: PreflightReport, progress: bool) -> None:
    """Open every image and label with training's own readers and rules; ``classes`` = (num_classes, ignore)."""
    for image_path, label_path in tqdm(samples, desc="checking dataset", unit="img", disable=not progress):
        report.checked += 1
        missing = [p for p in (file_problem(image_path, "image"), file_problem(label_path, "label")) if p]
        _add_all(report, missing)
        bad = {p.path for p in missing}
        image_size = _image_size(image_path, report) if str(image_path) not in bad else None
        label_size = _check_label(label_path, classes, report) if str(label_path) not in bad else None
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


def _check_label(path: Path, classes: tuple[int, int], report: PreflightReport) -> Optional[tuple[int, int]]:
    """Training's label reader (modes, 16-bit range) and id rule; the size as (W, H) when it could be read."""
    try:
        label = read_index_png(path)  # [H, W] uint8
    except SampleError as e:
        report.add(e.kind, path, str(e).removeprefix(f"label {path}").lstrip(": "))
        return None
    problem = label_id_problem(path, label, *classes)
    if problem is not None:
        report.add(problem.kind, problem.path, problem.detail)
    return label.shape[1], label.shape[0]


def _describe(e: Exception) -> str:
    text = str(e).strip() or e.__class__.__name__
    return f"cannot be decoded ({text})"
