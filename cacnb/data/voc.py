"""PASCAL VOC 2012 (+ SegmentationClassAug) reader and the labeled dataset built on it.

:class:`SegFiles` is the list of (image, label) files of a dataset and how to read one; Cityscapes subclasses it.
:class:`LabeledDataset` wraps a SegFiles with the official labeled recipe (train) or the whole image (val).
The synthetic dataset is written in the VOC layout, so it is read by exactly this code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from . import transforms as T
from .errors import DatasetError
from .lines import pair_id, pair_paths
from .validate import SampleError, check_label_ids, open_failure

Pair = tuple[str, str]


def read_image(path: Path) -> tv_tensors.Image:
    """An RGB image as uint8 ``[3, H, W]`` (a channels-last view, which the resize kernels prefer).

    A missing or undecodable file raises DatasetError naming it. (PIL rather than torchvision.io, whose decoders
    are deprecated.)
    """
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")  # forces the full decode, so truncated files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise open_failure(path, "image", e) from None
    hwc = torch.from_numpy(np.array(rgb, dtype=np.uint8))  # [H, W, 3]
    return tv_tensors.Image(hwc.permute(2, 0, 1))


LABEL_MODES = ("P", "L", "I", "I;16")  # palette, 8-bit grey, 32/16-bit grey (range-checked below)


def read_index_png(path: Path) -> np.ndarray:
    """Class indices ``[H, W]`` from a palette (mode P) or grey (mode L) PNG; colours are never interpreted."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, array = im.mode, np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise open_failure(path, "label", e) from None
    if mode not in LABEL_MODES:
        raise SampleError(f"label {path} has mode {mode}: labels must be index PNGs (palette or greyscale, 8 or "
                          f"16 bit, one class id per pixel, 255 = ignore), not colour images. Use "
                          f"SegmentationClassAug (or convert colour masks to indices).", "bad_mode", path)
    return _as_uint8_label(path, mode, array)


def _as_uint8_label(path: Path, mode: str, array: np.ndarray) -> np.ndarray:
    """``array`` as uint8; 16/32-bit labels are range-checked first, since the cast would wrap 256 to 0."""
    if array.size and (int(array.min()) < 0 or int(array.max()) > 255):
        raise SampleError(f"label {path} (mode {mode}) holds values {int(array.min())}..{int(array.max())}, "
                          f"outside 0..255: class ids must fit in 8 bits (255 = ignore). Re-save it as an 8-bit "
                          f"index PNG (mode P or L) with valid class ids, or remove its line from the split list.",
                          "bad_values", path)
    return array.astype(np.uint8, copy=False)


class SegFiles:
    """``(root, pairs)``: list entries relative to ``root`` (leading slash as in the official lists).

    With ``num_classes`` every label read is checked for ids outside ``0..num_classes-1`` and ``ignore_index``.
    """

    def __init__(self, root: "str | os.PathLike", pairs: Sequence[Pair], *, num_classes: "int | None" = None,
                 ignore_index: int = 255):
        self.root = Path(root)
        self.pairs = [tuple(p) for p in pairs]
        self.num_classes, self.ignore_index = num_classes, ignore_index
        if not self.pairs:
            raise DatasetError(f"no samples listed for the dataset at {self.root}; the split list is empty")

    def __len__(self) -> int:
        return len(self.pairs)

    def paths(self, index: int) -> tuple[Path, Path]:
        return pair_paths(self.root, self.pairs[index])

    def item_id(self, index: int) -> str:
        return pair_id(self.pairs[index])

    def read_label(self, path: Path) -> np.ndarray:
        return read_index_png(path)

    def read(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """(uint8 image ``[3, H, W]``, uint8 mask ``[H, W]``) of one sample, sizes checked."""
        image_path, label_path = self.paths(index)
        image = read_image(image_path)
        label = self.read_label(label_path)
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise DatasetError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but image {image_path} is "
                               f"{image.shape[-1]}x{image.shape[-2]}; the pair does not belong together.")
        check_label_ids(label_path, label, self.num_classes, self.ignore_index)
        return image, tv_tensors.Mask(torch.from_numpy(np.array(label, dtype=np.uint8)))


class LabeledDataset(Dataset):
    """Labeled images. ``train=True``: the official random rescale / pad / crop / flip (+ optional jitter);
    ``train=False``: the whole image at its own size. Items: ``{"image": float [3,H,W], "label": long [H,W],
    "id": str}``. ``ds[(i, sample_seed)]`` makes every random draw of the item a function of ``sample_seed``.
    """

    def __init__(self, files: SegFiles, *, train: bool = True, crop_size: int = 320, base_size: int = 400,
                 scale_range: Sequence[float] = (0.5, 2.0), ignore_index: int = 255, color_jitter: bool = False):
        self.files = files
        self.train = train
        self.crop_size = crop_size
        self.base_size = base_size
        self.scale_range = tuple(scale_range)
        self.ignore_index = ignore_index
        self.color_jitter = color_jitter

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> dict:
        index, sample_seed = T.split_key(key)
        image, mask = self.files.read(index)
        if self.train:
            with T.seeded(sample_seed):
                image, mask = T.train_augment(image, mask, crop_size=self.crop_size, base_size=self.base_size,
                                              scale_range=self.scale_range, ignore_index=self.ignore_index,
                                              jitter=self.color_jitter)
        image, label = T.to_model_input(image, mask)
        return {"image": image, "label": label, "id": self.files.item_id(index)}

