"""The CUDA path against the CPU: the CAC loss (fp32, tf32, bf16, under autocast), one training step (fp32,
channels_last, bf16 autocast), the feature bank, evaluation, and a training run stopped and resumed.

Each test computes the same thing on the GPU and on the CPU and compares them within the tolerance its docstring
states. fp32 comparisons turn TF32 off for the duration (cuDNN convolutions use it by default, which alone moves
them by ~1e-3); the tf32 and bf16 options are compared with their own, wider tolerances. Dropout is switched off
where a whole model is compared, because the GPU draws its masks from another random stream than the CPU.

Skipped without CUDA; ``pytest -m cuda`` selects them, and ``make gpu-check`` (benchmarks/gpu_check.py) runs
them first on a GPU machine.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cacnb.config import load_config
from cacnb.contrastive import directional_contrastive_loss
from cacnb.engine import build_optimizer, train_step
from cacnb.evaluate import evaluate
from cacnb.loss import FeatureBank
from cacnb.model import TrainingForward, build_model
from cacnb.runlog import read_metrics, split_kinds
from cacnb.train import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() "
                                 "is False); run on a GPU machine with `make gpu-check` or `pytest -m cuda`")]

GPU, CPU = torch.device("cuda"), torch.device("cpu")
RANDOM_WEIGHTS = "ignore:model.pretrained is None:UserWarning"


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 in convolutions or matmuls while a test runs (restored afterwards)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` over all elements, in fp64 on the CPU (0 when both are zero)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------------------------
# the loss


def loss_inputs(n=2048, big_n=16_384, c=128, classes=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = [F.normalize(torch.randn(rows, c, generator=g), dim=1) for rows in (n, n, big_n)]
    conf = [torch.rand(n, generator=g) for _ in range(2)]
    labels = [torch.randint(classes, (rows,), generator=g) for rows in (n, n, big_n)]
    return dict(feat_a=feat[0], feat_b=feat[1], conf_a=conf[0], conf_b=conf[1], label_a=labels[0],
                label_b=labels[1], neg_feat=feat[2], neg_label=labels[2])


def loss_and_grads(inputs, device, dtype=torch.float32, **options):
    """(loss_a, loss_b, d/dfeat_a, d/dfeat_b) of ``1.3 loss_a + 0.7 loss_b`` on ``device``, back on the CPU."""
    feats = ("feat_a", "feat_b", "neg_feat")  # confidences stay fp32, as confidence_and_pseudo_label makes them
    args = {k: v.to(device, dtype if k in feats else v.dtype, copy=True) for k, v in inputs.items()}
    for k in ("feat_a", "feat_b"):
        args[k].requires_grad_(True)
    loss_a, loss_b = directional_contrastive_loss(**args, num_classes=21, **options)
    (1.3 * loss_a + 0.7 * loss_b).backward()
    return [t.detach().cpu() for t in (loss_a, loss_b, args["feat_a"].grad, args["feat_b"].grad)]


def assert_loss_close(got, want, loss_rtol, grad_rtol):
    for name, g, w in zip(("loss_a", "loss_b"), got[:2], want[:2]):
        assert abs(float(g) - float(w)) <= loss_rtol * abs(float(w)), (name, float(g), float(w))
    for name, g, w in zip(("grad_a", "grad_b"), got[2:], want[2:]):
        assert rel_err(g, w) <= grad_rtol, (name, rel_err(g, w))


@pytest.mark.parametrize("stabilizer", ["bound", "running"])
def test_fp32_loss_matches_the_cpu(stabilizer):
    """fp32: losses within 1e-5 relative, gradients within 1e-5 (relative norm), both stabilisers."""
    inputs = loss_inputs()
    want = loss_and_grads(inputs, CPU, chunk_size=4096, stabilizer=stabilizer)
    got = loss_and_grads(inputs, GPU, chunk_size=4096, stabilizer=stabilizer)
    assert_loss_close(got, want, 1e-5, 1e-5)


def test_tf32_and_bf16_options_stay_near_fp32():
    """tf32 (GPU) against fp32 (CPU): 2e-3 on the losses, 1e-2 on the gradients; the global TF32 flag is
    restored. bf16 (GPU) against bf16 (CPU), the same rounding of the matmul inputs: 2e-3 and 2e-2; and against
    fp32: 2e-2 and 5e-2."""
    inputs = loss_inputs()
    fp32 = loss_and_grads(inputs, CPU)
    assert_loss_close(loss_and_grads(inputs, GPU, precision="tf32"), fp32, 2e-3, 1e-2)
    assert torch.backends.cuda.matmul.allow_tf32 is False
    bf16 = loss_and_grads(inputs, GPU, precision="bf16")
    assert_loss_close(bf16, loss_and_grads(inputs, CPU, precision="bf16"), 2e-3, 2e-2)
    assert_loss_close(bf16, fp32, 2e-2, 5e-2)


def test_loss_under_autocast_and_with_bf16_features_is_fp32():
    """train.amp runs the loss inside bf16 autocast: it must still compute in fp32 (1e-5 of the CPU). Features
    that autocast made bf16 give the fp32 result of those rounded features, and bf16 gradients."""
    inputs = loss_inputs()
    with torch.autocast(GPU.type, dtype=torch.bfloat16):
        under_autocast = loss_and_grads(inputs, GPU)
    assert_loss_close(under_autocast, loss_and_grads(inputs, CPU), 1e-5, 1e-5)
    rounded = {k: v.bfloat16().float() if k in ("feat_a", "feat_b", "neg_feat") else v for k, v in inputs.items()}
    got = loss_and_grads(rounded, GPU, dtype=torch.bfloat16)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    assert_loss_close(got, loss_and_grads(rounded, CPU), 1e-5, 1e-2)  # 1e-2: the gradients' own bf16 rounding


def test_loss_never_holds_the_full_matrix_on_the_gpu():
    """Peak GPU memory of forward + backward at chunk 1024 stays below a quarter of one [n, N] fp32 matrix."""
    inputs = {k: v.to(GPU) for k, v in loss_inputs(n=4096, big_n=32_768).items()}
    full = 4096 * 32_768 * 4
    loss_and_grads(inputs, GPU, chunk_size=1024)  # kernels and allocator warmed up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss_and_grads(inputs, GPU, chunk_size=1024)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < full / 4, f"peak {peak / 2**20:.0f} MiB, one [n, N] matrix is {full / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------------------------
# one training step


def tiny_config(**over):
    base = {"model.backbone": "resnet18", "model.pretrained": None, "model.proj_dim": 32, "data.crop_size": 64,
            "loss.selected_num": 96, "loss.pos_thresh": 0.0}  # threshold 0: the CAC term has anchors at random init
    return load_config("synthetic", {**base, **over})


def fake_batches(batch, crop, num_classes, seed=0, dtype=torch.float32):
    """A labeled batch and ``batch`` pairs sharing a half-size box; crop b of pair 0 flipped."""
    g = torch.Generator().manual_seed(seed)
    half = crop // 2
    batch_l = {"image": torch.randn(batch, 3, crop, crop, generator=g).to(dtype),
               "label": torch.randint(0, num_classes, (batch, crop, crop), generator=g)}
    overlap = torch.tensor([[0, 0, half, half], [half, half, crop, crop]]).repeat(batch, 1, 1)
    flip = torch.zeros(batch, 2, dtype=torch.bool)
    flip[0, 1] = True
    pairs = torch.randn(batch, 2, 3, crop, crop, generator=g).to(dtype)
    return batch_l, {"image": pairs, "overlap": overlap, "flip": flip}


def without_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def one_step(model, cfg, device, amp=False, dtype=torch.float32):
    """Loss terms, gradients and state after one SGD step of (a copy of) ``model`` on ``device`` in ``dtype``."""
    model = copy.deepcopy(model).to(device, dtype).train()
    if cfg.model.channels_last:
        model.to_channels_last()
    optimizer = build_optimizer(model, cfg)
    batch_l, batch_u = fake_batches(2, cfg.data.crop_size, cfg.data.num_classes, dtype=dtype)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        result = train_step(TrainingForward(model), batch_l, batch_u, cfg, bank=FeatureBank(1).to(device),
                            generator=torch.Generator().manual_seed(0))
    result.loss.backward()
    grads = {name: p.grad.detach().cpu().double() for name, p in model.named_parameters()}
    optimizer.step()
    terms = {k: float(v) for k, v in result.checked_terms().items()}
    state = {k: v.detach().cpu().double() for k, v in model.state_dict().items() if v.is_floating_point()}
    return terms, grads, state


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors.values()])


@pytest.mark.filterwarnings(RANDOM_WEIGHTS)
@pytest.mark.parametrize("variant", ["fp32", "channels_last", "amp"])
def test_train_step_matches_the_cpu(variant):
    """One CAC step (train_step through TrainingForward, backward, SGD) against the CPU.

    The loss terms of fp32 and channels_last are within 1e-5 of the CPU's fp32 terms. Their gradients and the
    state after the step (weights, BatchNorm statistics) are measured against the same step in fp64 on the CPU:
    the GPU's error may be at most 10x the CPU fp32 step's (+1e-6) for the whole gradient and state, and at most
    50x (+1e-5) for any one tensor. A fixed tolerance cannot do that job: at random init the step's gradients
    are ill-conditioned, so fp32 rounding alone moves them ~1e-3 from fp64 (measured on the CPU, whose own
    channels_last kernels, at 1.7e-2, would fail this bound). bf16 autocast (train.amp): loss terms within 2e-2
    of fp32 and every gradient finite; bf16 moves this step's gradients by ~50 % on the CPU too, so their values
    are not compared."""
    cfg = tiny_config(**{"model.channels_last": variant == "channels_last"})
    torch.manual_seed(0)
    model = without_dropout(build_model(tiny_config()))
    want_terms, want_grads, want_state = one_step(model, tiny_config(), CPU)
    terms, grads, state = one_step(model, cfg, GPU, amp=variant == "amp")
    assert want_terms["loss_unsup"] > 0  # the CAC term took part
    if variant == "amp":
        for k, v in want_terms.items():
            assert abs(terms[k] - v) <= 2e-2 * abs(v), (k, terms[k], v)
        assert all(torch.isfinite(g).all() for g in grads.values())
        return
    for k, v in want_terms.items():
        assert abs(terms[k] - v) <= 1e-5 * abs(v), (k, terms[k], v)
    _, exact_grads, exact_state = one_step(model, tiny_config(), CPU, dtype=torch.float64)
    for got, cpu, exact in ((grads, want_grads, exact_grads), (state, want_state, exact_state)):
        gpu_err, cpu_err = rel_err(flat(got), flat(exact)), rel_err(flat(cpu), flat(exact))
        assert gpu_err <= 10 * cpu_err + 1e-6, (gpu_err, cpu_err)
        worst = max((rel_err(got[k], e) - 50 * rel_err(cpu[k], e), k) for k, e in exact.items() if e.norm() > 0)
        assert worst[0] <= 1e-5, worst


@pytest.mark.filterwarnings(RANDOM_WEIGHTS)
def test_cac_step_syncs_only_in_the_loss_plan():
    """A CAC step on the GPU waits for the device once: the loss's one read of its block sizes
    (cacnb.contrastive._plan). Counted by CUDA's sync debug mode, which warns at every synchronising call."""
    cfg = tiny_config()
    model = build_model(cfg).to(GPU).train()
    net, bank, gen = TrainingForward(model), FeatureBank(1).to(GPU), torch.Generator().manual_seed(0)
    batch_l, batch_u = fake_batches(2, cfg.data.crop_size, cfg.data.num_classes)
    batch_l = {k: v.pin_memory() for k, v in batch_l.items()}      # as the loader gives them on a GPU machine
    batch_u = {k: v.pin_memory() if k == "image" else v for k, v in batch_u.items()}
    train_step(net, batch_l, batch_u, cfg, bank=bank, generator=gen).loss.backward()  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(net, batch_l, batch_u, cfg, bank=bank, generator=gen).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert 1 <= len(syncs) <= 2 and all("contrastive.py" in s for s in syncs), syncs


