"""The CAC loss: the streamed kernel against the plain formula, overlap gathering, sampling, the bank, the glue."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from cacnb.config import LossConfig
from cacnb.loss import (
    FeatureBank,
    cac_unsup_loss,
    directional_contrastive_loss,
    directional_contrastive_loss_reference,
    direction_weights,
    gather_overlap,
    negatives_per_crop,
    sample_crop_negatives,
    sample_negatives,
)


def make_inputs(n, big_n, c, num_classes, seed, normalise=True, conf=None):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(rows, c, generator=g) for rows in (n, n, big_n)]
    if normalise:
        feats = [F.normalize(f, dim=1) for f in feats]
    conf_a, conf_b = (torch.rand(n, generator=g) for _ in range(2)) if conf is None else conf
    label_a, label_b = (torch.randint(num_classes, (n,), generator=g) for _ in range(2))
    neg_label = torch.randint(num_classes, (big_n,), generator=g)
    return dict(feat_a=feats[0], feat_b=feats[1], conf_a=conf_a, conf_b=conf_b, label_a=label_a,
                label_b=label_b, neg_feat=feats[2], neg_label=neg_label)


def fast_and_reference(inputs, loss_weights=(1.3, 0.7), **options):
    """Losses and gradients of the fast kernel (fp32) and of the reference (fp64)."""
    results = []
    for fn, dtype in ((directional_contrastive_loss, torch.float32),
                      (directional_contrastive_loss_reference, torch.float64)):
        args = {k: (v.detach().to(dtype).clone() if v.is_floating_point() else v) for k, v in inputs.items()}
        args["feat_a"].requires_grad_(True)
        args["feat_b"].requires_grad_(True)
        loss_a, loss_b = fn(**args, **(options if fn is directional_contrastive_loss else {}))
        (loss_weights[0] * loss_a + loss_weights[1] * loss_b).backward()
        results.append((loss_a.detach(), loss_b.detach(), args["feat_a"].grad, args["feat_b"].grad))
    return results


def assert_matches(fast, ref, rtol=1e-5):
    for got, want in zip(fast, ref):
        want = want.to(got.dtype)
        atol = rtol * max(float(want.abs().max()), 1e-30) if want.dim() else 1e-7
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("seed,n,big_n,c,num_classes,chunk_size", [
    (0, 50, 300, 16, 5, 64),      # chunks smaller than the class blocks
    (1, 50, 300, 16, 5, 10_000),  # one chunk larger than N
    (2, 200, 700, 32, 21, 128),
    (3, 7, 33, 8, 3, 1),          # one negative per chunk
    (4, 64, 256, 16, 1, 100),     # one class: every negative filtered for every anchor
])
@pytest.mark.parametrize("stabilizer", ["auto", "running", "bound"])
def test_fast_loss_matches_formula(seed, n, big_n, c, num_classes, chunk_size, stabilizer):
    inputs = make_inputs(n, big_n, c, num_classes, seed)
    fast, ref = fast_and_reference(inputs, chunk_size=chunk_size, stabilizer=stabilizer)
    assert float(ref[0]) > 0 or num_classes == 1
    assert_matches(fast, ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_unnormalised_inputs_use_the_running_max(seed):
    inputs = make_inputs(60, 200, 8, 4, seed, normalise=False)  # logits span far more than fp32 exp allows
    for k in ("feat_a", "feat_b", "neg_feat"):
        inputs[k] = inputs[k] * 3
    fast, ref = fast_and_reference(inputs, chunk_size=32)
    assert float(ref[0]) > 10
    assert_matches(fast, ref)


@pytest.mark.parametrize("stabilizer", ["bound", "running"])
def test_float64_inputs_match_the_formula_to_float64_precision(stabilizer):
    """fp64 features give fp64 losses and gradients equal to the plain formula in fp64: no step of the kernel
    (e.g. the per-anchor weight 1 / n, which fp32 rounds by up to ~6e-8; here n = 23 and 29) may pass through
    fp32."""
    inputs = make_inputs(120, 400, 16, 5, 7)
    args = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    w_a, w_b = direction_weights(args["conf_a"], args["conf_b"], 0.75)
    # counts whose reciprocals fp32 cannot hold exactly, so an fp32 detour would show at ~1e-8
    assert {int(w_a.sum()), int(w_b.sum())}.isdisjoint({0, 1, 2, 4, 8, 16, 32, 64})
    results = []
    for fn, options in ((directional_contrastive_loss, {"chunk_size": 64, "stabilizer": stabilizer}),
                        (directional_contrastive_loss_reference, {})):
        feats = {k: args[k].clone().requires_grad_(True) for k in ("feat_a", "feat_b")}
        loss_a, loss_b = fn(**{**args, **feats}, **options)
        (1.3 * loss_a + 0.7 * loss_b).backward()
        results.append((loss_a.detach(), loss_b.detach(), feats["feat_a"].grad, feats["feat_b"].grad))
    for got, want in zip(*results):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_bf16_option_is_close():
    inputs = make_inputs(64, 512, 32, 5, 0)
    fast, ref = fast_and_reference(inputs, precision="bf16", chunk_size=100)
    torch.testing.assert_close(fast[0], ref[0].float(), rtol=2e-2, atol=2e-2)


def test_one_direction_dominating_keeps_the_other_exact():
    # 3999 anchors pull b with large l_i and one pulls a with a small one: loss_a must not be total - sum_b.
    n = 4000
    conf = (torch.full((n,), 0.9), torch.full((n,), 0.2))
    conf[0][0], conf[1][0] = 0.2, 0.9                     # position 0 alone pulls a towards b
    inputs = make_inputs(n, 64, 16, 4, 0, conf=conf)
    inputs["feat_b"][1:] = -inputs["feat_a"][1:]          # pos/T = -10 for direction b: l_i around 10
    inputs["feat_b"][0] = inputs["feat_a"][0]             # pos/T = +10 for direction a: l_i below 1
    fast, ref = fast_and_reference(inputs)
    assert float(ref[1]) > 5 * float(ref[0]) > 0
    for got, want in zip(fast[:2], ref[:2]):
        assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_no_positive_passes_gives_zero_loss_and_gradient():
    n = 20
    conf = (torch.full((n,), 0.5), torch.rand(n) * 0.7)  # nothing above 0.75
    inputs = make_inputs(n, 40, 8, 3, 0, conf=conf)
    fast, ref = fast_and_reference(inputs)
    for loss in fast[:2]:
        assert float(loss) == 0.0
    for grad in fast[2:]:
        assert torch.isfinite(grad).all() and not grad.any()
    assert_matches(fast, ref)


def test_every_negative_filtered_leaves_only_the_positive():
    inputs = make_inputs(10, 30, 8, 3, 0, conf=(torch.full((10,), 0.8), torch.full((10,), 0.9)))
    inputs["label_a"][:] = 2
    inputs["neg_label"][:] = 2
    fast, ref = fast_and_reference(inputs)
    assert float(fast[0]) == 0.0 and not fast[2].any()
    assert_matches(fast, ref)


def test_single_anchor_and_no_negatives():
    one = make_inputs(1, 5, 4, 3, 0, conf=(torch.tensor([0.2]), torch.tensor([0.9])))
    fast, ref = fast_and_reference(one)
    assert float(fast[0]) > 0 and float(fast[1]) == 0.0
    assert_matches(fast, ref)
    # by hand: l = -log(e^{pos} / (e^{pos} + Σ_kept e^{neg}))
    q, k = one["feat_a"][0], one["feat_b"][0]
    kept = one["neg_feat"][one["neg_label"] != one["label_a"][0]]
    logits = torch.cat([(q @ k)[None], kept @ q]) / 0.1
    assert float(fast[0]) == pytest.approx(float(torch.logsumexp(logits, 0) - logits[0]), rel=1e-5)

    none = make_inputs(12, 0, 4, 3, 1, conf=(torch.full((12,), 0.8), torch.full((12,), 0.9)))
    fast, ref = fast_and_reference(none)
    assert float(fast[0]) == 0.0 and not fast[2].any()


def test_gradient_reaches_only_the_less_confident_side():
    inputs = make_inputs(30, 60, 8, 4, 0)
    inputs = {k: v.clone() for k, v in inputs.items()}
    for k in ("feat_a", "feat_b", "neg_feat", "conf_a", "conf_b"):
        inputs[k].requires_grad_(True)
    loss_a, loss_b = directional_contrastive_loss(**inputs)
    w_a = (inputs["conf_b"] > 0.75) & (inputs["conf_b"] > inputs["conf_a"])
    assert 0 < int(w_a.sum()) < 30
    grads = torch.autograd.grad(loss_a, [inputs[k] for k in ("feat_a", "feat_b", "neg_feat", "conf_a")],
                                allow_unused=True, retain_graph=True)
    grad_a, grad_b, grad_neg, grad_conf = grads
    assert grad_a[w_a].abs().sum(1).gt(0).all()      # every weighted anchor moves
    assert not grad_a[~w_a].any()                     # the others do not
    assert grad_b is None or not grad_b.any()         # the positive is a stop-gradient target
    assert grad_neg is None or not grad_neg.any()
    assert grad_conf is None or not grad_conf.any()
    grad_a2, grad_b2 = torch.autograd.grad(loss_b, [inputs["feat_a"], inputs["feat_b"]], allow_unused=True)
    assert grad_a2 is None or not grad_a2.any()
    assert grad_b2.any()


def test_autograd_never_holds_the_full_matrix():
    n, big_n = 40, 500
    inputs = make_inputs(n, big_n, 8, 4, 0, conf=(torch.full((n,), 0.8), torch.full((n,), 0.9)))
    inputs["feat_a"].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss_a, _ = directional_contrastive_loss(**inputs, chunk_size=64)
    loss_a.backward()
    assert saved and max(saved) < n * big_n // 4


# ---------------------------------------------------------------------------------------------------------------
# overlap gathering


def _position_maps(boxes, flips, stride, size):
    """Per-crop maps whose value at each cell is the image position it shows, flipped as the crops are."""
    h = size // stride
    maps = []
    for (y, x), flip in zip(boxes, flips):
        rows = torch.arange(h)[:, None] + y // stride
        cols = torch.arange(h)[None, :] + x // stride
        value = (rows * 1000 + cols).float()                # [h, h]
        maps.append(value.flip(-1) if flip else value)
    return maps


def test_gather_overlap_undoes_flips_and_aligns_positions():
    stride, size = 8, 64
    pairs = [((0, 0), (16, 24), (False, True)), ((8, 40), (0, 0), (True, True)), ((24, 8), (24, 8), (True, False))]
    maps_a, maps_b, overlap, flip, expected = [], [], [], [], []
    for pos_a, pos_b, fl in pairs:
        top, left = max(pos_a[0], pos_b[0]), max(pos_a[1], pos_b[1])
        bottom, right = min(pos_a[0], pos_b[0]) + size, min(pos_a[1], pos_b[1]) + size
        overlap.append([[top - p[0], left - p[1], bottom - p[0], right - p[1]] for p in (pos_a, pos_b)])
        flip.append(list(fl))
        a, b = _position_maps([pos_a, pos_b], fl, stride, size)
        maps_a.append(a)
        maps_b.append(b)
        rows = torch.arange(top // stride, bottom // stride)[:, None]
        cols = torch.arange(left // stride, right // stride)[None, :]
        expected.append((rows * 1000 + cols).reshape(-1).float())
    x_a, x_b = torch.stack(maps_a), torch.stack(maps_b)          # [B, h, w]
    overlap, flip = torch.tensor(overlap), torch.tensor(flip)
    got_a, got_b = gather_overlap(x_a, x_b, overlap, flip, stride)
    torch.testing.assert_close(got_a, torch.cat(expected), rtol=0, atol=0)
    torch.testing.assert_close(got_b, torch.cat(expected), rtol=0, atol=0)
    # channels travel with their position
    feat_a, feat_b = (torch.stack([x, -x], 1) for x in (x_a, x_b))   # [B, 2, h, w]
    fa, fb = gather_overlap(feat_a, feat_b, overlap, flip, stride)
    assert fa.shape == (len(got_a), 2)
    torch.testing.assert_close(fa, torch.stack([got_a, -got_a], 1))
    torch.testing.assert_close(fb, fa)


def test_gather_overlap_on_real_pairs(synthetic_data_dir):
    from cacnb.config import load_config
    from cacnb.data import build_pair_dataset

    cfg = load_config("synthetic", {"data.data_dir": str(synthetic_data_dir), "data.n_labeled": 4,
                                    "data.crop_size": 64, "data.base_size": 80, "data.photometric": False})
    pairs = build_pair_dataset(cfg.data)
    for index in range(4):
        item = pairs[(index, index)]
        batch = {k: item[k][None] for k in ("image", "label", "overlap", "flip")}
        # at stride 1 the boxes address pixels: both crops must show the same pixels and labels
        img_a, img_b = gather_overlap(batch["image"][:, 0], batch["image"][:, 1], batch["overlap"], batch["flip"], 1)
        lab_a, lab_b = gather_overlap(batch["label"][:, 0], batch["label"][:, 1], batch["overlap"], batch["flip"], 1)
        assert len(img_a) > 0
        torch.testing.assert_close(img_a, img_b)
        assert torch.equal(lab_a, lab_b)


def test_gather_overlap_rejects_bad_boxes():
    x = torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="multiples of the stride"):
        gather_overlap(x, x, torch.tensor([[[0, 0, 12, 16], [0, 0, 12, 16]]]), torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="equal size"):
        gather_overlap(x, x, torch.tensor([[[0, 0, 16, 16], [0, 0, 8, 16]]]), torch.zeros(1, 2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------
# negatives and the bank


def test_sample_negatives_without_replacement_and_clamped():
    b, c, h, w = 2, 3, 4, 5
    position = torch.arange(b * h * w, dtype=torch.float32).reshape(b, h, w)
    feat = torch.stack([position, position * 2, position * 3], 1).requires_grad_(True)    # [B, c, h, w]
    label = position.long() % 7
    neg_feat, neg_label = sample_negatives(feat, label, 25, torch.Generator().manual_seed(0))
    assert neg_feat.shape == (25, c) and not neg_feat.requires_grad
    picked = neg_feat[:, 0].long()
    assert len(set(picked.tolist())) == 25                                   # no repeats
    torch.testing.assert_close(neg_feat[:, 1], neg_feat[:, 0] * 2)           # rows are whole positions
    assert torch.equal(neg_label, picked % 7)                                # labels follow their rows
    again, _ = sample_negatives(feat, label, 25, torch.Generator().manual_seed(0))
    assert torch.equal(again, neg_feat)                                      # the generator decides
    every, _ = sample_negatives(feat, label, 1000, torch.Generator().manual_seed(1))
    assert sorted(every[:, 0].long().tolist()) == list(range(b * h * w))     # few positions: take them all


@pytest.mark.parametrize("step_save", [0, 1, 2])
def test_negatives_per_crop(step_save):
    cfg = LossConfig(selected_num=6400, step_save=step_save)
    assert negatives_per_crop(cfg, 1) == negatives_per_crop(cfg, 4) == 6400   # official: grows with ranks
    cfg.neg_total = 2 * 6400 * (step_save + 1) * 4
    for world in (1, 2, 4):
        per_crop = negatives_per_crop(cfg, world)
        assert per_crop * 2 * world * (step_save + 1) == cfg.neg_total
    cfg.neg_total = 3
    with pytest.raises(ValueError, match="neg_total"):
        negatives_per_crop(cfg, 2)


def _roundtrip(bank, step_save):
    buf = io.BytesIO()
    torch.save({"bank": bank.state_dict()}, buf)
    buf.seek(0)
    fresh = FeatureBank(step_save)
    fresh.load_state_dict(torch.load(buf, weights_only=True)["bank"])
    return fresh


@pytest.mark.parametrize("step_save", [0, 1, 2])
def test_feature_bank_keeps_the_last_sets_and_round_trips(step_save):
    bank = FeatureBank(step_save)
    sets = [(torch.full((rows, 4), float(i)), torch.full((rows,), i)) for i, rows in enumerate([3, 5, 2, 4, 6])]
    for step, (feat, label) in enumerate(sets):
        all_feat, all_label = bank.push(feat, label)
        kept = sets[max(0, step - step_save):step + 1]
        assert len(bank) == len(kept)
        assert torch.equal(all_feat, torch.cat([f for f, _ in kept]))
        assert torch.equal(all_label, torch.cat([lab for _, lab in kept]))
        fresh = _roundtrip(bank, step_save)                  # sets of different lengths, into an empty bank
        assert len(fresh) == len(bank)
        for (f1, l1), (f2, l2) in zip(fresh.sets(), bank.sets()):
            assert torch.equal(f1, f2) and torch.equal(l1, l2)
    extra = (torch.ones(1, 4), torch.ones(1, dtype=torch.long))
    assert torch.equal(fresh.push(*extra)[0], bank.push(*extra)[0])   # a restored bank continues identically


# ---------------------------------------------------------------------------------------------------------------
# the glue


def _crop_outputs(batch, c, k, h, seed):
    g = torch.Generator().manual_seed(seed)
    proj = F.normalize(torch.randn(batch, c, h, h, generator=g), dim=1).requires_grad_(True)
    logits = (torch.randn(batch, k, h, h, generator=g) * 3).requires_grad_(True)
    return {"proj": proj, "logits": logits}


def test_cac_unsup_loss_composes_the_pieces():
    cfg = LossConfig(selected_num=50, step_save=1, weight_unsup=0.5, chunk_size=16)
    crop_a, crop_b = _crop_outputs(2, 8, 5, 8, 0), _crop_outputs(2, 8, 5, 8, 1)
    overlap = torch.tensor([[[0, 16, 48, 64], [16, 0, 64, 48]], [[8, 8, 64, 64], [0, 0, 56, 56]]])
    flip = torch.tensor([[False, True], [True, False]])
    bank = FeatureBank(cfg.step_save)
    loss, stats = cac_unsup_loss(crop_a, crop_b, overlap, flip, bank, cfg, generator=torch.Generator().manual_seed(0))
    assert set(stats) >= {"loss_a", "loss_b", "n_overlap", "frac_pos_a", "frac_pos_b", "neg_kept_mean", "n_neg"}
    # tensors (0-d, or [K] per class), read by the trainer once per log line (no host sync in the step)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in stats.values())
    assert all(v.dim() == 0 for k, v in stats.items() if not k.endswith("_by_class"))
    assert stats["anchors_by_class"].shape == stats["neg_kept_sum_by_class"].shape == (crop_a["logits"].shape[1],)
    assert stats["n_overlap"] == 6 * 6 + 7 * 7 and stats["n_neg"] == 100 and len(bank) == 1
    assert float(loss.detach()) == pytest.approx(0.5 * float(stats["loss_a"] + stats["loss_b"]), rel=1e-6)
    assert 0 < stats["neg_kept_mean"] < 100
    loss.backward()
    assert crop_a["proj"].grad.any() and crop_a["logits"].grad is None        # pseudo-labels carry no gradient
    # the same numbers from the pieces and the plain formula
    conf_a, label_a = torch.softmax(crop_a["logits"].detach(), 1).max(1)
    conf_b, label_b = torch.softmax(crop_b["logits"].detach(), 1).max(1)
    pieces = [gather_overlap(x, y, overlap, flip) for x, y in ((crop_a["proj"].detach(), crop_b["proj"].detach()),
                                                               (conf_a, conf_b), (label_a, label_b))]
    ref_a, ref_b = directional_contrastive_loss_reference(pieces[0][0], pieces[0][1], pieces[1][0], pieces[1][1],
                                                          pieces[2][0], pieces[2][1], bank.feat, bank.label)
    assert float(stats["loss_a"]) == pytest.approx(float(ref_a), rel=1e-5)
    assert float(stats["loss_b"]) == pytest.approx(float(ref_b), rel=1e-5)
    # neg_kept_mean averages over the anchors that enter the loss only
    w_a, w_b = direction_weights(pieces[1][0], pieces[1][1], cfg.pos_thresh)
    anchors = torch.cat([pieces[2][0][w_a], pieces[2][1][w_b]])
    kept = (anchors[:, None] != bank.label[None, :]).sum(1).float()
    assert float(stats["neg_kept_mean"]) == pytest.approx(float(kept.mean()), rel=1e-6)
    _, stats2 = cac_unsup_loss(crop_a, crop_b, overlap, flip, bank, cfg, generator=torch.Generator().manual_seed(1))
    assert stats2["n_neg"] == 200 and len(bank) == 2


def test_neg_kept_mean_is_zero_when_no_anchor_enters():
    cfg = LossConfig(selected_num=10, step_save=0, pos_thresh=1.1)       # nothing is confident enough
    crop_a, crop_b = _crop_outputs(1, 8, 5, 8, 0), _crop_outputs(1, 8, 5, 8, 1)
    overlap, flip = torch.tensor([[[0, 0, 64, 64], [0, 0, 64, 64]]]), torch.tensor([[False, False]])
    _, stats = cac_unsup_loss(crop_a, crop_b, overlap, flip, FeatureBank(0), cfg,
                              generator=torch.Generator().manual_seed(0))
    assert stats["neg_kept_mean"] == 0.0 and stats["loss_a"] == stats["loss_b"] == 0.0


def test_sample_crop_negatives_uses_the_training_count():
    cfg = LossConfig(selected_num=999, neg_total=40, step_save=1)        # neg_total wins: 40 // (2 * 2) = 10
    crops = [(c["proj"], c["logits"].argmax(1)) for c in (_crop_outputs(1, 8, 5, 8, s) for s in (0, 1))]
    feat, label = sample_crop_negatives(crops, cfg, 1, torch.Generator().manual_seed(0))
    assert feat.shape == (2 * negatives_per_crop(cfg, 1), 8) == (20, 8) and label.shape == (20,)
