"""What CAC does, measured beside mIoU: cross-context agreement and feature consistency on a split.

CAC's claim is about context: the same pixels seen in two contexts should get the same features and the same
prediction. For every image of a split, :func:`measure` takes ``pairs_per_image`` overlapping crop pairs from the
training pair sampler (:func:`cacnb.data.build_eval_pair_dataset`: the same crop size, scale range, stride and
IoU bound, always two windows, photometric augmentation **off**, pair ``k`` of image ``i`` drawn with sample seed
``i * pairs_per_image + k``, so every run sees the same pairs) and reports:

* **agreement**: over the labeled pixels ``p`` of the overlaps, the fraction where the two crops' predictions
  (argmax of the evaluation logits, un-flipped) agree, ``A = Σ_p [ŷ_1(p) = ŷ_2(p)] / Σ_p 1``;
* **overlap mIoU**: the mIoU of both crops' predictions on the overlap pixels against the ground truth;
* **feature consistency** at the stride-8 overlap cells whose ground-truth class is clear
  (:func:`cacnb.data.pairs.cell_labels`), with ``f = g / ||g||`` the L2-normalised pooled decoder features (the
  projector's input, so a supervised run, whose projector never trained, is measured on the same footing):
  ``pos = mean_i f_1(i)·f_2(i)`` (the same content in two contexts), ``other = mean_i mean_{j: c(j) ≠ c(i)}
  f_1(i)·f_2(j)`` (and symmetrically from crop 2: cells of the other crop with another class) and their
  ``margin = pos − other``.

The model only needs ``logits_and_features(x)`` (:meth:`cacnb.model.CACModel.logits_and_features`), so the tests
can hand it models whose behaviour is known. Sums are kept per rank and all-reduced, like :mod:`cacnb.evaluate`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cacnb import dist
from cacnb.data import build_eval_pair_dataset
from cacnb.data.pairs import cell_labels
from cacnb.evaluate import shard_indices
from cacnb.loss import overlap_index
from cacnb.metrics import ConfusionMeter
from cacnb.model import unwrap

PAIRS_PER_IMAGE = 2
METRICS = ("agreement", "overlap_miou", "pos_sim", "other_sim", "margin")
# sums kept over the split: agreeing pixels, labeled overlap pixels, Σ pos, positive cells, Σ other, other cells
_SUMS = ("agree", "pixels", "pos", "pos_cells", "other", "other_cells")


def unflipped(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, ..., W]`` with every crop whose ``flip`` is set mirrored back to its raw orientation."""
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))).to(x.device), x.flip(-1), x)