# ---------------------------------------------------------------------------------------------------------------
# feature bank, evaluation


def test_feature_bank_on_the_gpu_matches_the_cpu():
    """Pushing sets keeps the same rows on both devices (exactly), reads nothing from the device (sync debug mode
    "error"), and a GPU bank's state loads into a CPU bank and back."""
    g = torch.Generator().manual_seed(0)
    sets = [(torch.randn(rows, 16, generator=g), torch.randint(21, (rows,), generator=g)) for rows in (5, 9, 3)]
    cpu_bank, gpu_bank = FeatureBank(1), FeatureBank(1).to(GPU)
    on_gpu = [(f.to(GPU), lab.to(GPU)) for f, lab in sets]  # before the check: a pageable copy waits
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu_out = [gpu_bank.push(f, lab) for f, lab in on_gpu]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (f_cpu, l_cpu), (f_gpu, l_gpu) in zip((cpu_bank.push(f, lab) for f, lab in sets), gpu_out):
        assert f_gpu.is_cuda and torch.equal(f_gpu.cpu(), f_cpu) and torch.equal(l_gpu.cpu(), l_cpu)
    restored = FeatureBank(1)
    restored.load_state_dict(gpu_bank.state_dict())
    assert restored.sizes == cpu_bank.sizes == [9, 3] and torch.equal(restored.feat, cpu_bank.feat)
    back = FeatureBank(1).to(GPU)
    back.load_state_dict(cpu_bank.state_dict())
    assert back.feat.is_cuda and back.lengths.is_cuda and torch.equal(back.feat.cpu(), cpu_bank.feat)


