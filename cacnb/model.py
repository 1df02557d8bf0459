"""DeepLabv3+ with CAC's classifier and projector (Lai et al., CVPR 2021, Sec. 3 and 4.1).

The network is the one the paper trains:

* a torchvision ResNet (18/34 for CPU demos, 50/101 for the paper) without ``avgpool``/``fc``, with output
  stride 16 (default) or 8 obtained by turning the last strides into dilations; ResNet-50/101 use the
  DeepLabv3 multi-grid (1, 2, 4) x the stage dilation in the last stage;
* torchvision's ASPP, rates (6, 12, 18) at OS 16 and (12, 24, 36) at OS 8;
* the DeepLabv3+ decoder: 48-channel projection of the stride-4 ``layer1`` features, concatenation with the
  upsampled ASPP output, two 3x3 conv-BN-ReLU (256 channels, Dropout(0.5) after the first);
* classifier ``Dropout(0.1) + Conv1x1`` and, for CAC, a projector ``phi`` on the 2x2 average-pooled decoder
  features (stride 8): ``Conv1x1(256,256) - ReLU - Conv1x1(256, proj_dim)``, L2-normalised,
  ``phi(x) = g(f(x)) / ||g(f(x))||_2``, the features whose cosine similarities the contrastive loss compares.

Sizes: convolutions with padding round up, so ``layer1`` is ``ceil(H/4)`` and the backbone output is
``ceil(H/OS)``; the pooled stride-8 maps are ``floor(ceil(H/4) / 2)`` (== ``H/8`` for the multiple-of-8 crops
training uses). Weight loading lives in :mod:`cacnb.checkpoint_io` and is re-exported here.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.segmentation.deeplabv3 import ASPP

from cacnb.checkpoint_io import (  # noqa: F401  (re-exported: cacnb.model is the public entry point)
    IMAGENET_URLS, CheckpointError, UnsafeCheckpointError, load_checkpoint, load_imagenet_weights, load_weights,
    official_to_ours, ours_to_official, safe_load,
)
from cacnb.config import Config, ModelConfig
from cacnb.paths import resolve

MULTI_GRID = (1, 2, 4)
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "aspp", "decoder", "pooled")


# ---------------------------------------------------------------------------------------------------------------
# backbone


def _dilate_block(block: nn.Module, dilation: int, first: bool) -> None:
    """Give ``block``'s 3x3 convs ``dilation`` (padding == dilation keeps the size); the stage's first block
    also loses its stride (in its strided 3x3 conv and its downsample shortcut)."""
    convs = [block.conv1, block.conv2] if isinstance(block, BasicBlock) else [block.conv2]
    for conv in convs:
        conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
    if first:
        convs[0].stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def _dilate_stage(layer: nn.Sequential, dilation: int, multi_grid: Sequence[int] = ()) -> None:
    """Stride -> dilation for one stage; block ``i`` gets ``multi_grid[i] * dilation`` when a grid is given."""
    for i, block in enumerate(layer):
        grid = multi_grid[i] if i < len(multi_grid) else 1
        _dilate_block(block, grid * dilation, first=i == 0)


def _resnet(name: str, output_stride: int) -> nn.Module:
    """A torchvision ResNet (random init) with the strides of its last stage(s) turned into dilation."""
    if output_stride not in ASPP_RATES:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    ctor = getattr(torchvision.models, name)
    os8 = output_stride == 8
    bottleneck = name in ("resnet50", "resnet101")
    # torchvision implements stride->dilation for Bottleneck only; the explicit pass below then sets the exact
    # DeepLab dilations (every block of a dilated stage dilated, multi-grid in layer4) for both block types.
    net = ctor(weights=None, replace_stride_with_dilation=[False, os8, True]) if bottleneck else ctor(weights=None)
    if os8:
        _dilate_stage(net.layer3, 2)
    _dilate_stage(net.layer4, 4 if os8 else 2, MULTI_GRID if bottleneck else ())
    return net


class ResNetBackbone(nn.Module):
    """The ResNet's stem and four stages, keeping torchvision's parameter names (``conv1``, ``layer1.0...``),
    so ImageNet files and the official ``encoder.backbone.*`` keys load without renaming."""

    def __init__(self, name: str = "resnet50", output_stride: int = 16):
        super().__init__()
        net = _resnet(name, output_stride)
        for child in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, child, getattr(net, child))
        self.out_channels = 2048 if isinstance(net.layer4[0], Bottleneck) else 512
        self.low_channels = 256 if isinstance(net.layer4[0], Bottleneck) else 64

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stem = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B,64,H/4,W/4]
        out = {"stem": stem}
        feat = stem
        for name in ("layer1", "layer2", "layer3", "layer4"):
            feat = getattr(self, name)(feat)
            out[name] = feat
        return out


# ---------------------------------------------------------------------------------------------------------------
# decoder and heads


def _conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Decoder(nn.Module):
    """DeepLabv3+ decoder: fuse the ASPP context (stride OS) with the 48-channel projection of ``layer1``."""

    def __init__(self, low_channels: int, channels: int = 256, low_proj: int = 48):
        super().__init__()
        self.low_proj = nn.Sequential(*_conv_bn_relu(low_channels, low_proj, 1))
        self.fuse = nn.Sequential(*_conv_bn_relu(channels + low_proj, channels, 3), nn.Dropout(0.5),
                                  *_conv_bn_relu(channels, channels, 3))

    def forward(self, context: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.low_proj(low)                                                    # [B,48,H/4,W/4]
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.fuse(torch.cat([context, low], dim=1))                         # [B,256,H/4,W/4]


def _init_head(module: nn.Module) -> None:
    """Head init as DeepLabv3+: kaiming-normal conv weights, BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------------
