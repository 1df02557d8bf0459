"""The paper's split lists, shipped with the package (``official_splits/``, ids only; MIT, see its README).

``data.datalist = k`` selects them: the labeled ids of ``datalist{k}/{n}_labeled.txt``, the unlabeled ids as the
rest of the training list (VOC ``train_aug``, Cityscapes ``train``) in its order, and the official val list.
This module is the one owner of which (dataset, datalist, n_labeled) exist and of turning an id into the
official list line (image path, label path). It reads only the package's own files.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

from .lines import Pair, cityscapes_pair, voc_pair

OFFICIAL_DIR = Path(__file__).with_name("official_splits")
DATASETS = ("voc", "cityscapes")
_TRAIN_LIST = {"voc": "train_aug.txt", "cityscapes": "train.txt"}


def datalists(dataset: str) -> list[int]:
    """The datalist numbers shipped for ``dataset`` ([] for a dataset without official lists)."""
    if dataset not in DATASETS:
        return []
    return sorted(int(p.name.removeprefix("datalist")) for p in (OFFICIAL_DIR / dataset).glob("datalist*"))


def labeled_counts(dataset: str, datalist: int) -> list[int]:
    """The labeled counts with an official list in ``datalist``, ascending."""
    folder = OFFICIAL_DIR / dataset / f"datalist{datalist}"
    return sorted(int(p.name.split("_")[0]) for p in folder.glob("*_labeled.txt"))


def choice_problem(dataset: str, datalist: int, n_labeled: int) -> Optional[str]:
    """Why (dataset, datalist, n_labeled) names no shipped list, or None when it does."""
    if dataset not in DATASETS:
        return (f"data.datalist={datalist}: dataset {dataset!r} has no official split lists (only "
                f"{', '.join(DATASETS)} do); set data.datalist=null to use seeded generated splits")
    if datalist not in datalists(dataset):
        return f"data.datalist={datalist}: {dataset} has datalists {datalists(dataset)}"
    counts = labeled_counts(dataset, datalist)
    if n_labeled not in counts:
        return (f"data.n_labeled={n_labeled} has no official {dataset} list in datalist {datalist}; the counts "
                f"there are {counts}. Choose one of them, or set data.datalist=null for a seeded random split "
                f"(data.split_seed)")
    return None


@lru_cache(maxsize=None)
def _ids(relative: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in (OFFICIAL_DIR / relative).read_text().splitlines() if line.strip())


def labeled_ids(dataset: str, datalist: int, n_labeled: int) -> list[str]:
    problem = choice_problem(dataset, datalist, n_labeled)
    if problem:
        raise ValueError(problem)
    return list(_ids(f"{dataset}/datalist{datalist}/{n_labeled}_labeled.txt"))


def train_ids(dataset: str) -> list[str]:
    return list(_ids(f"{dataset}/{_TRAIN_LIST[dataset]}"))


def val_ids(dataset: str) -> list[str]:
    return list(_ids(f"{dataset}/val.txt"))


def id_pair(dataset: str, subset: str, sample_id: str) -> Pair:
    """The official list line of an id: VOC ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``, Cityscapes
    ``/leftImg8bit/<subset>/<id>_leftImg8bit.png /gtFine/<subset>/<id>_gtFine_labelTrainIds.png``."""
    if dataset == "cityscapes":
        return cityscapes_pair(f"/leftImg8bit/{subset}/{sample_id}_leftImg8bit.png")
    return voc_pair(sample_id)


def split_pairs(dataset: str, datalist: int, n_labeled: int) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(labeled, unlabeled, val) pairs of the paper's split; unlabeled = training list minus labeled, in order."""
    labeled = labeled_ids(dataset, datalist, n_labeled)
    chosen = set(labeled)
    unlabeled = [i for i in train_ids(dataset) if i not in chosen]
    return ([id_pair(dataset, "train", i) for i in labeled], [id_pair(dataset, "train", i) for i in unlabeled],
            [id_pair(dataset, "val", i) for i in val_ids(dataset)])
