"""The rows and ablations of issue 12, each checked where it changes what is computed: the loss
(loss.directional, loss.neg_filter), the pair sampler (data.context), the labeled set (train.mode = full)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cacnb.config import DataConfig, LossConfig, load_config
from cacnb.data import build_labeled_dataset, build_pair_dataset
from cacnb.data.pairs import same_window, window_iou
from cacnb.data.splits import read_split, split_lists
from cacnb.loss import (FeatureBank, cac_unsup_loss, direction_weights, directional_contrastive_loss,
                        directional_contrastive_loss_reference)


def _inputs(n=40, big_n=120, c=8, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    feat_a, feat_b, neg = (F.normalize(torch.randn(rows, c, generator=g), dim=1) for rows in (n, n, big_n))
    return dict(feat_a=feat_a, feat_b=feat_b, conf_a=torch.rand(n, generator=g), conf_b=torch.rand(n, generator=g),
                label_a=torch.randint(num_classes, (n,), generator=g),
                label_b=torch.randint(num_classes, (n,), generator=g), neg_feat=neg,
                neg_label=torch.randint(num_classes, (big_n,), generator=g))


def _losses_and_grads(fn, inputs, dtype, **options):
    args = {k: (v.detach().to(dtype).clone() if v.is_floating_point() else v) for k, v in inputs.items()}
    args["feat_a"].requires_grad_(True)
    args["feat_b"].requires_grad_(True)
    loss_a, loss_b = fn(**args, **options)
    (1.3 * loss_a + 0.7 * loss_b).backward()
    return [loss_a.detach(), loss_b.detach(), args["feat_a"].grad, args["feat_b"].grad]


@pytest.mark.parametrize("directional,neg_filter", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("chunk_size", [16, 4096])
def test_streamed_kernel_matches_the_formula_under_every_ablation(directional, neg_filter, chunk_size):
    inputs = _inputs()
    opts = dict(directional=directional, neg_filter=neg_filter)
    fast = _losses_and_grads(directional_contrastive_loss, inputs, torch.float32, chunk_size=chunk_size, **opts)
    ref = _losses_and_grads(directional_contrastive_loss_reference, inputs, torch.float64, **opts)
    for got, want in zip(fast, ref):
        want = want.to(got.dtype)
        atol = 1e-5 * max(float(want.abs().max()), 1e-30) if want.dim() else 1e-7
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


def test_non_directional_pulls_every_position_both_ways():
    inputs = _inputs()
    w_a, w_b = direction_weights(inputs["conf_a"], inputs["conf_b"], 0.75)
    assert not w_a.all() and not (w_a & w_b).any()                  # the paper's rule: one side at most
    all_a, all_b = direction_weights(inputs["conf_a"], inputs["conf_b"], 0.75, directional=False)
    assert all_a.all() and all_b.all()
    paper = _losses_and_grads(directional_contrastive_loss, inputs, torch.float32)
    both = _losses_and_grads(directional_contrastive_loss, inputs, torch.float32, directional=False)
    assert float(paper[0]) != pytest.approx(float(both[0]), rel=1e-3)
    # positions the confidence rule switches off get no gradient with it and a gradient without it
    assert not paper[2][~w_a].any() and both[2][~w_a].abs().sum(1).gt(0).all()
    assert both[3].abs().sum(1).gt(0).all()
    # without the rule every anchor counts equally: loss_a is the plain mean of the per-position InfoNCE
    q, k, neg = inputs["feat_a"].double(), inputs["feat_b"].double(), inputs["neg_feat"].double()
    pos = (q * k).sum(1, keepdim=True) / 0.1
    logits = (q @ neg.T / 0.1).masked_fill(inputs["label_a"][:, None] == inputs["neg_label"][None, :], float("-inf"))
    per_position = torch.logsumexp(torch.cat([pos, logits], 1), 1) - pos[:, 0]
    assert float(both[0]) == pytest.approx(float(per_position.mean()), rel=1e-5)


def test_without_the_filter_same_label_negatives_enlarge_the_denominator():
    inputs = _inputs()
    filtered = _losses_and_grads(directional_contrastive_loss, inputs, torch.float32)
    kept = _losses_and_grads(directional_contrastive_loss, inputs, torch.float32, neg_filter=False)
    assert float(kept[0]) > float(filtered[0]) and float(kept[1]) > float(filtered[1])
    # all negatives sharing one label with every anchor: the filter leaves only the positive (loss 0)
    same = dict(inputs, label_a=torch.zeros(40, dtype=torch.long), label_b=torch.zeros(40, dtype=torch.long),
                neg_label=torch.zeros(120, dtype=torch.long))
    assert float(directional_contrastive_loss(**same)[0]) == 0.0
    assert float(directional_contrastive_loss(**same, neg_filter=False)[0]) > 0.5


def _crop(seed, batch=2, c=8, k=5, h=8):
    g = torch.Generator().manual_seed(seed)
    return {"proj": F.normalize(torch.randn(batch, c, h, h, generator=g), dim=1),
            "logits": torch.randn(batch, k, h, h, generator=g) * 3}


@pytest.mark.parametrize("key", ["directional", "neg_filter"])
def test_loss_config_keys_reach_the_training_loss(key):
    crop_a, crop_b = _crop(0), _crop(1)
    overlap = torch.tensor([[[0, 16, 48, 64], [16, 0, 64, 48]], [[8, 8, 64, 64], [0, 0, 56, 56]]])
    flip = torch.tensor([[False, True], [True, False]])

    def loss(**changes):
        cfg = LossConfig(selected_num=50, step_save=0, chunk_size=16, **changes)
        value, stats = cac_unsup_loss(crop_a, crop_b, overlap, flip, FeatureBank(0), cfg,
                                      generator=torch.Generator().manual_seed(0))
        return float(value), stats

    paper, paper_stats = loss()
    ablated, stats = loss(**{key: False})
    assert ablated != pytest.approx(paper, rel=1e-4)
    if key == "directional":
        assert stats["frac_pos_a"] == stats["frac_pos_b"] == 1.0 and paper_stats["frac_pos_a"] < 1.0
    else:
        assert stats["neg_kept_mean"] == stats["n_neg"] > paper_stats["neg_kept_mean"]


def test_ablation_keys_default_to_the_paper():
    cfg = load_config("synthetic")
    assert cfg.loss.directional and cfg.loss.neg_filter and cfg.data.context
    off = load_config("synthetic", ["loss.directional=false", "loss.neg_filter=false", "data.context=false"])
    assert not (off.loss.directional or off.loss.neg_filter or off.data.context)


def test_same_window_is_one_window():
    g = torch.Generator().manual_seed(0)
    for h, w in ((100, 120), (40, 50), (64, 64)):
        win = same_window(h, w, 64, 8, generator=g)
        assert win.offset_a == win.offset_b and window_iou(win.offset_a, win.offset_b, 64) == 1.0
        assert win.box_a == win.box_b and not win.fallback


def test_no_context_pairs_differ_only_by_flip(synthetic_data_dir):
    base = DataConfig(data_dir=str(synthetic_data_dir), n_labeled=8, crop_size=64, base_size=96, photometric=False)
    plain = build_pair_dataset(base)
    flat = build_pair_dataset(DataConfig(**{**base.__dict__, "context": False}))
    moved = 0
    for seed in range(6):
        item = flat[(seed % len(flat), seed)]
        assert torch.equal(item["overlap"][0], item["overlap"][1])
        views = [img.flip(-1) if f else img for img, f in zip(item["image"], item["flip"])]
        torch.testing.assert_close(views[0], views[1])                 # the same pixels, only flips differ
        with_context = plain[(seed % len(plain), seed)]["overlap"]
        moved += int(not torch.equal(with_context[0], with_context[1]))
    assert moved > 0                                                   # the default sampler does move the crops


def test_full_mode_labels_every_training_image(synthetic_data_dir):
    cfg = load_config("synthetic", [f"data.data_dir={synthetic_data_dir}", "data.n_labeled=8", "train.mode=full"])
    assert cfg.run_dir.name == "synthetic_full"
    labeled, unlabeled, _ = split_lists(cfg.data)
    full = build_labeled_dataset(cfg.data, all_train=True)
    assert full.files.pairs == labeled + unlabeled
    assert len(build_labeled_dataset(cfg.data)) == len(labeled) == 8


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_full_mode_trainer_trains_on_every_image_without_the_projector(synthetic_data_dir, tmp_path, one_thread):
    from cacnb.train import Trainer

    cfg = load_config("synthetic", [f"data.data_dir={synthetic_data_dir}", "data.n_labeled=8", "train.mode=full",
                                    f"train.out_dir={tmp_path}", "data.num_workers=0"])
    trainer = Trainer(cfg, torch.device("cpu"))
    lists = split_lists(cfg.data)
    assert len(trainer.labeled) == len(lists.labeled) + len(lists.unlabeled)
    for role, pairs in lists.items():                   # rank 0 records the exact lists the run trains with
        assert read_split(tmp_path / "synthetic_full" / "splits" / f"{role}.txt") == pairs
    assert trainer.pairs is None and not any(p.requires_grad for p in trainer.model.projector.parameters())
    assert trainer.run_dir == tmp_path / "synthetic_full"
