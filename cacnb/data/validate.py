"""The dataset rules, in one place: preflight (notebook 00, ``check_dataset``) and training apply exactly these.

* :func:`file_problem`: a listed file is missing, a dangling symlink, a symlink loop, or not a regular file.
* :func:`label_id_problem` / :func:`check_label_ids`: a label holds a class id ``>= num_classes`` that is not the
  ignore label (255); training would crash on it with an IndexError and validation would silently drop it.
* :func:`list_problems` / :func:`check_split_lists`: an id listed twice in one list, or both labeled and unlabeled
  (the split would leak labels into the unlabeled set).

Problems are ``(kind, path, detail)`` triples whose kinds are the preflight report's; training raises the first
as a :class:`SampleError`.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .errors import DatasetError, with_readme
from .lines import pair_id

IGNORE = 255
_SHOWN = 10


class Problem(NamedTuple):
    kind: str      # a key of cacnb.data.preflight.KIND_TITLES
    path: str
    detail: str


class SampleError(DatasetError):
    """One file or list is broken; ``kind`` is the preflight kind of the problem."""

    def __init__(self, message: str, kind: str = "unreadable", path: "str | os.PathLike" = ""):
        super().__init__(message)
        self.kind, self.path = kind, str(path)


# ---------------------------------------------------------------------------------------------------------------
# files


def file_problem(path: "str | os.PathLike", role: str = "image") -> Optional[Problem]:
    """Why ``path`` cannot be opened as a file (None when it is a readable regular file or symlink to one)."""
    path = Path(path)
    kind = "missing_label" if role == "label" else "missing_image"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return Problem(kind, str(path), f"dangling symlink (points to {os.readlink(path)})")
        return Problem(kind, str(path), "listed but not on disk" if role == "image" else "no label for this image")
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Problem("symlink_loop", str(path), "symlink loop (the link points back to itself); "
                                                      "replace it with the file")
        return Problem("unreadable", str(path), f"cannot be opened ({e.strerror or e})")
    if not stat.S_ISREG(mode):
        return Problem("unreadable", str(path), "is not a regular file (a folder or device?)")
    return None


def open_failure(path: "str | os.PathLike", role: str, error: BaseException) -> SampleError:
    """The SampleError for a file PIL could not open: missing / symlink loop when so, else corrupt."""
    found = file_problem(path, role)
    if found is not None and found.kind != "unreadable":
        what = "a split list" if role == "image" else "the split list that names its image"
        where = " (labels live beside the images, e.g. SegmentationClassAug/ for VOC)" if role == "label" else ""
        state = "is a symlink loop" if found.kind == "symlink_loop" else f"is missing ({found.detail})"
        return SampleError(f"{role} {path} {state}. Check data.data_dir and {what}{where}, or remove the entry "
                           f"from the list.", found.kind, path)
    return SampleError(f"{role} {path} is corrupt or not an image ({error}). Re-extract or re-download it, or "
                       f"remove its line from the split list.", "unreadable", path)


# ---------------------------------------------------------------------------------------------------------------
# label ids


def label_id_problem(path: "str | os.PathLike", label: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE) -> Optional[Problem]:
    """A problem when ``label`` holds ids outside ``0..num_classes-1`` other than ``ignore_index``."""
    bad_mask = (label >= num_classes) & (label != ignore_index)  # [H, W]; cheap, no sort on the good path
    if not bad_mask.any():
        return None
    bad = np.unique(label[bad_mask]).tolist()
    shown = ", ".join(map(str, bad[:_SHOWN])) + (" ..." if len(bad) > _SHOWN else "")
    return Problem("bad_values", str(path), f"class ids {shown} outside 0..{num_classes - 1} and {ignore_index} "
                                           f"(ignore); data.num_classes={num_classes}")


def check_label_ids(path: "str | os.PathLike", label: np.ndarray, num_classes: Optional[int],
                    ignore_index: int = IGNORE) -> None:
    """Raise a :class:`SampleError` naming ``path`` and the bad ids (see :func:`label_id_problem`)."""
    if num_classes is None:
        return
    found = label_id_problem(path, label, num_classes, ignore_index)
    if found is not None:
        raise SampleError(f"label {path} holds {found.detail}. Fix the label (or set data.num_classes to the "
                          f"dataset's class count), or remove its line from the split list.", found.kind, path)


# ---------------------------------------------------------------------------------------------------------------
# lists


def list_problems(lists: Mapping[str, tuple["str | os.PathLike", Sequence[str]]]) -> list[Problem]:
    """Duplicates within each list and ids both in ``lists["labeled"]`` and ``lists["unlabeled"]``.

    ``lists`` maps a role (labeled, unlabeled, val, train, ...) to ``(list file, ids in file order)``.
    """
    problems = []
    for role, (path, ids) in lists.items():
        seen, dups = set(), []
        for i in ids:
            if i in seen:
                dups.append(i)
            seen.add(i)
        if dups:
            problems.append(Problem("duplicate_id", str(path), f"{len(dups)} id(s) listed more than once in the "
                                                               f"{role} list: {_show(dups)}"))
    if "labeled" in lists and "unlabeled" in lists:
        both = sorted(set(lists["labeled"][1]) & set(lists["unlabeled"][1]))
        if both:
            problems.append(Problem("labeled_and_unlabeled", str(lists["unlabeled"][0]),
                                    f"{len(both)} id(s) also in the labeled list {lists['labeled'][0]}: "
                                    f"{_show(both)}"))
    return problems


def check_split_lists(lists: Mapping[str, tuple["str | os.PathLike", Sequence[str]]]) -> None:
    """Training's side of :func:`list_problems`: every problem at once, as one :class:`SampleError`."""
    problems = list_problems(lists)
    if problems:
        text = "\n".join(f"  {p.path}: {p.detail}" for p in problems)
        raise SampleError(with_readme(f"the split lists are inconsistent:\n{text}\nFix the lists in data.split_dir "
                                      f"(or unset it for a seeded split)."),
                          problems[0].kind, problems[0].path)


def _show(ids: Sequence[str]) -> str:
    return ", ".join(ids[:_SHOWN]) + (" ..." if len(ids) > _SHOWN else "")


def run_split_lists(lists) -> dict[str, tuple[str, list[str]]]:
    """``{role: (source, ids)}`` of a run's :class:`cacnb.data.splits.SplitLists`, for :func:`check_split_lists`."""
    return {role: (lists.sources[role], [pair_id(p) for p in pairs]) for role, pairs in lists.items()}