# the model


class CACModel(nn.Module):
    """DeepLabv3+ + CAC heads. ``model(x)`` gives logits at the input size; :meth:`training_outputs` gives
    everything one CAC training step needs (wrap the model in :class:`TrainingForward` to train it under DDP)."""

    def __init__(self, backbone: str = "resnet50", num_classes: int = 21, output_stride: int = 16,
                 proj_dim: int = 128, channels: int = 256):
        super().__init__()
        self.backbone_name, self.output_stride, self.num_classes = backbone, output_stride, num_classes
        self.channels_last = False
        self.backbone = ResNetBackbone(backbone, output_stride)
        self.aspp = ASPP(self.backbone.out_channels, ASPP_RATES[output_stride], channels)
        self.decoder = Decoder(self.backbone.low_channels, channels)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Conv2d(channels, num_classes, 1))
        self.projector = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True),
                                       nn.Conv2d(channels, proj_dim, 1))
        # the official CAC code kaiming-inits only ASPP, decoder and classifier; its projector keeps PyTorch's
        # default Conv2d init, and so does ours, so training starts from the same distribution
        for head in (self.aspp, self.decoder, self.classifier):
            _init_head(head)

    # -- pieces --------------------------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        """The four parts the notebook tabulates; ``heads`` = classifier + projector."""
        heads = nn.ModuleDict({"classifier": self.classifier, "projector": self.projector})
        return {"backbone": self.backbone, "aspp": self.aspp, "decoder": self.decoder, "heads": heads}

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every intermediate map: backbone stages, ``aspp`` (stride OS), ``decoder`` (stride 4)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(x)
        feats["aspp"] = self.aspp(feats["layer4"])
        feats["decoder"] = self.decoder(feats["aspp"], feats["layer1"])
        return feats

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder features ``[B,256,ceil(H/4),ceil(W/4)]``."""
        return self.features(x)["decoder"]

    def crop_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """CAC's per-crop outputs at stride 8: pooled features, their unit-norm projections, class logits."""
        feat = F.avg_pool2d(self.encode(x), kernel_size=2, stride=2)  # [b,256,h8,w8]
        proj = F.normalize(self.projector(feat), p=2, dim=1)          # [b,proj_dim,h8,w8], ||.||_2 = 1
        return {"feat": feat, "proj": proj, "logits": self.classifier(feat)}

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``[B,K,H,W]`` at the input size (inference, evaluation)."""
        logits = self.classifier(self.encode(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From one encoder pass: the evaluation logits ``[B,K,H,W]`` (as :meth:`forward`) and the stride-8 pooled
        decoder features ``[B,256,h8,w8]``, the projector's input (:mod:`cacnb.consistency`)."""
        decoder = self.encode(x)
        logits = F.interpolate(self.classifier(decoder), size=x.shape[-2:], mode="bilinear", align_corners=True)
        return logits, F.avg_pool2d(decoder, kernel_size=2, stride=2)

    def training_outputs(self, x_l: Optional[torch.Tensor] = None, x_u1: Optional[torch.Tensor] = None,
                         x_u2: Optional[torch.Tensor] = None) -> dict:
        """Everything one CAC training step needs: ``sup_logits`` of the labeled batch at stride 4 (None without
        ``x_l``) and ``crops``, the :meth:`crop_outputs` of both crops of the pairs (empty without them). Under DDP
        call it through :class:`TrainingForward`, whose ``forward`` it is, so the step is one DDP forward."""
        if (x_u1 is None) != (x_u2 is None):
            raise ValueError("CAC needs both crops of each pair: pass x_u1 and x_u2 together (or neither)")
        sup = None if x_l is None else self.classifier(self.encode(x_l))  # [B,K,H/4,W/4]
        crops = [] if x_u1 is None else [self.crop_outputs(x_u1), self.crop_outputs(x_u2)]
        return {"sup_logits": sup, "crops": crops}

    # -- training helpers ----------------------------------------------------------------------------------
    def param_groups(self, lr: float, backbone_lr_mult: float = 0.1) -> list[dict]:
        """Backbone at ``lr * backbone_lr_mult`` (0.1 in the paper), everything else at ``lr``."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"},
                {"params": head, "lr": lr, "name": "head"}]

    def to_channels_last(self) -> "CACModel":
        """NHWC weights and inputs (faster convolutions on recent GPUs)."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def stage_shapes(self, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """Shape of each stage's output for input ``x`` (eval-mode pass, model mode restored)."""
        was_training = self.training
        self.eval()
        try:
            feats = self.features(x)
            feats["pooled"] = F.avg_pool2d(feats["decoder"], 2, 2)
        finally:
            self.train(was_training)
        return {name: tuple(feats[name].shape) for name in STAGES}


