"""Class names and colour maps of PASCAL VOC 2012 (also used by the synthetic set) and Cityscapes.

The VOC colour map is not a table but a rule: the bits of a class index are dealt round-robin to R, G and B,
most significant output bit first. Index ``i`` with bits ``b0 b1 b2 b3 ...`` (b0 the lowest) gives
``R = b0<<7 | b3<<6 | b6<<5 ...``, ``G = b1<<7 | b4<<6 | ...``, ``B = b2<<7 | b5<<6 | ...``.
So 1 (aeroplane) is (128, 0, 0), 15 (person) is (192, 128, 128) and 255 (the "void" border) is (224, 224, 192).
"""
from __future__ import annotations

import numpy as np

from ..config import dataset_layout

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# Cityscapes' 19 evaluation classes in trainId order (cityscapesScripts' labels.py).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

_CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def _voc_colour(index: int) -> tuple[int, int, int]:
    rgb = [0, 0, 0]
    for out_bit in range(7, -1, -1):  # fill output bits from the most significant down
        for channel in range(3):
            rgb[channel] |= (index & 1) << out_bit
            index >>= 1
    return rgb[0], rgb[1], rgb[2]


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map as 768 ints (``Image.putpalette`` format)."""
    return [c for i in range(256) for c in _voc_colour(i)]


def cityscapes_palette() -> list[int]:
    """768 ints: the 19 trainId colours, every other index (255 = ignore included) black."""
    flat = [c for rgb in _CITYSCAPES_COLOURS for c in rgb]
    return flat + [0] * (768 - len(flat))


def class_names(dataset: str) -> tuple[str, ...]:
    """Class names in label order; the synthetic set uses VOC's 21 classes."""
    return VOC_CLASSES if dataset_layout(dataset) == "voc" else CITYSCAPES_CLASSES


def palette(dataset: str) -> list[int]:
    """The 768-int colour map used to draw ``dataset``'s labels."""
    return voc_palette() if dataset_layout(dataset) == "voc" else cityscapes_palette()


def colorize(label, dataset: str = "voc") -> np.ndarray:
    """Class-index map ``[H, W]`` (numpy or torch, any int dtype) -> RGB ``uint8 [H, W, 3]``."""
    label = np.asarray(label.cpu() if hasattr(label, "cpu") else label).astype(np.int64)
    table = np.asarray(palette(dataset), dtype=np.uint8).reshape(256, 3)  # [256, 3]
    return table[np.clip(label, 0, 255)]
