"""Weights I/O: official-name mapping, strict loading, safe unpickling, ImageNet files."""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision

from cacnb.checkpoint_io import (CheckpointError, UnsafeCheckpointError, load_checkpoint, load_imagenet_weights,
                                 load_weights, official_to_ours, ours_to_official, safe_load)
from cacnb.config import load_config
from cacnb.model import build_model


def _model(backbone="resnet18", num_classes=21, seed=0):
    torch.manual_seed(seed)
    cfg = load_config("synthetic", {"model.backbone": backbone, "data.num_classes": num_classes})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "model.pretrained is None", UserWarning)
        return build_model(cfg)


def _randomised(model):
    """Give BatchNorm buffers non-default values too, so a load that skipped them would show."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Payload:
    """An arbitrary object a training script might pickle into a checkpoint."""


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def source():
    return _randomised(_model(seed=1))


def test_official_names():
    sd = ours_to_official(_model().state_dict())
    for key in ("encoder.backbone.layer4.1.conv2.weight", "encoder.aspp.aspp1.atrous_conv.weight",
                "encoder.aspp.aspp4.bn.running_var", "encoder.aspp.global_avg_pool.1.weight",
                "encoder.aspp.global_avg_pool.2.bias", "encoder.aspp.conv1.weight", "encoder.aspp.bn1.weight",
                "encoder.decoder.conv1.weight", "encoder.decoder.bn1.bias", "encoder.decoder.last_conv.0.weight",
                "encoder.decoder.last_conv.5.running_mean", "classifier.1.bias", "project.0.weight",
                "project.2.bias"):
        assert key in sd, key
    assert not any(k.startswith(("backbone.", "aspp.", "decoder.", "projector.")) for k in sd)
    assert list(official_to_ours(sd)) == list(_model().state_dict())


def test_official_checkpoint_round_trip(tmp_path, source):
    sd = {f"module.{k}": v for k, v in ours_to_official(source.state_dict()).items()}
    path = tmp_path / "best_model.pth"
    torch.save({"state_dict": sd, "epoch": 3, "config": {"name": "CAC", "model": {"layers": 18}},
                "monitor_best": np.float64(0.7)}, path)
    target = _model(seed=2)
    info = load_checkpoint(target, path)
    assert _same(source, target)
    assert info["source"] == "official" and info["epoch"] == 3 and float(info["monitor_best"]) == 0.7
    assert info["kept_at_init"] == []


def test_numpy1_scalar_global_is_allowed(tmp_path):
    """Official files were written with numpy 1, whose scalars pickle as numpy.core.multiarray.scalar."""
    path = tmp_path / "legacy.pth"
    torch.save({"monitor_best": np.float64(0.5)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray\nscalar" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    assert float(safe_load(path)["monitor_best"]) == 0.5


@pytest.mark.parametrize("kind", ["cacnb", "state_dict", "ddp_state_dict"])
def test_our_formats_round_trip(tmp_path, source, kind):
    sd = source.state_dict()
    obj = {"cacnb": {"format": "cacnb-checkpoint", "version": 1, "model": sd, "epoch": 2, "config": {}},
           "state_dict": sd, "ddp_state_dict": {f"module.{k}": v for k, v in sd.items()}}[kind]
    torch.save(obj, tmp_path / "ckpt.pt")
    target = _model(seed=3)
    info = load_checkpoint(target, tmp_path / "ckpt.pt")
    assert _same(source, target)
    assert info["source"] == ("cacnb" if kind == "cacnb" else "state_dict")


def test_truncated_state_dict_is_refused_untouched(tmp_path, source):
    sd = OrderedDict(source.state_dict())
    dropped = ["decoder.fuse.4.weight", "aspp.convs.2.1.running_var"]
    for key in dropped:
        del sd[key]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "partial.pt")
    target = _model(seed=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target, tmp_path / "partial.pt")
    msg = str(err.value)
    assert all(k in msg for k in dropped) and "extra.weight" in msg and "partial.pt" in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_shape_mismatch_names_key_shapes_and_fix(tmp_path):
    torch.save(_model(num_classes=19).state_dict(), tmp_path / "city.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_model(num_classes=21), tmp_path / "city.pt")
    msg = str(err.value)
    assert "classifier.1.weight" in msg and "[19, 256, 1, 1]" in msg and "[21, 256, 1, 1]" in msg
    assert "data.num_classes=19" in msg


def test_backbone_mismatch_suggests_backbone(tmp_path):
    torch.save(_model("resnet34").state_dict(), tmp_path / "r34.pt")
    with pytest.raises(CheckpointError, match="model.backbone=resnet34"):
        load_checkpoint(_model("resnet18"), tmp_path / "r34.pt")


def test_supervised_official_checkpoint_keeps_projector(tmp_path, source):
    sd = {f"module.{k}": v for k, v in ours_to_official(source.state_dict()).items()
          if not k.startswith("project.")}
    torch.save({"state_dict": sd}, tmp_path / "sup.pth")
    target = _model(seed=5)
    projector = {k: v.clone() for k, v in target.projector.state_dict().items()}
    with pytest.warns(UserWarning, match="no projector"):
        info = load_checkpoint(target, tmp_path / "sup.pth")
    assert sorted(info["kept_at_init"]) == sorted(f"projector.{k}" for k in projector)
    assert all(torch.equal(projector[k], v) for k, v in target.projector.state_dict().items())
    assert torch.equal(target.classifier[1].weight, source.classifier[1].weight)


def test_arbitrary_object_is_refused(tmp_path, source):
    torch.save({"state_dict": source.state_dict(), "extra": Payload()}, tmp_path / "obj.pth")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(_model(), tmp_path / "obj.pth")
    assert "obj.pth" in str(err.value) and "Payload" in str(err.value)
    assert "arbitrary pickled objects" in str(err.value)


def test_reduce_to_os_system_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": RunsCommand(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        safe_load(tmp_path / "evil.pth")
    assert not marker.exists()


def test_garbage_file_is_reported_corrupt_not_unsafe(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"0123456789")
    with pytest.raises(CheckpointError, match="corrupt or not a torch checkpoint") as err:
        safe_load(tmp_path / "junk.pt")
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert "junk.pt" in str(err.value) and "arbitrary pickled objects" not in str(err.value)


def test_missing_imagenet_file_names_url_and_place(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_imagenet_weights(_model("resnet18"), tmp_path / "nope.pth")
    msg = str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "pretrained/resnet18-f37072fd.pth" in msg and "nope.pth" in msg
    cfg = load_config("synthetic", {"model.backbone": "resnet50",
                                    "model.pretrained": str(tmp_path / "resnet50-19c8e357.pth")})
    with pytest.raises(FileNotFoundError, match="resnet50-19c8e357.pth"):
        build_model(cfg)


@pytest.mark.parametrize("old_format", [False, True])
def test_imagenet_weights_from_torchvision_state_dict(tmp_path, old_format):
    torch.manual_seed(6)
    sd = torchvision.models.resnet18().state_dict()  # fc.* included, as in the official files
    if old_format:  # files from torch < 0.4.1 have no num_batches_tracked
        sd = OrderedDict((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(sd, path)
    cfg = load_config("synthetic", {"model.pretrained": str(path)})
    model = build_model(cfg)
    for key, value in model.backbone.state_dict().items():
        if key in sd:
            assert torch.equal(value, sd[key]), key
    assert load_weights(_model(), path) == "imagenet"


def test_imagenet_wrong_depth_is_refused(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match="resnet34"):
        load_imagenet_weights(_model("resnet18"), tmp_path / "r34.pth")