class TrainingForward(nn.Module):
    """The training step's view of a :class:`CACModel`: ``forward`` is :meth:`CACModel.training_outputs`.

    DDP synchronises gradients of what runs through the ``forward`` of the module it wraps, so training wraps this
    (not the model) in DDP, and one step is one DDP forward. It holds the model as ``module``, like DDP, so
    :func:`unwrap` and checkpoints see the bare model."""

    def __init__(self, model: CACModel):
        super().__init__()
        self.module = model

    def forward(self, x_l: Optional[torch.Tensor] = None, x_u1: Optional[torch.Tensor] = None,
                x_u2: Optional[torch.Tensor] = None) -> dict:
        return self.module.training_outputs(x_l, x_u1, x_u2)


# ---------------------------------------------------------------------------------------------------------------
# building


def _model_cfg(cfg: "Config | ModelConfig") -> ModelConfig:
    return cfg.model if isinstance(cfg, Config) else cfg


def build_model(cfg: "Config | ModelConfig", num_classes: Optional[int] = None) -> CACModel:
    """Build the model a config describes and load its ImageNet weights (``model.pretrained``).

    ``num_classes`` defaults to ``cfg.data.num_classes`` for a full :class:`Config` (required for a bare
    :class:`ModelConfig`). ``pretrained: None`` gives a random backbone, with a warning.
    """
    mcfg = _model_cfg(cfg)
    if num_classes is None:
        if not isinstance(cfg, Config):
            raise ValueError("build_model(ModelConfig) needs num_classes (a full Config carries data.num_classes)")
        num_classes = cfg.data.num_classes
    model = CACModel(mcfg.backbone, num_classes, mcfg.output_stride, mcfg.proj_dim)
    if mcfg.pretrained:
        load_imagenet_weights(model, resolve(mcfg.pretrained))
    else:
        warnings.warn(f"model.pretrained is None: the {mcfg.backbone} backbone starts from random weights, so "
                      "results will not match the paper (it starts from ImageNet weights)", stacklevel=2)
    if mcfg.channels_last:
        model.to_channels_last()
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def maybe_sync_bn(model: nn.Module, cfg: "Config | ModelConfig", world_size: int,
                  device: "torch.device | str") -> nn.Module:
    """SyncBatchNorm only for multi-process CUDA runs with ``model.sync_bn``; it has no CPU implementation."""
    if torch.device(device).type == "cuda" and world_size > 1 and _model_cfg(cfg).sync_bn:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# description (notebook 01)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def meta_copy(model: CACModel) -> CACModel:
    """The same architecture on the meta device (shapes only, no memory, no compute): for FLOP counting."""
    with torch.device("meta"):
        return CACModel(model.backbone_name, model.num_classes, model.output_stride,
                        model.projector[2].out_channels).eval()


