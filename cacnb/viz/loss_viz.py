r"""The CAC loss on one crop pair, term by term, for notebook 02 (figures return a matplotlib Figure).

:func:`pair_terms` runs the model on a pair and prepares exactly what :func:`cacnb.loss.cac_unsup_loss` feeds
the loss: overlap features, confidences, pseudo-labels and sampled negatives. The other functions explain or
plot pieces of it. The model runs on the pair through :func:`cacnb.runs.pair_outputs`; the crop / confidence
figures are in :mod:`cacnb.viz.figures` and :mod:`cacnb.viz.features`; names and colours come from
:mod:`cacnb.style`: the loss code's ``_a`` / ``_b`` are view 1 / view 2, so ``loss_a`` is
:math:`\mathcal{L}^{1\leftarrow 2}` (view 1 pulled towards view 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from cacnb import style
from cacnb.loss import (
    confidence_and_pseudo_label,
    direction_weights,
    directional_contrastive_loss,
    directional_contrastive_loss_reference,
    gather_overlap,
    sample_crop_negatives,
)
from cacnb.runs import pair_outputs
from cacnb.viz.widgets import slider_explorer


@dataclass
class PairTerms:
    """Inputs of the directional contrastive loss for one pair (``n`` overlap positions, ``N`` negatives)."""
    outputs: list            # the two crops' ``crop_outputs`` (batch dim dropped)
    feat_a: torch.Tensor     # [n, c]
    feat_b: torch.Tensor     # [n, c]
    conf_a: torch.Tensor     # [n]
    conf_b: torch.Tensor     # [n]
    label_a: torch.Tensor    # [n]
    label_b: torch.Tensor    # [n]
    neg_feat: torch.Tensor   # [N, c]
    neg_label: torch.Tensor  # [N]
    box_hw: tuple            # overlap size on the stride grid; the n positions are its cells, row-major
    temperature: float
    pos_thresh: float

    def loss_inputs(self) -> dict:
        return {k: getattr(self, k) for k in ("feat_a", "feat_b", "conf_a", "conf_b", "label_a", "label_b",
                                              "neg_feat", "neg_label")}


@torch.no_grad()
def pair_terms(model, item: Mapping, loss_cfg, *, pos_thresh: Optional[float] = None, seed: int = 0,
               stride: int = 8) -> PairTerms:
    """Run ``model`` (eval mode) on both crops of a pair item and gather the loss inputs as training does."""
    outputs = pair_outputs(model, item)                                  # 2 x {"proj": [c, h, w], ...}
    proj = [o["proj"][None] for o in outputs]                            # [1, c, h, w]
    conf, label = zip(*(confidence_and_pseudo_label(o["logits"][None]) for o in outputs))
    overlap, flip = item["overlap"][None], item["flip"][None]            # [1, 2, 4], [1, 2]
    feat_a, feat_b = gather_overlap(proj[0], proj[1], overlap, flip, stride)
    conf_a, conf_b = gather_overlap(conf[0], conf[1], overlap, flip, stride)
    label_a, label_b = gather_overlap(label[0], label[1], overlap, flip, stride)
    generator = torch.Generator().manual_seed(seed)
    # one rank, as in the single-GPU training this notebook explains; a fresh bank holds just these
    neg_feat, neg_label = sample_crop_negatives(list(zip(proj, label)), loss_cfg, 1, generator)
    box = (item["overlap"][0] // stride).tolist()
    return PairTerms(outputs=outputs, feat_a=feat_a, feat_b=feat_b, conf_a=conf_a, conf_b=conf_b,
                     label_a=label_a, label_b=label_b, neg_feat=neg_feat, neg_label=neg_label,
                     box_hw=(box[2] - box[0], box[3] - box[1]),
                     temperature=loss_cfg.temperature,
                     pos_thresh=loss_cfg.pos_thresh if pos_thresh is None else pos_thresh)


def per_anchor_terms(terms: PairTerms) -> dict:
    """Every term of the formula per overlap position, for both directions (plain maths, small pairs only).

    For direction a (anchor ``q = feat_a[i]``, positive ``k = feat_b[i]``): ``pos = q·k/T``,
    ``neg_lse = log Σ_{kept j} exp(q·n_j/T)``, ``l = log(e^pos + e^neg_lse) - pos``, ``kept`` = negatives whose
    pseudo-label differs from the anchor's, ``w`` = the directional mask. Keys end in ``_a`` / ``_b``.
    """
    w_a, w_b = direction_weights(terms.conf_a, terms.conf_b, terms.pos_thresh)
    out = {}
    for side, q, k, label, w in (("a", terms.feat_a, terms.feat_b, terms.label_a, w_a),
                                 ("b", terms.feat_b, terms.feat_a, terms.label_b, w_b)):
        pos = (q * k).sum(1) / terms.temperature                                       # [n]
        keep = label[:, None] != terms.neg_label[None, :]                              # [n, N]
        logits = (q @ terms.neg_feat.T / terms.temperature).masked_fill(~keep, -float("inf"))
        neg_lse = torch.logsumexp(logits, 1)
        out.update({f"pos_{side}": pos, f"neg_lse_{side}": neg_lse, f"kept_{side}": keep.sum(1),
                    f"l_{side}": torch.logaddexp(pos, neg_lse) - pos, f"w_{side}": w})
    return out


def term_summary(terms: PairTerms) -> dict:
    """Scalar summary: sizes, how many positions pull each way, mean terms over the pulled ones, the losses."""
    per = per_anchor_terms(terms)
    loss_a, loss_b = directional_contrastive_loss(**terms.loss_inputs(), temperature=terms.temperature,
                                                  pos_thresh=terms.pos_thresh)
    # over the anchors that enter the loss only, as the training statistic neg_kept_mean
    kept = torch.cat([per["kept_a"][per["w_a"]], per["kept_b"][per["w_b"]]]).float()
    summary = {"n_overlap": len(terms.feat_a), "n_neg": len(terms.neg_feat),
               "neg_filtered_mean": float(len(terms.neg_feat) - kept.mean()) if len(kept) else 0.0}
    for side, loss in (("a", loss_a), ("b", loss_b)):
        w = per[f"w_{side}"]
        summary[f"pulled_{side}"] = int(w.sum())
        for name in ("pos", "neg_lse", "l"):
            summary[f"mean_{name}_{side}"] = float(per[f"{name}_{side}"][w].mean()) if w.any() else float("nan")
        summary[f"loss_{side}"] = float(loss)
    return summary


def format_summary(summary: Mapping) -> str:
    lines = [f"{summary['n_overlap']} overlap positions, {summary['n_neg']} negatives; the same-label filter "
             f"removes {summary['neg_filtered_mean']:.1f} negatives per pulled position on average"]
    for k, side in enumerate("ab"):
        if summary[f"pulled_{side}"] == 0:
            lines.append(f"loss_{side} ({style.pull(k)}): no position passes the rule, so loss_{side} = 0")
            continue
        lines.append(f"loss_{side} ({style.pull(k)}): {summary[f'pulled_{side}']} positions, "
                     f"mean pos/T = {summary[f'mean_pos_{side}']:.3f}, mean log sum exp(neg/T) = "
                     f"{summary[f'mean_neg_lse_{side}']:.3f}, mean l_i = {summary[f'mean_l_{side}']:.4f} "
                     f"-> loss_{side} = {summary[f'loss_{side}']:.4f}")
    return "\n".join(lines)


def check_against_reference(terms: PairTerms, *, pos_thresh: Optional[float] = None, rtol: float = 1e-5,
                            chunk_size: int = 64) -> dict:
    """Values and feature gradients of the streamed loss vs the plain formula (fp64); raise if they differ.
    Returns the largest difference of each, relative to the largest reference magnitude."""
    pos_thresh = terms.pos_thresh if pos_thresh is None else pos_thresh
    results = []
    for fn, dtype, opts in ((directional_contrastive_loss, torch.float32, {"chunk_size": chunk_size}),
                            (directional_contrastive_loss_reference, torch.float64, {})):
        args = {k: (v.detach().to(dtype).clone() if v.is_floating_point() else v)
                for k, v in terms.loss_inputs().items()}
        args["feat_a"].requires_grad_(True)
        args["feat_b"].requires_grad_(True)
        with torch.enable_grad():
            loss_a, loss_b = fn(**args, temperature=terms.temperature, pos_thresh=pos_thresh, **opts)
            (loss_a + loss_b).backward()
        results.append([loss_a.detach(), loss_b.detach(), args["feat_a"].grad, args["feat_b"].grad])
    report = {}
    for name, got, want in zip(("loss_a", "loss_b", "grad_a", "grad_b"), *results):
        want = want.to(got.dtype)
        scale = float(want.abs().max()) if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-12))
        report[name] = float((got - want).abs().max()) / max(scale, 1e-12)
    return report


# ---------------------------------------------------------------------------------------------------------------
# figures


def plot_direction_rule(terms: PairTerms, pos_thresh: Optional[float] = None):
    """Left: view 2's confidence against view 1's for every overlap position, with the threshold γ and the
    diagonal that decide the direction. Right: the same decision on the overlap grid (view 1's raw layout).
    ``pos_thresh``: γ to draw the rule for (default: the terms' own)."""
    gamma = terms.pos_thresh if pos_thresh is None else float(pos_thresh)
    w_a, w_b = direction_weights(terms.conf_a, terms.conf_b, gamma)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    for mask, colour, name in ((~(w_a | w_b), style.NO_PULL, "no pull"), (w_a, style.VIEW_COLOURS[0], style.pull(0)),
                               (w_b, style.VIEW_COLOURS[1], style.pull(1))):
        ax.scatter(terms.conf_a[mask], terms.conf_b[mask], s=10, c=colour, label=f"{name} ({int(mask.sum())})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="equal confidence")
    ax.axhline(gamma, color=style.VIEW_COLOURS[0], lw=1, label=f"{style.view(1)} confidence = γ")
    ax.axvline(gamma, color=style.VIEW_COLOURS[1], lw=1, label=f"{style.view(0)} confidence = γ")
    ax.set(xlim=(0, 1.01), ylim=(0, 1.01), xlabel=f"confidence of {style.view(0)} (conf_a)",
           ylabel=f"confidence of {style.view(1)} (conf_b)",
           title=f"γ = {gamma:.2f}: {style.view(0)} moves where conf_b > γ and conf_b > conf_a")
    style.legend(ax, loc="lower right")
    grid = (w_a.float() - w_b.float()).reshape(terms.box_hw).numpy()
    ax2.imshow(grid, cmap="coolwarm_r", vmin=-1.5, vmax=1.5, interpolation="nearest")
    yy, xx = np.nonzero(grid)
    ax2.quiver(xx, yy, grid[yy, xx], np.zeros_like(xx), pivot="middle", scale=30, width=0.004)
    ax2.set_title(f"overlap grid ({style.view(0)}, unflipped): arrow right = {style.pull(0)},\n"
                  f"left = {style.pull(1)}", fontsize=10)
    ax2.set_xticks([])
    ax2.set_yticks([])
    return style.finish(fig)


def direction_explorer(terms: PairTerms, interactive: Optional[bool] = None):
    """:func:`plot_direction_rule` with a γ slider (JupyterLab); the terms' own γ as a static figure otherwise."""
    return slider_explorer(lambda gamma: plot_direction_rule(terms, gamma),
                           {"gamma": (float(terms.pos_thresh), 0.0, 1.0, 0.05)}, interactive)


def plot_negatives(terms: PairTerms, class_names: Optional[Sequence[str]] = None):
    """Negatives per pseudo-label, and per anchor how many the same-label filter keeps."""
    per = per_anchor_terms(terms)
    k = int(max(terms.neg_label.max(), terms.label_a.max(), terms.label_b.max())) + 1
    neg_counts = torch.bincount(terms.neg_label, minlength=k)
    anchor_counts = torch.bincount(torch.cat([terms.label_a, terms.label_b]), minlength=k)
    present = (neg_counts + anchor_counts).nonzero().squeeze(1).tolist()
    names = [class_names[c] if class_names and c < len(class_names) else str(c) for c in present]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(present))
    ax.bar(x - 0.2, neg_counts[present], width=0.4, label="negatives")
    ax.bar(x + 0.2, anchor_counts[present], width=0.4, label="overlap anchors (both views)")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set(ylabel="count", title="pseudo-labels: negatives vs anchors")
    ax.legend()
    kept = torch.cat([per["kept_a"], per["kept_b"]]).numpy()
    ax2.hist(kept, bins=30)
    ax2.axvline(len(terms.neg_label), color="k", ls="--", lw=1, label=f"all {len(terms.neg_label)}")
    ax2.set(xlabel="negatives kept for an anchor", ylabel="anchors",
            title="after the filter label_j != label_i")
    ax2.legend()
    fig.tight_layout()
    return style.finish(fig)


def plot_per_anchor_loss(terms: PairTerms):
    """l_i on the overlap grid for each direction, blank where the directional mask w_i is 0."""
    per = per_anchor_terms(terms)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    top = float(torch.cat([per["l_a"], per["l_b"]]).max())
    for k, (ax, side) in enumerate(zip(axes, "ab")):
        values = per[f"l_{side}"].masked_fill(~per[f"w_{side}"], float("nan")).reshape(terms.box_hw)
        im = ax.imshow(values.numpy(), cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(f"l_i of loss_{side} ({style.pull(k)})\nwhere w_i = 1 ({int(per[f'w_{side}'].sum())} positions)",
                     fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes.tolist(), fraction=0.03, label="l_i")
    return style.finish(fig)
