"""Cityscapes reader: ``leftImg8bit/<split>/<city>/X_leftImg8bit.png`` with
``gtFine/<split>/<city>/X_gtFine_labelTrainIds.png`` (19 train ids, 255 = ignore).

If a list names ``*_gtFine_labelIds.png`` (the raw 34 ids), the ``labelTrainIds`` file beside it is used when it
exists; otherwise the raw ids are mapped to train ids with the official table (what ``createTrainIdLabelImgs``
does), so either form of list works.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .voc import SegFiles, read_index_png

# raw Cityscapes label id -> train id, for the 19 evaluated classes; every other id is ignored (255)
_TRAIN_ID_OF = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def label_id_to_train_id(label_ids: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    lut = np.full(256, ignore_index, dtype=np.uint8)
    for raw, train in _TRAIN_ID_OF.items():
        lut[raw] = train
    return lut[label_ids.astype(np.uint8)]


class CityscapesFiles(SegFiles):
    def read_label(self, path: Path) -> np.ndarray:
        name = path.name
        if name.endswith("_labelIds.png"):
            train_ids = path.with_name(name[: -len("_labelIds.png")] + "_labelTrainIds.png")
            if train_ids.is_file():
                return read_index_png(train_ids)
            return label_id_to_train_id(read_index_png(path))
        return read_index_png(path)

