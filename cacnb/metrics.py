"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU and pixel accuracy.

Everything derives from one ``[K, K]`` int64 confusion matrix ``cm`` with ground truth on the rows and the
prediction on the columns, ``cm[t, p]`` = number of pixels of class ``t`` predicted as ``p``. Then for class c

    IoU_c = TP_c / (TP_c + FP_c + FN_c) = cm[c, c] / (sum_p cm[c, p] + sum_t cm[t, c] - cm[c, c])

and mIoU is the mean over the classes that occur in the ground truth or the prediction (the others are NaN and
left out). This is a deliberate, documented difference from the official CAC code, whose ``eval_metrics``
averages IoU over all K classes with an absent class counting 0. The two agree whenever every class occurs, as
on the full VOC val set; on a few images ours does not punish classes that are simply not there. Pixels whose
label is ``ignore_index`` (VOC object borders, 255) never count, whatever is predicted there.

Counts are integers so that summing confusion matrices over images and over ranks (``ConfusionMeter``) is
exact: the mIoU of a sharded evaluation equals the single-process one bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from cacnb import dist


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """``[K, K]`` int64 confusion matrix (rows: ground truth, columns: prediction) on the inputs' device.

    ``pred`` and ``target`` are integer tensors of the same shape (any number of dims). Pixels whose target is
    ``ignore_index`` or outside ``[0, K)`` are dropped before counting, so their predictions never count.
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    k = int(num_classes)
    target = target.reshape(-1).long()  # [P]
    pred = pred.reshape(-1).long()      # [P]
    valid = (target != ignore_index) & (target >= 0) & (target < k)
    target, pred = target[valid], pred[valid]
    if bool(((pred < 0) | (pred >= k)).any()):
        raise ValueError(f"confusion_matrix: predictions must lie in [0, {k}); got values outside that range")
    # one bincount over the flat index t*K + p counts every (truth, prediction) pair at once
    counts = torch.bincount(target * k + pred, minlength=k * k)
    return counts.reshape(k, k)


def _as_float(cm: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(cm).double()


def iou(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``[K]`` (float64); NaN for a class absent from both ground truth and prediction."""
    cm = _as_float(cm)
    inter = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - inter
    out = inter / union.clamp(min=1)
    return torch.where(union > 0, out, torch.full_like(out, float("nan")))


def mean_iou(cm: torch.Tensor) -> float:
    """The nanmean of :func:`iou` (NaN if no class occurs at all)."""
    per_class = iou(cm)
    present = ~per_class.isnan()
    return float(per_class[present].mean()) if bool(present.any()) else float("nan")


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Correctly classified pixels / counted pixels (ignore pixels excluded); NaN if nothing was counted."""
    cm = _as_float(cm)
    total = float(cm.sum())
    return float(cm.diagonal().sum()) / total if total > 0 else float("nan")


def summarize(cm: torch.Tensor) -> dict:
    """``{"miou", "iou" (list, NaN for absent classes), "pixel_acc", "confusion" ([K, K] int64, CPU)}``."""
    return {
        "miou": mean_iou(cm),
        "iou": [float(v) for v in iou(cm)],
        "pixel_acc": pixel_accuracy(cm),
        "confusion": torch.as_tensor(cm).detach().cpu().long(),
    }


class ConfusionMeter:
    """Accumulates a confusion matrix over images, sums it over ranks, and reports the metrics.

    >>> meter = ConfusionMeter(21)
    >>> meter.update(logits.argmax(1), label)   # any number of times
    >>> meter.all_reduce()                       # every rank must call this (no-op without a process group)
    >>> meter.compute()["miou"]
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: "torch.device | str | None" = None):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.cm: Optional[torch.Tensor] = None
        if device is not None:
            self.cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.cm = cm if self.cm is None else self.cm + cm.to(self.cm.device)

    def _matrix(self) -> torch.Tensor:
        if self.cm is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        return self.cm

    def all_reduce(self) -> torch.Tensor:
        """Sum the matrix over ranks (in place) and return it. Every rank must call it, even with no images."""
        self.cm = dist.all_reduce_sum(self._matrix())
        return self.cm

    def compute(self) -> dict:
        return summarize(self._matrix())


def nan_to_none(values) -> list:
    """JSON-friendly copy of a list of floats (NaN -> None)."""
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else float(v) for v in values]
