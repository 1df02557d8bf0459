"""DeepLabv3+ / CAC model: shapes at odd sizes, output stride, parameter counts, API pieces."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

from cacnb.config import ModelConfig, load_config
from cacnb.model import (CACModel, build_model, check_output_stride, count_params, describe, maybe_sync_bn,
                         meta_copy)


def _model(backbone="resnet18", output_stride=16, num_classes=21, **overrides) -> CACModel:
    cfg = load_config("synthetic", {"model.backbone": backbone, "model.output_stride": output_stride,
                                    "data.num_classes": num_classes, **overrides})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "model.pretrained is None", UserWarning)
        return build_model(cfg)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return _model("resnet18").eval()


@pytest.mark.parametrize("backbone,size", [("resnet18", (321, 457)), ("resnet50", (97, 131))])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_logits_and_stage_shapes_at_odd_sizes(backbone, size, output_stride):
    torch.manual_seed(0)
    model = _model(backbone, output_stride).eval()
    h, w = size
    with torch.no_grad():
        logits = model(torch.randn(1, 3, h, w))
    assert logits.shape == (1, 21, h, w)
    shapes = check_output_stride(meta_copy(model), size)  # shapes only: the meta copy skips the compute
    assert shapes["layer4"][-2:] == (math.ceil(h / output_stride), math.ceil(w / output_stride))
    assert shapes["decoder"][-2:] == (math.ceil(h / 4), math.ceil(w / 4))
    assert shapes["pooled"][-2:] == (math.ceil(h / 4) // 2, math.ceil(w / 4) // 2)
    assert shapes["aspp"][1] == 256 and shapes["decoder"][1] == 256


def test_multi_grid_dilations_resnet50():
    model = _model("resnet50", 16)
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [2, 4, 8]
    assert all(b.conv2.padding == b.conv2.dilation for b in model.backbone.layer4)
    model = _model("resnet50", 8)
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [4, 8, 16]
    assert {b.conv2.dilation[0] for b in model.backbone.layer3} == {2}
    assert model.aspp.convs[1][0].dilation == (12, 12)


def test_train_outputs(r18):
    model = r18.train()
    x_l, x_u1, x_u2 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 96), torch.randn(2, 3, 64, 96)
    out = model.training_outputs(x_l, x_u1, x_u2)
    model.eval()
    assert out["sup_logits"].shape == (2, 21, 16, 16)
    assert len(out["crops"]) == 2
    for crop in out["crops"]:
        assert crop["feat"].shape == (2, 256, 8, 12)
        assert crop["proj"].shape == (2, 128, 8, 12)
        assert crop["logits"].shape == (2, 21, 8, 12)
        norms = crop["proj"].norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # the loss needs gradients through the projector and the classifier
    (out["crops"][0]["proj"].sum() + out["sup_logits"].sum()).backward()
    assert model.projector[0].weight.grad is not None and model.backbone.conv1.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_train_outputs_optional_parts(r18):
    with torch.no_grad():
        sup_only = r18.training_outputs(torch.randn(2, 3, 32, 32))
        crops_only = r18.training_outputs(None, torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))
    assert sup_only["crops"] == [] and sup_only["sup_logits"].shape == (2, 21, 8, 8)
    assert crops_only["sup_logits"] is None and len(crops_only["crops"]) == 2
    with pytest.raises(ValueError, match="both crops"):
        r18.training_outputs(None, torch.randn(1, 3, 32, 32))


def test_training_forward_is_the_training_outputs_under_one_forward(r18):
    from cacnb.model import TrainingForward, unwrap

    net = TrainingForward(r18.eval())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x)["sup_logits"], r18.training_outputs(x)["sup_logits"])
        assert r18(x).shape == (1, 21, 32, 32)                 # the model's own forward: logits only
    assert unwrap(net) is r18 and list(net.state_dict()) == [f"module.{k}" for k in r18.state_dict()]


def test_parameter_counts_match_official():
    assert count_params(_model("resnet50")) == 40_450_869
    assert count_params(_model("resnet101")) == 59_442_997


def test_param_groups_partition(r18):
    groups = r18.param_groups(0.01, 0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(0.001) and groups[1]["lr"] == 0.01
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(r18.parameters()))
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in r18.backbone.parameters()}


def test_channels_last_matches_contiguous(r18):
    fast = _model("resnet18", **{"model.channels_last": True}).eval()
    fast.load_state_dict(r18.state_dict())
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.allclose(fast(x), r18(x), atol=1e-4)


def test_projector_keeps_default_init_heads_get_kaiming(r18):
    # PyTorch's default Conv2d weights are uniform within 1/sqrt(fan_in); kaiming-normal (std sqrt(2/fan_in))
    # lands outside that bound for about half of the weights, so the bound tells the two inits apart
    for conv in (r18.projector[0], r18.projector[2]):
        bound = 1 / math.sqrt(conv.weight[0].numel())
        assert float(conv.weight.detach().abs().max()) <= bound
    classifier = r18.classifier[1].weight.detach()
    assert float(classifier.abs().max()) > 1 / math.sqrt(classifier[0].numel())


def test_random_init_warns_and_model_config_needs_classes():
    with pytest.warns(UserWarning, match="will not match the paper"):
        model = build_model(ModelConfig(backbone="resnet18", pretrained=None), num_classes=5)
    assert model.classifier[1].out_channels == 5
    with pytest.raises(ValueError, match="num_classes"):
        build_model(ModelConfig(backbone="resnet18", pretrained=None))


def test_sync_bn_only_for_multi_gpu_cuda(r18):
    cfg = load_config("synthetic", {"model.sync_bn": True})
    for world, device in ((2, "cpu"), (1, "cuda")):
        out = maybe_sync_bn(r18, cfg, world, device)
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in out.modules())
    converted = maybe_sync_bn(_model("resnet18"), cfg, 2, "cuda")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())


def test_describe_rows(r18):
    rows = describe(r18, (64, 96))
    assert [r["part"] for r in rows] == ["backbone", "aspp", "decoder", "heads", "total"]
    assert sum(r["params"] for r in rows[:-1]) == rows[-1]["params"] == count_params(r18)
    assert all(r["gflops"] > 0 for r in rows)
    assert rows[-1]["gflops"] == pytest.approx(sum(r["gflops"] for r in rows[:-1]))
    # the 1x1 classifier alone: 2 * 256 * 21 MACs per stride-4 pixel
    cls_flops = 2 * 256 * 21 * 16 * 24 / 1e9
    assert rows[3]["gflops"] > cls_flops
    assert describe(r18, (64, 96), flops=False)[0]["gflops"] is None
    assert count_params(meta_copy(r18)) == count_params(r18)