@torch.no_grad()
def describe(model: CACModel, image_size: Sequence[int] = (321, 457), flops: bool = True) -> list[dict]:
    """One row per part: parameters and forward FLOPs (2 x multiply-adds, batch 1) for an ``image_size`` input.

    ``heads`` = classifier on the stride-4 map (inference) + projector on the pooled map (training only). FLOPs
    are counted on a meta-device copy, so this is instant even for ResNet-101. A ``total`` row sums the parts.
    """
    gflops = _part_gflops(meta_copy(model), image_size) if flops else {}
    rows = [{"part": name, "params": count_params(part), "gflops": gflops.get(name)}
            for name, part in model.parts().items()]
    rows.append({"part": "total", "params": count_params(model), "gflops": sum(gflops.values()) if flops else None})
    return rows


def _part_gflops(meta: CACModel, image_size: Sequence[int]) -> dict[str, float]:
    x = torch.zeros(1, 3, *image_size, device="meta")
    feats = meta.features(x)
    pooled = F.avg_pool2d(feats["decoder"], 2, 2)
    flops = {
        "backbone": _flops(meta.backbone, x),
        "aspp": _flops(meta.aspp, feats["layer4"]),
        "decoder": _flops(meta.decoder, feats["aspp"], feats["layer1"]),
        "heads": _flops(meta.classifier, feats["decoder"]) + _flops(meta.projector, pooled),
    }
    return {name: f / 1e9 for name, f in flops.items()}


def format_parts_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`describe` rows."""
    lines = [f"{'part':<10}{'params':>14}{'GFLOPs':>10}"]
    for r in rows:
        gflops = "-" if r["gflops"] is None else f"{r['gflops']:.2f}"
        lines.append(f"{r['part']:<10}{r['params']:>14,}{gflops:>10}")
    return "\n".join(lines)


def check_output_stride(model: CACModel, image_size: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Assert that the backbone output is ``ceil(input / OS)`` and layer1 ``ceil(input / 4)``; return shapes."""
    h, w = image_size
    shapes = model.stage_shapes(torch.zeros(1, 3, h, w, device=next(model.parameters()).device))
    os_ = model.output_stride
    want = (math.ceil(h / os_), math.ceil(w / os_))
    if shapes["layer4"][-2:] != want:
        raise AssertionError(f"backbone output {shapes['layer4'][-2:]} != ceil({h, w} / {os_}) = {want}")
    if shapes["layer1"][-2:] != (math.ceil(h / 4), math.ceil(w / 4)):
        raise AssertionError(f"layer1 output {shapes['layer1'][-2:]} is not at stride 4")
    return shapes


def format_shapes(shapes: dict[str, tuple[int, ...]], image_size: Sequence[int]) -> str:
    """Plain-text table of :meth:`CACModel.stage_shapes` with each stage's effective stride."""
    lines = [f"{'stage':<10}{'shape':<26}{'H/h':>7}"]
    for name, shape in shapes.items():
        stride = image_size[0] / shape[-2]
        lines.append(f"{name:<10}{str(list(shape)):<26}{stride:>7.1f}")
    return "\n".join(lines)
