"""CAC's unsupervised loss: overlap gathering, negative sampling, the feature bank, and the glue.

The paper (Lai et al., CVPR 2021, Sec. 3.2-3.3) crops two overlapping patches of an unlabeled image. Features
of the overlap region should agree across the two contexts (the positive pair), and differ from features of
other positions (the negatives), except those with the same pseudo-label (the false-negative filter). The
directional mask lets only the less confident side move towards the more confident one, and only when that one
is confident enough. The loss itself lives in :mod:`cacnb.contrastive`; this module prepares its inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cacnb import dist
from cacnb.contrastive import (  # noqa: F401  (re-exported: the public loss API)
    direction_weights,
    directional_contrastive_loss,
    directional_contrastive_loss_reference,
)
from cacnb.data.pairs import cell_labels, overlap_cells

__all__ = [
    "gather_overlap", "overlap_index", "sample_negatives", "negatives_total", "negatives_per_crop", "negatives_note",
    "sample_crop_negatives", "FeatureBank",
    "cac_unsup_loss",
    "confidence_and_pseudo_label",
    "directional_contrastive_loss", "directional_contrastive_loss_reference", "direction_weights",
]


# ---------------------------------------------------------------------------------------------------------------
# overlap gathering


def _host_boxes(overlap, flip, batch, h, w, stride):
    """Each crop's overlap box on the ``h x w`` map and its flip, as Python ints: ``(boxes, flips)`` with
    ``boxes[b][k] = (top, left, bottom, right)`` and ``flips[b][k]`` for pair ``b``, crop ``k``.

    The boxes are the loader's own CPU tensors, so reading them is no device sync (boxes already on a GPU
    would cost one). Every check runs on these Python values.
    """
    if tuple(overlap.shape) != (batch, 2, 4) or tuple(flip.shape) != (batch, 2):
        raise ValueError(f"overlap must be [B, 2, 4] and flip [B, 2] with B = {batch}, got "
                         f"{tuple(overlap.shape)} and {tuple(flip.shape)}")
    raw = [[[int(v) for v in box] for box in pair] for pair in overlap.tolist()]
    flips = [[bool(f) for f in pair] for pair in flip.tolist()]
    if any(v % stride for pair in raw for box in pair for v in box):
        raise ValueError(f"overlap boxes must be multiples of the stride {stride} (data.stride), got {raw}")
    boxes = [[tuple(v // stride for v in box) for box in pair] for pair in raw]
    for pair in boxes:
        sizes = [(bottom - top, right - left) for top, left, bottom, right in pair]
        if sizes[0] != sizes[1] or min(sizes[0]) <= 0:
            raise ValueError(f"the two crops' overlap boxes must be non-empty and of equal size, got {raw}")
        if any(top < 0 or left < 0 or bottom > h or right > w for top, left, bottom, right in pair):
            raise ValueError(f"overlap boxes {raw} exceed the {h}x{w} feature map at stride {stride}; "
                             f"is data.stride right for this model?")
    return boxes, flips


def overlap_index(overlap, flip, batch, h, w, stride=8):
    """Flat indices into ``[B*h*w]`` maps of both crops' shared positions, aligned: ``(index_a, index_b)``
    (CPU long tensors, row-major within each pair's box, concatenated over the batch).

    ``overlap`` ``[B, 2, 4]`` (top, left, bottom, right) in each raw crop's pixels; ``flip`` ``[B, 2]``: the map
    as given is the raw crop flipped horizontally, so raw column ``x`` sits at column ``w - 1 - x``.
    """
    boxes, flips = _host_boxes(overlap, flip, batch, h, w, stride)
    index = []
    for k in range(2):
        cells = []
        for b, (pair, flipped) in enumerate(zip(boxes, flips)):
            rows, cols = overlap_cells(pair[k], flipped[k], w, stride=1)     # the box is already in cells
            cells.append(b * h * w + (rows[:, None] * w + cols[None, :]).reshape(-1))
        index.append(torch.cat(cells) if cells else torch.zeros(0, dtype=torch.long))
    return index[0], index[1]


def _take(x, index):
    """Rows ``index`` of a ``[B, C, h, w]`` map (as ``[n, C]``) or of a ``[B, h, w]`` map (as ``[n]``)."""
    flat = x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() == 4 else x.reshape(-1)
    return flat[index.to(x.device, non_blocking=True)]  # a host-to-device copy, no sync


def gather_overlap(x_a, x_b, overlap, flip, stride=8):
    """The values of both crops' maps at the shared positions, aligned: ``(a [n, ...], b [n, ...])``.

    ``x_*`` are ``[B, C, h, w]`` (features, logits) or ``[B, h, w]`` (confidence, pseudo-label) maps at
    ``stride``; ``overlap`` ``[B, 2, 4]`` long boxes (top, left, bottom, right) in each raw crop's pixels;
    ``flip`` ``[B, 2]`` bool. Row ``r`` of both outputs is the same image position, row-major within each
    pair's box and concatenated over the batch.
    """
    if x_b.shape != x_a.shape:
        raise ValueError(f"x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} must have the same shape")
    index_a, index_b = overlap_index(overlap, flip, x_a.shape[0], x_a.shape[-2], x_a.shape[-1], stride)
    return _take(x_a, index_a), _take(x_b, index_b)


# ---------------------------------------------------------------------------------------------------------------
# negatives


def sample_negatives(feat, label, num, generator: Optional[torch.Generator] = None):
    """``min(num, B*h*w)`` distinct random positions of ``feat`` ``[B, c, h, w]``: ``([m, c], [m])``, detached.

    The official code draws with numpy and fails when ``num`` exceeds the positions; here a torch generator
    (on any device; indices move to the features' device) makes it reproducible, and few positions mean all.
    """
    b, c, h, w = feat.shape
    total = b * h * w
    gen_device = generator.device if generator is not None else torch.device("cpu")
    index = torch.randperm(total, generator=generator, device=gen_device)[:min(int(num), total)]
    index = index.to(feat.device, non_blocking=True)
    flat = feat.detach().movedim(1, -1).reshape(total, c)                 # [B*h*w, c]
    return flat[index], label.detach().reshape(total)[index]


def negatives_total(loss_cfg) -> Optional[int]:
    """The total of negatives a loss must see whatever the world size, or None for the official per-rank rule.

    ``loss.neg_total`` if set; else, with ``loss.paper_n_gpu = g`` (the presets and official JSON files set it),
    the paper's total ``2 × selected_num × g × (step_save + 1)``: 51,200 (VOC R-50, g = 2), 76,800 (VOC R-101,
    step_save 2), 129,600 (Cityscapes, selected_num 16200, g = 4, step_save 0).
    """
    if loss_cfg.neg_total is not None:
        return int(loss_cfg.neg_total)
    if loss_cfg.paper_n_gpu is not None:
        return 2 * int(loss_cfg.selected_num) * int(loss_cfg.paper_n_gpu) * (int(loss_cfg.step_save) + 1)
    return None


def negatives_per_crop(loss_cfg, world_size: int) -> int:
    """Negatives each rank samples from each crop view (over its batch).

    Official: ``selected_num``, so the bank holds ``N = 2 × selected_num × world × (step_save + 1)`` negatives and
    the total depends on the GPU count. When :func:`negatives_total` gives a target ``T`` (``loss.neg_total``, or
    the paper's total from ``loss.paper_n_gpu``), the per-crop count is ``T // (2 × world × (step_save + 1))``,
    so the loss sees the same ``N = T`` at any world size (equal to the official run at ``world = paper_n_gpu``).
    """
    total = negatives_total(loss_cfg)
    if total is None:
        return int(loss_cfg.selected_num)
    per_crop = total // (2 * world_size * (loss_cfg.step_save + 1))
    if per_crop < 1:
        raise ValueError(f"loss.neg_total = {total} is too small for {world_size} ranks and "
                         f"loss.step_save = {loss_cfg.step_save}: it must be at least "
                         f"{2 * world_size * (loss_cfg.step_save + 1)}")
    return per_crop


def negatives_note(loss_cfg, world_size: int) -> Optional[str]:
    """One line for the log when the paper's negatives total is kept at a world size other than the paper's."""
    if loss_cfg.neg_total is not None or loss_cfg.paper_n_gpu is None or loss_cfg.paper_n_gpu == world_size:
        return None
    per_crop = negatives_per_crop(loss_cfg, world_size)
    seen = 2 * per_crop * world_size * (loss_cfg.step_save + 1)
    return (f"negatives: the paper ran {loss_cfg.paper_n_gpu} GPUs x {loss_cfg.selected_num} per crop; at "
            f"{world_size} process(es) each samples {per_crop} per crop, so the loss sees {seen} negatives (the "
            f"paper: {negatives_total(loss_cfg)}; loss.paper_n_gpu=null samples {loss_cfg.selected_num} per crop "
            f"per process instead)")


class FeatureBank(nn.Module):
    """The negatives of the last ``step_save + 1`` steps (official semantics), as checkpointable buffers.

    ``feat`` ``[total, c]`` and ``label`` ``[total]`` hold the sets back to back, oldest first; ``lengths``
    ``[k]`` their row counts (mirrored on the host, so pushing reads nothing from the device). Loading a state
    dict restores the sets even into a fresh, empty bank.
    """

    def __init__(self, step_save: int):
        super().__init__()
        if step_save < 0:
            raise ValueError(f"step_save must be >= 0 (config key loss.step_save), got {step_save}")
        self.step_save = int(step_save)
        self.register_buffer("feat", torch.zeros(0, 0))
        self.register_buffer("label", torch.zeros(0, dtype=torch.long))
        self.register_buffer("lengths", torch.zeros(0, dtype=torch.long))
        self.sizes: list[int] = []  # lengths.tolist(), kept in step

    def __len__(self) -> int:
        return len(self.sizes)

    @torch.no_grad()
    def push(self, feat, label):
        """Append one gathered set, drop the oldest beyond ``step_save + 1``; return ``(all_feat, all_label)``."""
        feat, label = feat.detach(), label.detach().long()
        if len(self) and self.feat.shape[1] != feat.shape[1]:
            raise ValueError(f"the feature bank holds {self.feat.shape[1]}-dim features but got {feat.shape[1]}-dim "
                             f"ones: was it restored from a checkpoint with another model.proj_dim?")
        if len(self) == 0:
            old_feat, old_label = feat[:0], label[:0]
        else:
            old_feat, old_label = self.feat.to(feat.device, feat.dtype), self.label.to(label.device)
        all_feat, all_label = torch.cat([old_feat, feat]), torch.cat([old_label, label])
        sizes = self.sizes + [len(feat)]
        self.sizes = sizes[-(self.step_save + 1):]
        drop = sum(sizes) - sum(self.sizes)
        # clone: a sliced view would keep (and checkpoint) the dropped rows' storage
        self.feat, self.label = all_feat[drop:].clone(), all_label[drop:].clone()
        self.lengths = torch.tensor(self.sizes, dtype=torch.long).to(feat.device, non_blocking=True)
        return self.feat, self.label

    def sets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stored sets, oldest first."""
        return list(zip(self.feat.split(self.sizes), self.label.split(self.sizes)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The bank's shape changes with its contents, so take the saved tensors as they are.
        for name in ("feat", "label", "lengths"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, state_dict[key].detach().to(getattr(self, name).device, copy=True))
            elif strict:
                missing_keys.append(key)
        self.sizes = [int(v) for v in self.lengths.tolist()]
        if int(self.lengths.sum()) != len(self.feat) or len(self.feat) != len(self.label):
            error_msgs.append(f"{prefix}: bank lengths {self.lengths.tolist()} do not match feat "
                              f"{tuple(self.feat.shape)} / label {tuple(self.label.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# the glue


@torch.no_grad()
def confidence_and_pseudo_label(logits):
    """Max softmax and argmax over classes: ``conf`` ``[B, h, w]``, ``pseudo_label`` ``[B, h, w]``."""
    conf, pseudo_label = torch.softmax(logits.detach().float(), dim=1).max(dim=1)
    return conf, pseudo_label


def sample_crop_negatives(crops, loss_cfg, world_size: int, generator):
    """This rank's negatives from each ``(proj, pseudo_label)`` crop, concatenated: ``([2 × num, c], [2 × num])``.

    Shared by training and the notebook's :func:`cacnb.viz.loss_viz.pair_terms` so both sample the same count.
    """
    num = negatives_per_crop(loss_cfg, world_size)
    feats, labels = zip(*(sample_negatives(proj, pseudo_label, num, generator) for proj, pseudo_label in crops))
    return torch.cat(feats), torch.cat(labels)


def _negatives(crops, world_size, bank, loss_cfg, generator):
    """Sample each crop's negatives, gather them over ranks and push them to the bank."""
    feats, labels = sample_crop_negatives(crops, loss_cfg, world_size, generator)
    feat = dist.all_gather_nograd(feats)                                   # [world * 2 * num, c]
    label = dist.all_gather_nograd(labels)
    return bank.push(feat, label)


def cac_unsup_loss(crop_a: dict, crop_b: dict, overlap, flip, bank: FeatureBank, loss_cfg, *,
                   generator: Optional[torch.Generator], stride: int = 8, hidden_label=None,
                   ignore_index: int = 255):
    """``weight_unsup × (loss_a + loss_b)`` for a batch of pairs, and statistics to log (0-d tensors, never read
    here: the trainer reads them once per log line).

    ``crop_*`` are the model's ``crop_outputs`` dicts (``"proj"`` ``[B, c, h, w]`` L2-normalised,
    ``"logits"`` ``[B, K, h, w]``). Confidences and pseudo-labels come from the logits without gradient.
    Negatives are sampled from both crops, gathered across ranks and pushed to ``bank``. ``overlap`` and
    ``flip`` should be the loader's CPU tensors (see :func:`overlap_index`).

    ``hidden_label`` ``[B, 2, S, S]``: the pairs' ground truth where the dataset has it (the synthetic sets label
    every image). It only feeds the diagnostics of :func:`pseudo_label_stats`, computed apart from the loss and
    without gradient: the loss never sees it.
    """
    proj_a, proj_b = crop_a["proj"], crop_b["proj"]
    num_classes = crop_a["logits"].shape[1]
    conf_map_a, label_map_a = confidence_and_pseudo_label(crop_a["logits"])
    conf_map_b, label_map_b = confidence_and_pseudo_label(crop_b["logits"])
    index_a, index_b = overlap_index(overlap, flip, proj_a.shape[0], proj_a.shape[-2], proj_a.shape[-1], stride)
    feat_a, feat_b = _take(proj_a, index_a), _take(proj_b, index_b)
    conf_a, conf_b = _take(conf_map_a, index_a), _take(conf_map_b, index_b)
    label_a, label_b = _take(label_map_a, index_a), _take(label_map_b, index_b)
    crops = [(proj_a, label_map_a), (proj_b, label_map_b)]
    neg_feat, neg_label = _negatives(crops, dist.get_world_size(), bank, loss_cfg, generator)
    loss_a, loss_b = directional_contrastive_loss(
        feat_a, feat_b, conf_a, conf_b, label_a, label_b, neg_feat, neg_label,
        temperature=loss_cfg.temperature, pos_thresh=loss_cfg.pos_thresh,
        chunk_size=loss_cfg.chunk_size, precision=loss_cfg.precision,
        directional=loss_cfg.directional, neg_filter=loss_cfg.neg_filter, num_classes=num_classes)
    w_a, w_b = direction_weights(conf_a, conf_b, loss_cfg.pos_thresh, loss_cfg.directional)
    n = len(feat_a)
    zero = loss_a.new_zeros(())
    stats = {
        "loss_a": loss_a.detach(), "loss_b": loss_b.detach(),
        "n_overlap": loss_a.new_full((), float(n)),
        "frac_pos_a": w_a.float().mean() if n else zero,
        "frac_pos_b": w_b.float().mean() if n else zero,
        "n_neg": loss_a.new_full((), float(len(neg_label))),
        **kept_negatives_by_class(torch.cat([label_a, label_b]), torch.cat([w_a, w_b]), neg_label, num_classes,
                                  loss_cfg.neg_filter),
    }
    # the mean over every anchor that enters the loss (0 when none does); weighting only those keeps the
    # statistic from drifting towards positions the loss ignores
    stats["neg_kept_mean"] = (stats["neg_kept_sum_by_class"].sum()
                              / stats["anchors_by_class"].sum().clamp(min=1.0)).to(loss_a.dtype)
    if hidden_label is not None:
        true_maps = [cell_labels(hidden_label[:, k].to(proj_a.device, non_blocking=True), num_classes, stride,
                                 ignore_index) for k in range(2)]
        stats.update(pseudo_label_stats((label_a, label_b), (_take(true_maps[0], index_a),
                                                             _take(true_maps[1], index_b)),
                                        (w_a, w_b), ignore_index))
    return loss_cfg.weight_unsup * (loss_a + loss_b), stats


# ---------------------------------------------------------------------------------------------------------------
# diagnostics (logged, never part of the loss)

# log keys whose ratio (numerator, denominator) is the logged statistic: the trainer sums both over its log
# interval and writes the ratio under the first name, so steps with few positions weigh less
RATIO_STATS = {
    "pl_acc_overlap": ("pl_correct_overlap", "pl_counted_overlap"),
    "pl_acc_selected": ("pl_correct_selected", "pl_counted_selected"),
    "neg_kept_by_class": ("neg_kept_sum_by_class", "anchors_by_class"),
}


@torch.no_grad()
def pseudo_label_stats(pseudo, truth, weights, ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """How right the pseudo-labels are, against hidden ground truth (a diagnostic; never used for training).

    ``pseudo``, ``truth``, ``weights``: ``(crop a, crop b)`` tensors ``[n]`` at the ``n`` aligned overlap cells:
    pseudo-labels, the cells' true classes (:func:`cacnb.data.pairs.cell_labels`; ``ignore_index`` where unclear)
    and the directional weights (``w_a``: a is pulled towards b). Counts, summed by the trainer:

    * ``pl_*_overlap``: the pseudo-labels of both crops at every overlap cell with a clear class;
    * ``pl_*_selected``: at the positions the directional mask selects, the pseudo-label of the side the feature
      is pulled towards (b's where ``w_a``, a's where ``w_b``): what the confident side teaches.
    """
    (label_a, label_b), (true_a, true_b), (w_a, w_b) = pseudo, truth, weights
    known_a, known_b = true_a != ignore_index, true_b != ignore_index
    right_a, right_b = (label_a == true_a) & known_a, (label_b == true_b) & known_b
    pulled_to_b, pulled_to_a = w_a.bool() & known_b, w_b.bool() & known_a
    count = lambda mask: mask.sum().to(torch.float64)  # noqa: E731
    return {"pl_correct_overlap": count(right_a) + count(right_b),
            "pl_counted_overlap": count(known_a) + count(known_b),
            "pl_correct_selected": count(right_b & pulled_to_b) + count(right_a & pulled_to_a),
            "pl_counted_selected": count(pulled_to_b) + count(pulled_to_a)}


@torch.no_grad()
def kept_negatives_by_class(anchor_label, weight, neg_label, num_classes: int,
                            neg_filter: bool = True) -> dict[str, torch.Tensor]:
    """Per pseudo-class of the anchors that enter the loss (``weight`` 1): the summed count of negatives the
    same-label filter keeps for them, ``[K]``, and how many such anchors there are, ``[K]``. Their ratio is the
    mean kept negatives per anchor of each class (:data:`RATIO_STATS`)."""
    per_class = torch.zeros(num_classes, device=neg_label.device, dtype=torch.float64)
    per_class.index_add_(0, neg_label, torch.ones_like(neg_label, dtype=torch.float64))
    per_class = per_class.to(anchor_label.device)
    kept = len(neg_label) - per_class[anchor_label] if neg_filter else torch.full_like(
        anchor_label, len(neg_label), dtype=torch.float64)
    selected = weight.to(torch.float64)
    anchors = torch.zeros(num_classes, device=anchor_label.device, dtype=torch.float64)
    anchors.index_add_(0, anchor_label, selected)
    kept_sum = torch.zeros_like(anchors).index_add_(0, anchor_label, kept * selected)
    return {"neg_kept_sum_by_class": kept_sum, "anchors_by_class": anchors}
