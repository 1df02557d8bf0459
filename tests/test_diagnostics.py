"""Training diagnostics: pseudo-label accuracy against hidden labels and kept negatives per anchor class. They are
logged, never part of the loss: changing the hidden labels leaves every weight bit-identical."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from cacnb.config import load_config
from cacnb.engine import build_optimizer, train_step
from cacnb.loss import FeatureBank, kept_negatives_by_class, pseudo_label_stats
from cacnb.model import TrainingForward, build_model
from cacnb.train import with_ratios

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pseudo_label_stats_by_hand():
    label_a, label_b = torch.tensor([1, 2, 3, 0]), torch.tensor([1, 2, 0, 0])
    true = torch.tensor([1, 0, 3, 255])                      # the last cell's class is unclear
    w_a, w_b = torch.tensor([1, 1, 0, 1]), torch.tensor([0, 0, 1, 0])
    s = pseudo_label_stats((label_a, label_b), (true, true), (w_a, w_b))
    assert s["pl_counted_overlap"] == 6 and s["pl_correct_overlap"] == 3      # a: cells 0, 2; b: cell 0
    # a pulled to b at cells 0 and 1 (cell 3 unclear): b's labels 1 (right) and 2 (wrong); b pulled to a at
    # cell 2: a's label 3 (right)
    assert s["pl_counted_selected"] == 3 and s["pl_correct_selected"] == 2


def test_kept_negatives_by_class_by_hand():
    anchors = torch.tensor([0, 0, 1, 2])
    weight = torch.tensor([1, 0, 1, 1])
    negatives = torch.tensor([0, 0, 0, 1, 2, 2])
    s = kept_negatives_by_class(anchors, weight, negatives, num_classes=4)
    assert s["anchors_by_class"].tolist() == [1, 1, 1, 0]
    assert s["neg_kept_sum_by_class"].tolist() == [3, 5, 4, 0]               # 6 minus the same-label ones
    off = kept_negatives_by_class(anchors, weight, negatives, num_classes=4, neg_filter=False)
    assert off["neg_kept_sum_by_class"].tolist() == [6, 6, 6, 0]


def test_ratios_are_the_ratio_of_the_interval_sums():
    means = {"pl_correct_overlap": 3.0, "pl_counted_overlap": 4.0, "pl_correct_selected": 0.0,
             "pl_counted_selected": 0.0, "neg_kept_sum_by_class": [10.0, 0.0], "anchors_by_class": [2.0, 0.0],
             "loss": 1.0}
    out = with_ratios(means)
    assert out["pl_acc_overlap"] == 0.75 and out["pl_acc_selected"] is None
    assert out["neg_kept_by_class"] == [5.0, None] and out["anchors_by_class"] == [2.0, 0.0]
    assert "pl_correct_overlap" not in out and out["loss"] == 1.0


def _batches(seed: int, crop: int = 32, k: int = 21):
    g = torch.Generator().manual_seed(seed)
    batch_l = {"image": torch.randn(2, 3, crop, crop, generator=g),
               "label": torch.randint(0, k, (2, crop, crop), generator=g)}
    overlap = torch.tensor([[0, 0, 16, 16], [16, 16, 32, 32]]).expand(2, 2, 4).clone()
    batch_u = {"image": torch.randn(2, 2, 3, crop, crop, generator=g), "overlap": overlap,
               "flip": torch.tensor([[False, True], [True, False]]),
               # one class per stride-8 cell, so every cell has a clear hidden class
               "label": torch.randint(0, k, (2, 2, crop // 8, crop // 8), generator=g).repeat_interleave(8, -1)
               .repeat_interleave(8, -2)}
    return batch_l, batch_u


def _train(hide_labels: bool, steps: int = 3):
    cfg = load_config("synthetic", {"model.pretrained": None, "model.proj_dim": 16, "loss.selected_num": 32,
                                    "loss.pos_thresh": 0.0})  # every position pulled: the loss is never empty
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_model(cfg)
    optimizer, bank = build_optimizer(model, cfg), FeatureBank(1)
    net, gen = TrainingForward(model), torch.Generator().manual_seed(0)
    stats = []
    for step in range(steps):
        batch_l, batch_u = _batches(step)
        if hide_labels:  # as a dataset without labels for its unlabeled images would give
            batch_u["label"] = torch.full_like(batch_u["label"], 255)
        torch.manual_seed(100 + step)  # dropout
        result = train_step(net, batch_l, batch_u, cfg, bank=bank, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        stats.append({k: v.clone() for k, v in result.stats.items()})
    return copy.deepcopy(model.state_dict()), stats


def test_the_hidden_labels_never_reach_the_loss():
    weights, stats = _train(hide_labels=False)
    other_weights, other_stats = _train(hide_labels=True)
    assert weights.keys() == other_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], other_weights[name]), name            # bit-identical
    # ... although the diagnostic did read them
    assert all(s["pl_counted_overlap"] == 2 * 2 * 4 for s in stats)          # 2 pairs x 2 crops x 2x2 cells
    assert all(s["pl_counted_overlap"] == 0 for s in other_stats)
