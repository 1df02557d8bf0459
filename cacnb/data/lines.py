"""The official CAC list line format: one sample per line, image path then label path, both relative to the
dataset root with a leading slash::

    /JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png                         (VOC)
    /leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png \
        /gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png                    (Cityscapes)

Lines starting with ``#`` are comments. This module knows nothing of configs or of where a run's lists come from
(that is :mod:`cacnb.data.splits`); :mod:`cacnb.data.official` and :mod:`cacnb.data.validate` build on it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from ..paths import atomic_write_text
from .errors import DatasetError, with_readme

Pair = tuple[str, str]  # (image path, label path), relative to the dataset root, leading slash kept


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


def write_split(path: "str | os.PathLike", pairs: Iterable[Pair], comment: Optional[str] = None) -> Path:
    """Write pairs one per line, atomically (temporary file + rename), after a ``# comment`` line if given."""
    head = f"# {comment}\n" if comment else ""
    return atomic_write_text(path, head + "".join(format_line(p) + "\n" for p in pairs))