def toy_val_set(sizes=((37, 45), (64, 64), (50, 71)), seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, (h, w) in enumerate(sizes):
        label = torch.randint(0, 21, (h, w), generator=g)
        label[torch.rand(h, w, generator=g) < 0.1] = 255
        items.append({"image": torch.randn(3, h, w, generator=g), "label": label, "id": str(i)})
    return items


@pytest.mark.filterwarnings(RANDOM_WEIGHTS)
@pytest.mark.parametrize("options", [{"mode": "whole"}, {"mode": "slide", "crop_size": 32, "slide_stride": 21},
                                     {"mode": "whole", "scales": (0.75, 1.0), "flip": True}])
def test_evaluate_matches_the_cpu(options):
    """evaluate() on the GPU against the CPU: confusion matrices within 0.1 % of the counted pixels (argmax
    near-ties may flip), mIoU within 1e-3."""
    torch.manual_seed(0)
    model = build_model(tiny_config())
    with torch.no_grad():  # BatchNorm statistics of real activations, not the init's (0, 1)
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64))
    data = toy_val_set()
    want = evaluate(copy.deepcopy(model), data, 21, progress=False, **options)
    got = evaluate(copy.deepcopy(model).to(GPU), data, 21, progress=False, **options)
    counted = int(want["confusion"].sum())
    assert int(got["confusion"].sum()) == counted > 0
    assert int((got["confusion"] - want["confusion"]).abs().sum()) <= 2 * 0.001 * counted
    assert abs(got["miou"] - want["miou"]) <= 1e-3