def prediction_agreement(pred: torch.Tensor, label: torch.Tensor, overlap: torch.Tensor, flip: torch.Tensor,
                         ignore_index: int = 255) -> tuple[int, int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Agreeing and labeled overlap pixels of a batch of pairs, and the (prediction, label) overlap crops.

    ``pred``, ``label`` ``[B, 2, S, S]`` as the crops are given (mirrored where ``flip`` ``[B, 2]``), ``overlap``
    ``[B, 2, 4]`` boxes in each crop's unflipped pixels."""
    b = pred.shape[0]
    pred = unflipped(pred.flatten(0, 1), flip.flatten()).view_as(pred)          # [B, 2, S, S], raw orientation
    label = unflipped(label.flatten(0, 1), flip.flatten()).view_as(label)
    agree, pixels, crops = 0, 0, []
    for i in range(b):
        (t0, l0, b0, r0), (t1, l1, b1, r1) = overlap[i].tolist()
        p0, p1 = pred[i, 0, t0:b0, l0:r0], pred[i, 1, t1:b1, l1:r1]
        y = label[i, 0, t0:b0, l0:r0]                                             # == label[i, 1] there
        valid = y != ignore_index
        agree += int((p0 == p1)[valid].sum())
        pixels += int(valid.sum())
        crops += [(p0, y), (p1, y)]
    return agree, pixels, crops


def feature_consistency(feat_a: torch.Tensor, feat_b: torch.Tensor, cls_a: torch.Tensor, cls_b: torch.Tensor,
                        index_a: torch.Tensor, index_b: torch.Tensor,
                        ignore_index: int = 255) -> dict[str, float]:
    """Sums of the positive and other-class cosine similarities of one batch of pairs.

    ``feat_*`` ``[B, C, h, w]`` unit-norm features of crop a / b as given, ``cls_*`` ``[B, h, w]`` their cell
    classes, ``index_*`` the aligned flat overlap indices into ``[B*h*w]`` (:func:`cacnb.loss.overlap_index`).
    ``pos`` sums ``f_a(i)·f_b(i)`` over overlap cells with a class; ``other`` sums, over those cells and both
    directions, the mean similarity to the other crop's cells of another class (cells without any are left out).
    """
    b, c, h, w = feat_a.shape
    flat_a = feat_a.movedim(1, -1).reshape(b, h * w, c)                            # [B, hw, C]
    flat_b = feat_b.movedim(1, -1).reshape(b, h * w, c)
    lab_a, lab_b = cls_a.reshape(b, h * w), cls_b.reshape(b, h * w)                 # [B, hw]
    out = dict.fromkeys(_SUMS[2:], 0.0)
    pair_of, cell_a, cell_b = index_a // (h * w), index_a % (h * w), index_b % (h * w)
    for i in range(b):
        here = pair_of == i
        cells_a, cells_b = cell_a[here], cell_b[here]
        cls = lab_a[i, cells_a]
        keep = (cls != ignore_index) & (cls == lab_b[i, cells_b])
        cells_a, cells_b, cls = cells_a[keep], cells_b[keep], cls[keep]
        if not len(cls):
            continue
        anchors_a, anchors_b = flat_a[i, cells_a], flat_b[i, cells_b]               # [n, C]
        out["pos"] += float((anchors_a * anchors_b).sum())
        out["pos_cells"] += len(cls)
        for anchors, others, other_cls in ((anchors_a, flat_b[i], lab_b[i]), (anchors_b, flat_a[i], lab_a[i])):
            differs = (other_cls[None, :] != cls[:, None]) & (other_cls[None, :] != ignore_index)  # [n, hw]
            count = differs.sum(1)
            has = count > 0
            sims = anchors @ others.T                                                # [n, hw]
            mean = (sims * differs).sum(1)[has] / count[has]
            out["other"] += float(mean.sum())
            out["other_cells"] += int(has.sum())
    return out


def summarize(sums: dict[str, float], overlap_iou: dict) -> dict[str, Optional[float]]:
    """The metrics of :data:`METRICS` from the accumulated sums (None where nothing was counted)."""
    def ratio(num, den):
        return sums[num] / sums[den] if sums[den] > 0 else None

    pos, other = ratio("pos", "pos_cells"), ratio("other", "other_cells")
    return {"agreement": ratio("agree", "pixels"), "overlap_miou": overlap_iou["miou"], "pos_sim": pos,
            "other_sim": other, "margin": None if pos is None or other is None else pos - other,
            "pixels": int(sums["pixels"]), "pos_cells": int(sums["pos_cells"]),
            "other_cells": int(sums["other_cells"])}


@torch.inference_mode()
def measure(model: torch.nn.Module, pairs, num_classes: int, *, pairs_per_image: int = PAIRS_PER_IMAGE,
            ignore_index: int = 255, stride: int = 8, batch_size: int = 16, max_images: Optional[int] = None,
            progress: bool = False) -> dict:
    """The consistency metrics of ``model`` on the crop pairs of ``pairs`` (a :class:`cacnb.data.PairDataset`
    with photometric augmentation off). Every rank must call it under a process group; the model's mode is
    restored."""
    net = unwrap(model)
    device = next(net.parameters()).device
    n = len(pairs) if max_images is None else min(len(pairs), int(max_images))
    keys = [(i, i * pairs_per_image + k) for i in shard_indices(n) for k in range(pairs_per_image)]
    sums = dict.fromkeys(_SUMS, 0.0)
    meter = ConfusionMeter(num_classes, ignore_index, device=device)
    was_training = net.training
    net.eval()
    try:
        for start in tqdm(range(0, len(keys), batch_size), desc="consistency", leave=False,
                          disable=not (progress and dist.is_main())):
            items = [pairs[key] for key in keys[start:start + batch_size]]
            _add_batch(net, items, num_classes, ignore_index, stride, device, sums, meter)
    finally:
        net.train(was_training)
    total = dist.all_reduce_sum(torch.tensor([sums[k] for k in _SUMS], dtype=torch.float64, device=device))
    meter.all_reduce()
    result = summarize(dict(zip(_SUMS, total.tolist())), meter.compute())
    result.update(num_images=n, pairs_per_image=pairs_per_image)
    return result


def _add_batch(net, items: list[dict], num_classes: int, ignore_index: int, stride: int, device, sums: dict,
               meter: ConfusionMeter) -> None:
    image = torch.stack([it["image"] for it in items]).to(device)                 # [B, 2, 3, S, S]
    label = torch.stack([it["label"] for it in items]).to(device)                 # [B, 2, S, S]
    overlap = torch.stack([it["overlap"] for it in items])                         # [B, 2, 4], CPU
    flip = torch.stack([it["flip"] for it in items])                               # [B, 2], CPU
    b = image.shape[0]
    logits, feat = net.logits_and_features(image.flatten(0, 1))                    # [2B, K, S, S], [2B, C, h, w]
    pred = logits.argmax(1).view(b, 2, *logits.shape[-2:])
    agree, pixels, crops = prediction_agreement(pred, label, overlap, flip, ignore_index)
    sums["agree"] += agree
    sums["pixels"] += pixels
    for p, y in crops:
        meter.update(p, y)
    feat = F.normalize(feat.float(), dim=1).view(b, 2, *feat.shape[1:])
    cls = cell_labels(label.flatten(0, 1), num_classes, stride, ignore_index).view(b, 2, *feat.shape[-2:])
    index_a, index_b = overlap_index(overlap, flip, b, feat.shape[-2], feat.shape[-1], stride)
    for key, value in feature_consistency(feat[:, 0], feat[:, 1], cls[:, 0], cls[:, 1], index_a, index_b,
                                          ignore_index).items():
        sums[key] += value


@torch.inference_mode()
def pair_predictions(model: torch.nn.Module, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The two crops' predictions ``[S, S]`` of a pair item, each in its raw (unflipped) orientation, on the CPU
    (for the agreement figure of notebook 05); the model's mode is restored."""
    net = unwrap(model)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        logits, _ = net.logits_and_features(item["image"].to(device))              # [2, K, S, S]
    finally:
        net.train(was_training)
    pred = unflipped(logits.argmax(1).cpu(), item["flip"])                         # [2, S, S]
    return pred[0], pred[1]


def measure_run(run, *, split: str = "test", pairs_per_image: int = PAIRS_PER_IMAGE,
                max_images: Optional[int] = None, progress: bool = False, data_cfg=None) -> dict:
    """:func:`measure` for an opened run (:func:`cacnb.runs.load_run`) on the ``split`` of its config, or of
    ``data_cfg`` where given: a study measures every row on the pairs of its base config, so that an ablation of
    the pair geometry (``data.iou_bound``, ``data.pair_scale_range``) changes the training and not the
    instrument."""
    data = run.config.data if data_cfg is None else data_cfg
    return measure(run.model, build_eval_pair_dataset(data, split), data.num_classes,
                   pairs_per_image=pairs_per_image, ignore_index=data.ignore_index, stride=data.stride,
                   max_images=max_images, progress=progress)
