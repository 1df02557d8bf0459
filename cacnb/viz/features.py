"""What the CAC features look like on a crop pair: cosine similarity across views, a joint PCA, and the
confidences that decide the direction of the loss.

``outputs`` are the two crops' :func:`cacnb.runs.pair_outputs` (maps at stride 8, ``h8 = S / 8``); a displayed grid
cell ``(y, x)`` of a mirrored crop is raw cell ``(y, w8 - 1 - x)`` (:func:`cacnb.data.pairs.overlap_cells`).

The directional contrastive loss (paper Eq. 3-4) pulls the feature of an overlap position in view 1 (``a`` in the
loss code) towards its counterpart in view 2 (``b``) only where view 2 is the more confident and confident enough,

    w_a(i) = [conf_b(i) > gamma and conf_b(i) > conf_a(i)],   gamma = 0.75,

and symmetrically for b; :func:`plot_confidence` draws exactly that mask, computed by
:func:`cacnb.contrastive.direction_weights` (the loss's own rule).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from cacnb import style
from cacnb.config import LossConfig
from cacnb.contrastive import direction_weights
from cacnb.data.pairs import counterpart, displayed_box, overlap_cell_classes, overlap_cells
from cacnb.viz.figures import colorize, draw_box, hide_axes, image_to_rgb

POS_THRESH = LossConfig.pos_thresh  # the paper's gamma, the default of loss.pos_thresh


def similarity_map(proj_a: torch.Tensor, proj_b: torch.Tensor, y: int, x: int) -> torch.Tensor:
    """Cosine similarity ``[h, w]`` between view 1's feature at ``(y, x)`` and every position of view 2
    (``proj_*`` are ``[c, h, w]``; normalised again here so unnormalised features work too)."""
    query = F.normalize(proj_a[:, y, x], dim=0)        # [c]
    keys = F.normalize(proj_b, dim=0)                  # [c, h, w]
    return torch.einsum("c,chw->hw", query, keys)


def _grid_point_to_pixels(y: int, x: int, size: int, grid: int) -> tuple[float, float]:
    cell = size / grid
    return (y + 0.5) * cell - 0.5, (x + 0.5) * cell - 0.5


def plot_similarity(item: Mapping, outputs: Sequence[Mapping], y: int, x: int, axes=None, key: str = "proj"):
    """View 1 with the query cell ``(y, x)`` (displayed stride-8 grid) marked; view 2 with the cosine similarity
    of every position to it on the fixed range [-1, 1] (so queries and models compare by colour), and the
    counterpart cell circled when the query lies in the overlap."""
    fig, own = None, axes is None
    if own:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), layout="constrained")
    fig = fig or axes[0].figure
    feats_a, feats_b = outputs[0][key], outputs[1][key]
    h8, w8 = feats_a.shape[-2:]
    size = item["image"].shape[-1]
    sim = similarity_map(feats_a, feats_b, y, x).numpy()
    py, px = _grid_point_to_pixels(y, x, size, w8)
    axes[0].imshow(image_to_rgb(item["image"][0]))
    draw_box(axes[0], displayed_box(item["overlap"][0].tolist(), bool(item["flip"][0]), size))
    axes[0].plot([px], [py], marker="+", linestyle="none", color=style.QUERY, markersize=16, markeredgewidth=3,
                 label=f"query cell ({y}, {x})")
    axes[0].set_title(f"{style.view(0)}: query cell ({y}, {x})")
    style.legend(axes[0], [style.overlap_handle("overlap")], loc="lower left")
    axes[1].imshow(image_to_rgb(item["image"][1]))
    lo, hi = style.COSINE_RANGE
    im = axes[1].imshow(sim, cmap=style.COSINE_CMAP, vmin=lo, vmax=hi, alpha=0.75,
                        extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    draw_box(axes[1], displayed_box(item["overlap"][1].tolist(), bool(item["flip"][1]), size))
    match = counterpart(item, y, x, (h8, w8))
    if match is not None:
        my, mx = _grid_point_to_pixels(match[0], match[1], size, w8)
        axes[1].plot([mx], [my], marker="o", linestyle="none", markerfacecolor="none", color=style.MATCH,
                     markersize=14, markeredgewidth=2, label="same image position")
    axes[1].set_title(f"{style.view(1)}: cosine similarity to the query\n"
                      f"(range here {sim.min():+.2f} .. {sim.max():+.2f})")
    style.legend(axes[1], [style.overlap_handle("overlap")], loc="lower left")
    for ax in axes:
        hide_axes(ax)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04, label="cosine similarity")
    return style.finish(fig) if own else fig  # a caller's figure is finished by its caller


def default_queries(item: Mapping, grid_hw: tuple[int, int], n: int = 3,
                    num_classes: Optional[int] = None) -> list[tuple[int, int]]:
    """``n`` query cells of view 1 inside the overlap (so each has a counterpart). With ``num_classes``, on the
    cells of each foreground class first (one class after another), then the background; else spread along
    the overlap's diagonal."""
    rows, cols = overlap_cells(item["overlap"][0].tolist(), bool(item["flip"][0]), grid_hw[1])
    h, w = len(rows), len(cols)
    if h <= 0 or w <= 0:
        return [(grid_hw[0] // 2, grid_hw[1] // 2)]
    if num_classes is not None:
        return _queries_on_classes(overlap_cell_classes(item, num_classes), rows, cols, n)
    out = []
    for t in np.linspace(0.2, 0.8, n):
        out.append((int(rows[min(h - 1, int(t * h))]), int(cols[min(w - 1, int(t * w))])))
    return out


def _queries_on_classes(classes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n: int) -> list:
    """Cells of the overlap, one per class in turn (foreground classes first, the most central cell of each)."""
    present = [int(c) for c in torch.unique(classes) if int(c) not in (0, 255)] + [0]
    out = []
    centre = torch.tensor([(len(rows) - 1) / 2, (len(cols) - 1) / 2])
    while len(out) < n and present:
        for c in list(present):
            cells = [(i, j) for i, j in (classes == c).nonzero().tolist()
                     if (int(rows[i]), int(cols[j])) not in out]
            if not cells:
                present.remove(c)
                continue
            i, j = min(cells, key=lambda ij: float(((torch.tensor(ij, dtype=torch.float) - centre) ** 2).sum()))
            out.append((int(rows[i]), int(cols[j])))
            if len(out) == n:
                break
    return out or [(int(rows[len(rows) // 2]), int(cols[len(cols) // 2]))]


def similarity_grid(item: Mapping, outputs: Sequence[Mapping], points: Optional[Sequence[tuple]] = None,
                    n: int = 3, num_classes: Optional[int] = None):
    """Static stand-in for the explorer: one :func:`plot_similarity` row per query cell (by default
    :func:`default_queries`, on the objects of the overlap when ``num_classes`` is given)."""
    h8, w8 = outputs[0]["proj"].shape[-2:]
    points = list(points) if points else default_queries(item, (h8, w8), n, num_classes)
    fig, axes = plt.subplots(len(points), 2, figsize=(12, 5.4 * len(points)), squeeze=False, layout="constrained")
    for row, (y, x) in zip(axes, points):
        plot_similarity(item, outputs, int(y), int(x), axes=row)
    return style.finish(fig)


def pca_rgb(proj_a: torch.Tensor, proj_b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Project both crops' features ``[c, h, w]`` onto their joint top-3 principal components and map those to
    RGB (one shared scaling, so equal colours mean similar features across the two crops)."""
    c, h, w = proj_a.shape
    x = torch.cat([proj_a.reshape(c, -1), proj_b.reshape(c, -1)], 1).T.double()  # [2hw, c]
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = x @ vh[:3].T                                                             # [2hw, <=3]
    if comps.shape[1] < 3:
        comps = F.pad(comps, (0, 3 - comps.shape[1]))
    lo, hi = comps.quantile(0.01, dim=0), comps.quantile(0.99, dim=0)
    rgb = ((comps - lo) / (hi - lo).clamp(min=1e-8)).clamp(0, 1).float()
    return rgb[: h * w].reshape(h, w, 3).numpy(), rgb[h * w:].reshape(h, w, 3).numpy()


def plot_pca(item: Mapping, outputs: Sequence[Mapping], key: str = "proj"):
    """Both crops and the joint PCA-to-RGB of their projected features; inside the overlap box the two
    colour maps should agree (mirrored where a crop is flipped) when the features are context-robust."""
    rgb = pca_rgb(outputs[0][key], outputs[1][key])
    size = item["image"].shape[-1]
    fig, axes = plt.subplots(2, 2, figsize=(7, 7))
    for k in range(2):
        box = displayed_box(item["overlap"][k].tolist(), bool(item["flip"][k]), size)
        axes[0, k].imshow(image_to_rgb(item["image"][k]))
        draw_box(axes[0, k], box)
        axes[0, k].set_title(style.view(k) + (" (flipped)" if bool(item["flip"][k]) else ""))
        axes[1, k].imshow(rgb[k], extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest")
        draw_box(axes[1, k], box)
        axes[1, k].set_title(f"{style.view(k)}: PCA of {key} features")
        for ax in axes[:, k]:
            hide_axes(ax)
    fig.legend(handles=[style.overlap_handle()], loc="lower center", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return style.finish(fig)


def pull_directions(item: Mapping, outputs: Sequence[Mapping], pos_thresh: float = POS_THRESH,
                    stride: int = 8) -> dict:
    """Confidences and the loss's pull direction at every overlap position.

    Returns ``conf`` (two ``[h8, w8]`` max-softmax maps) and, on the overlap grid laid out as view 1 is
    displayed, ``conf_a``, ``conf_b`` (view 2's confidence at the same image positions), ``pull_a`` (view 1's
    feature pulled towards view 2's: ``conf_b > gamma and conf_b > conf_a``), ``pull_b`` (the reverse) and
    ``direction`` (+1: 1 <- 2, -1: 2 <- 1, 0: no pull).
    """
    conf = [o["logits"].softmax(0).amax(0) for o in outputs]  # 2 x [h8, w8]
    w8 = conf[0].shape[-1]
    aligned = []
    for k in range(2):
        rows, cols = overlap_cells(item["overlap"][k].tolist(), bool(item["flip"][k]), w8, stride)
        aligned.append(conf[k][rows][:, cols])                 # [oh, ow], raw (unflipped) column order
    if bool(item["flip"][0]):                                  # lay both out as view 1 is displayed
        aligned = [a.flip(-1) for a in aligned]
    conf_a, conf_b = aligned
    pull_a, pull_b = direction_weights(conf_a, conf_b, pos_thresh)
    direction = pull_a.float() - pull_b.float()
    return {"conf": conf, "conf_a": conf_a, "conf_b": conf_b, "pull_a": pull_a, "pull_b": pull_b,
            "direction": direction}


def plot_confidence(item: Mapping, outputs: Sequence[Mapping], pos_thresh: float = POS_THRESH):
    """Confidence maps of both crops (white contour at the threshold) and, on the shared region laid out as in
    view 1, ``conf_2 - conf_1`` on a diverging map (red: view 2 is more confident, so view 1's feature is the
    one that would move; blue: the reverse) with arrows where the loss actually pulls (the more confident side
    is above the threshold): ``<`` = view 1 pulled towards view 2, ``>`` = view 2 pulled towards view 1."""
    info = pull_directions(item, outputs, pos_thresh)
    size = item["image"].shape[-1]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), layout="constrained")
    for k in range(2):
        ax = axes[k]
        ax.imshow(image_to_rgb(item["image"][k]))
        im = ax.imshow(info["conf"][k].numpy(), cmap="viridis", vmin=0, vmax=1, alpha=0.7,
                       extent=(-0.5, size - 0.5, size - 0.5, -0.5))
        h8, w8 = info["conf"][k].shape
        ys = (np.arange(h8) + 0.5) * item["image"].shape[-2] / h8 - 0.5
        xs = (np.arange(w8) + 0.5) * size / w8 - 0.5
        ax.contour(xs, ys, info["conf"][k].numpy(), levels=[pos_thresh], colors=style.CONTOUR, linewidths=1)
        draw_box(ax, displayed_box(item["overlap"][k].tolist(), bool(item["flip"][k]), size))
        ax.set_title(f"{style.view(k)}: confidence", fontsize=10)
        hide_axes(ax)
    axes[0].legend(handles=[style.overlap_handle("overlap"),
                            style.line_handle(style.CONTOUR, f"confidence = {pos_thresh}", linewidth=1)],
                   loc="lower left", fontsize=7, facecolor="grey", framealpha=0.6)
    fig.colorbar(im, ax=axes[:2].tolist(), fraction=0.025, pad=0.02, label="max softmax")
    diff = (info["conf_b"] - info["conf_a"]).numpy()
    im2 = axes[2].imshow(diff, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    n = info["direction"].numel()
    for k, (mask, marker) in enumerate(((info["pull_a"], "<"), (info["pull_b"], ">"))):
        yy, xx = mask.nonzero(as_tuple=True)
        axes[2].scatter(xx.numpy(), yy.numpy(), marker=marker, s=18, c="black",
                        label=f"{style.pull(k)} ({int(mask.sum())}/{n})")
    axes[2].set_title(f"overlap (laid out as {style.view(0)}):\nconfidence of view 2 - view 1", fontsize=10)
    axes[2].legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7, frameon=False)
    fig.colorbar(im2, ax=axes[2], fraction=0.046, pad=0.04)
    hide_axes(axes[2])
    return style.finish(fig)


def plot_agreement(item: Mapping, predictions: Sequence[torch.Tensor], dataset: str = "voc",
                   ignore_index: int = 255):
    """Cross-context agreement on one pair: each view's prediction inside the overlap (raw orientation, so the
    two panels show the same image region) and where they agree (green), disagree (red) or the pixel is
    unlabeled (grey), with the agreement over the labeled pixels in the title."""
    label = item["label"][0].flip(-1) if bool(item["flip"][0]) else item["label"][0]   # crop a, raw orientation
    (t0, l0, b0, r0), (t1, l1, b1, r1) = item["overlap"].tolist()
    pred_a, pred_b = predictions[0][t0:b0, l0:r0], predictions[1][t1:b1, l1:r1]
    truth = label[t0:b0, l0:r0]
    valid = truth != ignore_index
    same = (pred_a == pred_b) & valid
    share = float(same.sum()) / max(1, int(valid.sum()))
    colours = np.full((*truth.shape, 3), 0.6)
    colours[same.numpy()] = (0.2, 0.7, 0.3)
    colours[(~same & valid).numpy()] = (0.85, 0.2, 0.2)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), layout="constrained")
    for ax, (title, mask) in zip(axes, (("ground truth", truth), (f"{style.VIEWS[0]} predicts", pred_a),
                                        (f"{style.VIEWS[1]} predicts", pred_b))):
        ax.imshow(colorize(mask, dataset), interpolation="nearest")
        ax.set_title(title)
    axes[3].imshow(colours, interpolation="nearest")
    axes[3].set_title(f"agree on {100 * share:.1f}% of labeled pixels")
    for ax in axes:
        hide_axes(ax)
    fig.suptitle("the overlap, seen in two contexts (un-flipped)")
    return style.finish(fig)