# ---------------------------------------------------------------------------------------------------------------
# a stopped and resumed training run


def run_config(out_dir, data_dir, name, max_iters):
    return tiny_config(**{
        "data.data_dir": str(data_dir), "data.n_labeled": 8, "data.base_size": 80, "data.num_workers": 0,
        "loss.epoch_start_unsup": 0, "train.epochs": 2, "train.iters_per_epoch": 2, "train.max_iters": max_iters,
        "train.batch_size": 2, "train.batch_size_unsup": 2, "train.log_every": 1, "train.val_every": 0,
        "train.out_dir": str(out_dir), "train.run_name": name})


def final_state(run_dir):
    ckpt = torch.load(run_dir / "last.pt", weights_only=True, map_location="cpu")
    model = {k: v.double() for k, v in ckpt["model"].items() if v.is_floating_point()}
    return ckpt["iteration"], model, ckpt["rng"][0]


def train_rows(run_dir):
    return [(r["iter"], r["lr"], r["loss"]) for r in split_kinds(read_metrics(run_dir))["train"]]


@pytest.mark.filterwarnings(RANDOM_WEIGHTS)
def test_training_stopped_and_resumed_on_the_gpu(tmp_path, synthetic_data_dir, monkeypatch):
    """train() on CUDA for 4 iterations, twice, and for 2 then resumed to 4 in the same run dir.

    Resumed against uninterrupted: the same iterations logged once each with the same learning rates, the GPU's
    random state in the checkpoint, and weights no further from the uninterrupted run than 4x (+1e-6) the
    distance between the two uninterrupted runs (0 where the GPU is deterministic; its atomic sums may reorder).
    Against the CPU: the first iteration (same initial weights, same batch) within 1e-5 relative. Later ones are
    not compared across devices: this tiny random-init run is chaotic after its first update (on the CPU alone,
    channels_last instead of contiguous moves the 4th loss by 3e-3 and some BatchNorm biases by 30 %).
    Dropout is off in every run, so they compute the same function."""
    monkeypatch.setattr(nn.Dropout, "forward", lambda self, x: x)
    straight = [train(run_config(tmp_path, synthetic_data_dir, f"straight{i}", 4)) for i in range(2)]
    train(run_config(tmp_path, synthetic_data_dir, "resumed", 2))
    resumed = train(run_config(tmp_path, synthetic_data_dir, "resumed", 4))
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)  # the same run's first iteration on the CPU
        on_cpu = train(run_config(tmp_path, synthetic_data_dir, "cpu", 1))
    (it_s, model_s, rng_s), (_, model_s2, _) = map(final_state, straight)
    it_r, model_r, rng_r = final_state(resumed)
    assert it_s == it_r == 4 and "cuda" in rng_s and "cuda" in rng_r
    rows_s, rows_r = train_rows(straight[0]), train_rows(resumed)
    assert [r[:2] for r in rows_r] == [r[:2] for r in rows_s] and [r[0] for r in rows_s] == [1, 2, 3, 4]
    noise = rel_err(flat(model_s2), flat(model_s))
    assert rel_err(flat(model_r), flat(model_s)) <= 4 * noise + 1e-6, (rel_err(flat(model_r), flat(model_s)), noise)
    (it_1, lr_1, loss_1), = train_rows(on_cpu)
    assert (it_1, lr_1) == rows_s[0][:2] and abs(rows_s[0][2] - loss_1) <= 1e-5 * abs(loss_1)
