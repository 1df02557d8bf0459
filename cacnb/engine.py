"""Training-loop pieces: the poly schedule, one CAC training step, and atomic, resumable checkpoints.

The step implements the paper's objective

    L = L_sup + lambda_u * (L_dc(a <- b) + L_dc(b <- a)) * [epoch >= epoch_start_unsup]

with ``L_sup`` the cross-entropy on the labeled crop (ignore index 255) and ``L_dc`` the directional
contrastive loss of :mod:`cacnb.loss`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import dist
from .checkpoint_io import FORMAT as CHECKPOINT_FORMAT, RESUME_ONLY_KEYS
from .config import Config
from .loss import cac_unsup_loss
from .model import unwrap
from .paths import atomic_write

CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# schedule


def poly_factor(iteration: int, total: int, power: float = 0.9) -> float:
    """lr(it) = lr0 * (1 - it / total) ** power, evaluated every iteration."""
    return max(0.0, 1.0 - iteration / max(1, total)) ** power


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, total: int, power: float) -> float:
    """Apply the poly schedule to every group (each keeps its own ``initial_lr``); return the head lr."""
    factor = poly_factor(iteration, total, power)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[-1]["lr"]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.SGD:
    """SGD(momentum 0.9, wd 1e-4); the backbone at ``lr * backbone_lr_mult`` (official: lr / 10)."""
    groups = model.param_groups(cfg.optim.lr, cfg.optim.backbone_lr_mult)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay)


# ---------------------------------------------------------------------------------------------------------------
# one step


@dataclass
class StepResult:
    """One step's loss and what to log about it, all tensors on the device: nothing here is read by the step."""
    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)   # the loss's parts (0-d, detached)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)   # loss statistics (0-d, detached)

    def checked_terms(self) -> dict[str, torch.Tensor]:
        """The parts, then the total: the values that must stay finite, in the order a NaN check names them."""
        return {**self.terms, "loss": self.loss.detach()}


def supervised_loss(sup_logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy on the 1/4-resolution logits upsampled to the label size, as the official code does."""
    logits = F.interpolate(sup_logits, size=label.shape[-2:], mode="bilinear", align_corners=True)
    return F.cross_entropy(logits.float(), label, ignore_index=ignore_index)


def train_step(model, batch_l: dict, batch_u: Optional[dict], cfg: Config, *, bank=None,
               generator: Optional[torch.Generator] = None) -> StepResult:
    """Forward both branches in one model call (one DDP forward) and return the loss and its terms.

    ``model`` is a :class:`cacnb.model.TrainingForward` (possibly under DDP / torch.compile).

    ``batch_u`` is None in supervised mode and before ``epoch_start_unsup``. Nothing is read back from the
    device: the pairs' overlap boxes stay the loader's CPU tensors (host geometry), the rest moves without
    blocking.
    """
    device = next(model.parameters()).device
    x_l = batch_l["image"].to(device, non_blocking=True)
    y_l = batch_l["label"].to(device, non_blocking=True)
    if batch_u is None:
        out = model(x_l, None, None)
        loss_sup = supervised_loss(out["sup_logits"], y_l, cfg.data.ignore_index)
        return StepResult(loss_sup, {"loss_sup": loss_sup.detach()})
    pair = batch_u["image"].to(device, non_blocking=True)                       # [B, 2, 3, S, S]
    out = model(x_l, pair[:, 0], pair[:, 1])
    loss_sup = supervised_loss(out["sup_logits"], y_l, cfg.data.ignore_index)
    crop_a, crop_b = out["crops"]
    loss_unsup, stats = cac_unsup_loss(crop_a, crop_b, batch_u["overlap"], batch_u["flip"], bank, cfg.loss,
                                       generator=generator, stride=cfg.data.stride,
                                       hidden_label=batch_u.get("label"), ignore_index=cfg.data.ignore_index)
    terms = {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach()}
    return StepResult(loss_sup + loss_unsup, terms, stats)


# ---------------------------------------------------------------------------------------------------------------
# RNG state (per rank) and checkpoints


def rng_state(generator: Optional[torch.Generator]) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["negatives"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: Optional[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None and "negatives" in state:
        generator.set_state(state["negatives"])


def make_checkpoint(model, optimizer, cfg: Config, *, bank, epoch: int, iteration: int, rngs: list, history: list,
                    best_miou: float) -> dict:
    """A checkpoint of plain tensors and primitives, loadable with ``torch.load(weights_only=True)``.

    ``scaler`` stays None: bf16 autocast needs no gradient scaler; the key keeps the format's version 1.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": None,
        "bank": bank.state_dict() if bank is not None else None,
        "config": cfg.to_dict(),
        "epoch": int(epoch),
        "iteration": int(iteration),
        "rng": rngs,
        "history": history,
        "best_miou": float(best_miou),
        "world_size": dist.get_world_size(),
    }


def weights_checkpoint(state: dict) -> dict:
    """``state`` (a :func:`make_checkpoint` result) without what only resuming needs (SGD momentum, feature bank,
    RNG streams, scaler): the weights, the config, the history and the counters, marked ``resumable: False``.
    About half the size; what ``best.pt`` holds, since a run resumes from ``last.pt`` and never from it."""
    kept = {k: v for k, v in state.items() if k not in RESUME_ONLY_KEYS}
    kept["resumable"] = False
    return kept


def save_checkpoint(state: dict, path: "str | os.PathLike") -> Path:
    """Write atomically (temporary file + ``os.replace``): the previous checkpoint stays until the new one is
    complete, so a crash never leaves a torn file under ``path``."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))
