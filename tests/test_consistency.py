"""cacnb.consistency: cross-context agreement and feature consistency, on hand-made models and features."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cacnb.config import load_config
from cacnb.consistency import feature_consistency, measure, pair_predictions, prediction_agreement
from cacnb.data import build_eval_pair_dataset
from cacnb.data.pairs import cell_labels
from cacnb.loss import overlap_index

pytestmark = pytest.mark.usefixtures("one_thread")
K = 21


class PixelModel(torch.nn.Module):
    """Prediction and features depend only on each pixel's colour (a 1x1 map), never on where it sits in the
    crop: the two crops of a pair must agree everywhere in their overlap."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Conv2d(3, K, 1)
        self.embed = torch.nn.Conv2d(3, 16, 1)

    def logits_and_features(self, x):
        return self.head(x), F.avg_pool2d(self.embed(x), 8)


class PositionModel(PixelModel):
    """Predicts by the column inside the crop (a band every 16 px) and encodes that column in its features: it
    depends on where the crop was placed, not on what it shows."""

    def logits_and_features(self, x):
        b, _, h, w = x.shape
        cols = torch.arange(w, device=x.device)
        band = F.one_hot((cols // 16) % K, K).T.float()                      # [K, W]
        angle = 0.5 * torch.arange(w // 8, device=x.device).float()          # one per stride-8 column
        feat = torch.stack([angle.cos(), angle.sin()])[:, None, :]           # [2, 1, w8]
        return 10 * band[None, :, None, :].expand(b, K, h, w), feat.expand(b, 2, h // 8, w // 8)


@pytest.fixture(scope="module")
def pairs(synthetic_data_dir):
    cfg = load_config("synthetic", {"data.data_dir": str(synthetic_data_dir), "data.crop_size": 64,
                                    "data.base_size": 96})
    return build_eval_pair_dataset(cfg.data, "val")


def test_a_model_that_ignores_position_agrees_everywhere(pairs):
    scores = measure(PixelModel(), pairs, K, pairs_per_image=2)
    assert scores["pixels"] > 0 and scores["agreement"] == 1.0
    assert scores["pos_sim"] == pytest.approx(1.0, abs=1e-5)   # the same pixels pooled: the same feature
    assert scores["pos_cells"] > 0 and scores["num_images"] == len(pairs)


def test_a_model_that_depends_on_the_crop_position_agrees_less(pairs):
    scores = measure(PositionModel(), pairs, K, pairs_per_image=2)
    assert 0.0 < scores["agreement"] < 0.9
    assert scores["pos_sim"] < 0.999


def test_a_run_trained_without_context_is_measured_on_two_context_pairs(synthetic_data_dir, pairs):
    """data.context=false trains on two crops of one window; its cross-context agreement must still be measured
    on the two-window pairs every other run gets, or the ablation row would compare flips of one window."""
    cfg = load_config("synthetic", {"data.data_dir": str(synthetic_data_dir), "data.crop_size": 64,
                                    "data.base_size": 96, "data.context": False})
    no_context = build_eval_pair_dataset(cfg.data, "val")
    assert no_context.context
    assert measure(PositionModel(), no_context, K) == measure(PositionModel(), pairs, K)


def test_the_pairs_are_the_same_on_every_call(pairs):
    first, again = measure(PixelModel(), pairs, K), measure(PixelModel(), pairs, K)
    assert first == again


def test_prediction_agreement_unflips_the_crops():
    label = torch.zeros(1, 2, 8, 8, dtype=torch.long)
    label[0, :, :, 0] = 255                                     # one unlabeled column
    pred = torch.arange(8).expand(1, 2, 8, 8).clone()           # the class is the column
    pred[0, 1] = pred[0, 1].flip(-1)                             # crop b as given is mirrored
    overlap = torch.tensor([[[0, 0, 8, 8], [0, 0, 8, 8]]])
    agree, pixels, crops = prediction_agreement(pred, label, overlap, torch.tensor([[False, True]]))
    assert (agree, pixels) == (56, 56) and len(crops) == 2
    agree, _, _ = prediction_agreement(pred, label, overlap, torch.tensor([[False, False]]))
    assert agree == 0                                            # without the un-flip nothing would agree


def test_feature_consistency_on_hand_made_features():
    # two 1x2 maps; cell 0 of each is class 1, cell 1 class 2; overlap: cell 0 of a = cell 0 of b
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    diag = F.normalize(torch.tensor([1.0, 1.0]), dim=0)
    feat_a = torch.stack([e0, e1], 1).view(1, 2, 1, 2)           # [B, C, h, w]
    feat_b = torch.stack([diag, -e0], 1).view(1, 2, 1, 2)
    cls = torch.tensor([[[1, 2]]])
    index = torch.tensor([0])
    sums = feature_consistency(feat_a, feat_b, cls, cls, index, index)
    assert sums["pos"] == pytest.approx(float(e0 @ diag)) and sums["pos_cells"] == 1
    # a's anchor e0 against b's class-2 cell (-e0): -1; b's anchor diag against a's class-2 cell e1: 0.7071
    assert sums["other"] == pytest.approx(-1.0 + float(diag @ e1)) and sums["other_cells"] == 2
    unclear = feature_consistency(feat_a, feat_b, torch.tensor([[[255, 2]]]), cls, index, index)
    assert unclear["pos_cells"] == 0 and unclear["other_cells"] == 0


def test_cells_of_the_overlap_line_up_with_the_labels(pairs):
    item = pairs[(0, 0)]
    cls = cell_labels(item["label"], K)
    index_a, index_b = overlap_index(item["overlap"][None], item["flip"][None], 1, *cls.shape[-2:])
    same = cls[0].reshape(-1)[index_a] == cls[1].reshape(-1)[index_b]
    assert bool(same.all())                                      # photometric off: identical content


def test_pair_predictions_are_in_raw_orientation(pairs):
    item = pairs[(1, 0)]
    pred_a, pred_b = pair_predictions(PixelModel(), item)
    (t0, l0, b0, r0), (t1, l1, b1, r1) = item["overlap"].tolist()
    assert torch.equal(pred_a[t0:b0, l0:r0], pred_b[t1:b1, l1:r1])


def test_the_figures_pair_shows_objects_and_the_queries_sit_on_them(pairs):
    from cacnb.data.pairs import overlap_cell_classes, pair_showing_objects
    from cacnb.viz import default_queries

    index, item = pair_showing_objects(pairs, K)
    classes = overlap_cell_classes(item, K)
    assert int(((classes != 0) & (classes != 255)).sum()) >= 4 and bool((classes == 0).any())
    assert torch.equal(item["image"], pairs[(index, 0)]["image"])          # deterministic
    h8 = item["image"].shape[-1] // 8
    cells = cell_labels(item["label"][:1], K)[0]
    queries = default_queries(item, (h8, h8), 3, num_classes=K)
    assert len(queries) == 3 and cells[queries[0]] not in (0, 255)          # the first query is on an object
    assert len(set(queries)) == 3
