"""cacnb.metrics against a hand-computed example and a straightforward numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cacnb.metrics import ConfusionMeter, confusion_matrix, iou, mean_iou, pixel_accuracy


def numpy_confusion(pred, target, k, ignore):
    cm = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t == ignore or not 0 <= t < k:
            continue
        cm[t, p] += 1
    return cm


def numpy_iou(cm):
    out = []
    for c in range(cm.shape[0]):
        tp = cm[c, c]
        union = cm[c, :].sum() + cm[:, c].sum() - tp
        out.append(tp / union if union else float("nan"))
    return np.array(out)


def test_hand_computed_example():
    # 3 classes; class 2 never appears; the 255 pixel is predicted 1 and must not count
    target = torch.tensor([[0, 0, 1], [1, 1, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 1]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    per_class = iou(cm)
    assert per_class[0].item() == pytest.approx(1 / 3)   # tp 1, fp 1, fn 1
    assert per_class[1].item() == pytest.approx(2 / 4)   # tp 2, fp 1, fn 1
    assert math.isnan(per_class[2].item())
    assert mean_iou(cm) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert pixel_accuracy(cm) == pytest.approx(3 / 5)


def test_class_predicted_but_absent_from_truth_counts_as_zero():
    cm = confusion_matrix(torch.tensor([2, 1]), torch.tensor([1, 1]), 3)
    per_class = iou(cm)
    assert math.isnan(per_class[0].item()) and per_class[2].item() == 0.0
    assert mean_iou(cm) == pytest.approx(0.25)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_numpy(seed):
    rng = np.random.default_rng(seed)
    k = 6
    target = rng.integers(0, k - 2, size=(3, 17, 23))      # classes 4 and 5 absent from the truth
    target[rng.random(target.shape) < 0.2] = 255            # ignore pixels
    pred = rng.integers(0, k - 1, size=target.shape)        # class 5 absent from the prediction too
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), k)
    ref = numpy_confusion(pred, target, k, 255)
    np.testing.assert_array_equal(cm.numpy(), ref)
    np.testing.assert_allclose(iou(cm).numpy(), numpy_iou(ref), equal_nan=True)
    assert math.isnan(iou(cm)[5].item()) and iou(cm)[4].item() == 0.0
    assert mean_iou(cm) == pytest.approx(np.nanmean(numpy_iou(ref)))
    assert pixel_accuracy(cm) == pytest.approx(np.trace(ref) / ref.sum())


def test_meter_accumulates_like_one_big_matrix():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 4, (5, 7), generator=g) for _ in range(3)]
    targets = [torch.randint(0, 4, (5, 7), generator=g) for _ in range(3)]
    meter = ConfusionMeter(4)
    for p, t in zip(preds, targets):
        meter.update(p, t)
    meter.all_reduce()  # no process group: identity
    whole = confusion_matrix(torch.stack(preds), torch.stack(targets), 4)
    assert torch.equal(meter.compute()["confusion"], whole)
    assert meter.compute()["miou"] == pytest.approx(mean_iou(whole))


def test_out_of_range_prediction_is_an_error():
    with pytest.raises(ValueError, match="predictions"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)
