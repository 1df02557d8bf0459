"""A copy of the synthetic fixture with a held-out test split (the generator of the context benchmark writes
its own test.txt; the tiny session fixture has none)."""
from __future__ import annotations

import shutil
from pathlib import Path


def with_test_split(data_dir: Path, dst: Path, n_test: int = 4) -> Path:
    """Copy ``data_dir`` (holding VOCdevkit/VOC2012) to ``dst`` and move its last ``n_test`` training ids from
    ``train_aug.txt`` to ``test.txt``; returns ``dst`` (the new data_dir)."""
    shutil.copytree(data_dir / "VOCdevkit", dst / "VOCdevkit")
    lists = dst / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    ids = (lists / "train_aug.txt").read_text().split()
    (lists / "train_aug.txt").write_text("\n".join(ids[:-n_test]) + "\n")
    (lists / "test.txt").write_text("\n".join(ids[-n_test:]) + "\n")
    return dst
