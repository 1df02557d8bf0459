"""Figures for notebooks 04 and 05: labels, overlapping crop pairs, what the CAC features look like, and results.

Coordinates: a pair item (``cacnb.data.pairs.PairDataset``) holds two crops as returned (crop k is mirrored when
``flip[k]``) and the overlap box of each crop in its own *unflipped* pixel coordinates. Figures draw the crops
as the network sees them, so boxes are mirrored onto the displayed crop. Feature maps from
``model.crop_outputs`` are at stride 8 (``h8 = S / 8``); a displayed grid cell ``(y, x)`` of a mirrored crop is
raw cell ``(y, w8 - 1 - x)``.

The directional contrastive loss (paper Eq. 3-4) pulls the feature of an overlap position in view 1 (``a`` in the
loss code) towards its counterpart in view 2 (``b``) only where view 2 is the more confident and confident enough,

    w_a(i) = [conf_b(i) > gamma and conf_b(i) > conf_a(i)],   gamma = 0.75,

and symmetrically for b; :func:`plot_confidence` draws exactly that mask.

Names and colours (view 1 / view 2, the overlap box colour, the fixed cosine range) come from
:mod:`cacnb.style`. Every plotting function returns a matplotlib Figure (assign it, or end the notebook line with ``;``, so the
inline backend shows it once).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cacnb import style
from cacnb.data.palette import colorize as _palette_colorize
from cacnb.engine import unwrap
from cacnb.notebook import resolve_interactive, widget_frontend

POS_THRESH = 0.75


def _plt():
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------------------------
# images and labels


def colorize(label, dataset: str = "voc") -> np.ndarray:
    """Class-index map ``[H, W]`` -> RGB ``uint8 [H, W, 3]`` in the dataset's palette (255 = void colour)."""
    return _palette_colorize(label, dataset)


def image_to_rgb(image: torch.Tensor) -> np.ndarray:
    """Normalised image ``[3, H, W]`` -> float RGB ``[H, W, 3]`` in [0, 1]."""
    from cacnb.data.transforms import denormalize

    return denormalize(image.detach().cpu()).permute(1, 2, 0).numpy()


def overlay(image: torch.Tensor, label, alpha: float = 0.5, dataset: str = "voc") -> np.ndarray:
    """The image with the colourised label blended over it (``alpha`` = label weight); float RGB in [0, 1]."""
    rgb = image_to_rgb(image)
    colours = colorize(label, dataset).astype(np.float32) / 255.0
    return (1 - alpha) * rgb + alpha * colours


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------------------------
# pair geometry


def displayed_box(overlap_k: Sequence[int], flip_k: bool, width: int) -> tuple[int, int, int, int]:
    """Overlap box (top, left, bottom, right) of a crop in raw coordinates -> on the crop as displayed."""
    top, left, bottom, right = (int(v) for v in overlap_k)
    if flip_k:
        left, right = width - right, width - left
    return top, left, bottom, right


def overlap_cells(overlap_k: Sequence[int], flip_k: bool, grid_w: int, stride: int = 8):
    """Rows (slice) and columns (LongTensor) of a crop's overlap on its displayed stride-``stride`` grid, the
    columns ordered left to right in *raw* (unflipped) coordinates, so that ``map_a[rows_a][:, cols_a]`` and
    ``map_b[rows_b][:, cols_b]`` line up position by position."""
    top, left, bottom, right = (int(v) // stride for v in overlap_k)
    cols = torch.arange(left, right)
    if flip_k:
        cols = grid_w - 1 - cols
    return slice(top, bottom), cols


def counterpart(item: Mapping, y: int, x: int, grid_hw: tuple[int, int], stride: int = 8) -> Optional[tuple]:
    """The displayed cell of view 2 seeing the same image content as displayed cell ``(y, x)`` of view 1, or
    None when ``(y, x)`` lies outside the overlap."""
    overlap, flip = item["overlap"], item["flip"]
    h8, w8 = grid_hw
    rows_a, cols_a = overlap_cells(overlap[0], bool(flip[0]), w8, stride)
    rows_b, cols_b = overlap_cells(overlap[1], bool(flip[1]), w8, stride)
    if not rows_a.start <= y < rows_a.stop:
        return None
    hits = (cols_a == x).nonzero()
    if hits.numel() == 0:
        return None
    return rows_b.start + (y - rows_a.start), int(cols_b[int(hits[0])])


def _draw_box(ax, box, colour=style.OVERLAP, scale: float = 1.0, label: Optional[str] = None) -> None:
    from matplotlib.patches import Rectangle

    top, left, bottom, right = (v * scale for v in box)
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor=colour,
                           linewidth=2, label=label))


def show_pair(item: Mapping, dataset: str = "voc", with_labels: bool = True, figsize=None):
    """The two crops of a pair as the network sees them, overlap box drawn, flip state in the titles; with
    ``with_labels`` a second row shows their labels (identical inside the box when photometric is off)."""
    plt = _plt()
    rows = 2 if with_labels and "label" in item else 1
    fig, axes = plt.subplots(rows, 2, figsize=figsize or (7, 3.6 * rows), squeeze=False)
    width = item["image"].shape[-1]
    for k in range(2):
        flipped = bool(item["flip"][k])
        box = displayed_box(item["overlap"][k].tolist(), flipped, width)
        axes[0, k].imshow(image_to_rgb(item["image"][k]))
        _draw_box(axes[0, k], box)
        axes[0, k].set_title(style.view(k) + (" (h-flipped)" if flipped else " (not flipped)"))
        if rows == 2:
            axes[1, k].imshow(colorize(item["label"][k], dataset))
            _draw_box(axes[1, k], box)
            axes[1, k].set_title(f"{style.view(k)}: label")
        for ax in axes[:, k]:
            _off(ax)
    fig.suptitle(f"{item.get('id', '')}: the boxed region is the same image content in both views")
    fig.legend(handles=[style.overlap_handle()], loc="lower center", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return style.finish(fig)


# ---------------------------------------------------------------------------------------------------------------
# model outputs on a pair


@torch.inference_mode()
def pair_outputs(model: torch.nn.Module, item: Mapping) -> list[dict]:
    """``model.crop_outputs`` of both crops (eval mode, model mode restored), each ``{"feat", "proj",
    "logits"}`` with the batch dimension dropped, on the CPU."""
    net = unwrap(model)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        outs = []
        for k in range(2):
            out = net.crop_outputs(item["image"][k:k + 1].to(device))
            outs.append({name: value[0].float().cpu() for name, value in out.items()})
    finally:
        net.train(was_training)
    return outs


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
    plt = _plt()
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
    _draw_box(axes[0], displayed_box(item["overlap"][0].tolist(), bool(item["flip"][0]), size))
    axes[0].plot([px], [py], marker="+", linestyle="none", color=style.QUERY, markersize=16, markeredgewidth=3,
                 label=f"query cell ({y}, {x})")
    axes[0].set_title(f"{style.view(0)}: query cell ({y}, {x})")
    style.legend(axes[0], [style.overlap_handle("overlap")], loc="lower left")
    axes[1].imshow(image_to_rgb(item["image"][1]))
    lo, hi = style.COSINE_RANGE
    im = axes[1].imshow(sim, cmap=style.COSINE_CMAP, vmin=lo, vmax=hi, alpha=0.75,
                        extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    _draw_box(axes[1], displayed_box(item["overlap"][1].tolist(), bool(item["flip"][1]), size))
    match = counterpart(item, y, x, (h8, w8))
    if match is not None:
        my, mx = _grid_point_to_pixels(match[0], match[1], size, w8)
        axes[1].plot([mx], [my], marker="o", linestyle="none", markerfacecolor="none", color=style.MATCH,
                     markersize=14, markeredgewidth=2, label="same image position")
    axes[1].set_title(f"{style.view(1)}: cosine similarity to the query\n"
                      f"(range here {sim.min():+.2f} .. {sim.max():+.2f})")
    style.legend(axes[1], [style.overlap_handle("overlap")], loc="lower left")
    for ax in axes:
        _off(ax)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04, label="cosine similarity")
    return style.finish(fig) if own else fig  # a caller's figure is finished by its caller


def default_queries(item: Mapping, grid_hw: tuple[int, int], n: int = 3) -> list[tuple[int, int]]:
    """``n`` query cells of view 1 spread along the overlap's diagonal (so each has a counterpart)."""
    rows, cols = overlap_cells(item["overlap"][0].tolist(), bool(item["flip"][0]), grid_hw[1])
    h, w = rows.stop - rows.start, len(cols)
    if h <= 0 or w <= 0:
        return [(grid_hw[0] // 2, grid_hw[1] // 2)]
    out = []
    for t in np.linspace(0.2, 0.8, n):
        out.append((rows.start + min(h - 1, int(t * h)), int(cols[min(w - 1, int(t * w))])))
    return out


def similarity_grid(item: Mapping, outputs: Sequence[Mapping], points: Optional[Sequence[tuple]] = None,
                    n: int = 3):
    """Static stand-in for the explorer: one :func:`plot_similarity` row per query cell."""
    plt = _plt()
    h8, w8 = outputs[0]["proj"].shape[-2:]
    points = list(points) if points else default_queries(item, (h8, w8), n)
    fig, axes = plt.subplots(len(points), 2, figsize=(12, 5.4 * len(points)), squeeze=False, layout="constrained")
    for row, (y, x) in zip(axes, points):
        plot_similarity(item, outputs, int(y), int(x), axes=row)
    return style.finish(fig)


def widgets_available() -> bool:
    """Kept for older notebooks: :func:`cacnb.notebook.widget_frontend`."""
    return widget_frontend()


def slider_explorer(draw, sliders: Mapping[str, tuple], interactive: Optional[bool] = None, static=None):
    """A figure redrawn whenever one of its sliders moves (JupyterLab), or a static figure (papermill).

    ``draw(**values)`` returns a Figure; ``sliders`` maps each keyword of ``draw`` to ``(value, min, max)``
    (ints give an IntSlider, floats a FloatSlider with ``max - min`` / 100 steps) or ``(value, min, max, step)``.
    ``interactive`` None: widgets when a widget front-end is attached (:func:`cacnb.notebook.resolve_interactive`).
    Without widgets ``static()`` (default: ``draw`` at the initial values) gives the figure. Returns the widget
    box or the Figure."""
    if not resolve_interactive(interactive):
        return static() if static is not None else draw(**{k: v[0] for k, v in sliders.items()})
    import ipywidgets as widgets  # lazy: only the interactive path needs it (resolve_interactive checked it)
    from IPython.display import display

    plt = _plt()
    controls = {}
    for name, spec in sliders.items():
        value, lo, hi, *step = spec
        if all(isinstance(v, int) for v in (value, lo, hi)):
            controls[name] = widgets.IntSlider(value=value, min=lo, max=hi, step=step[0] if step else 1,
                                               description=name, continuous_update=False)
        else:
            controls[name] = widgets.FloatSlider(value=value, min=lo, max=hi, step=step[0] if step else (hi - lo) / 100,
                                                 description=name, continuous_update=False)
    out = widgets.Output()

    def redraw(_change=None) -> None:
        with out:
            out.clear_output(wait=True)
            fig = draw(**{k: c.value for k, c in controls.items()})
            plt.show()
            plt.close(fig)

    for control in controls.values():
        control.observe(redraw, names="value")
    box = widgets.VBox([widgets.HBox(list(controls.values())), out])
    redraw()
    display(box)
    return box


def similarity_explorer(item: Mapping, outputs: Sequence[Mapping], interactive: Optional[bool] = None):
    """Pick a cell of view 1 with two sliders and see its cosine similarity over view 2 (JupyterLab).

    Static (:func:`similarity_grid`, a few queries along the overlap) when ``interactive`` is False, or None
    without a widget front-end (papermill). Returns the widget box or the static Figure.
    """
    h8, w8 = outputs[0]["proj"].shape[-2:]
    y0, x0 = default_queries(item, (h8, w8), 1)[0]
    return slider_explorer(lambda y, x: plot_similarity(item, outputs, y, x),
                           {"y": (int(y0), 0, int(h8) - 1), "x": (int(x0), 0, int(w8) - 1)},
                           interactive, static=lambda: similarity_grid(item, outputs))


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
    plt = _plt()
    rgb = pca_rgb(outputs[0][key], outputs[1][key])
    size = item["image"].shape[-1]
    fig, axes = plt.subplots(2, 2, figsize=(7, 7))
    for k in range(2):
        box = displayed_box(item["overlap"][k].tolist(), bool(item["flip"][k]), size)
        axes[0, k].imshow(image_to_rgb(item["image"][k]))
        _draw_box(axes[0, k], box)
        axes[0, k].set_title(style.view(k) + (" (flipped)" if bool(item["flip"][k]) else ""))
        axes[1, k].imshow(rgb[k], extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest")
        _draw_box(axes[1, k], box)
        axes[1, k].set_title(f"{style.view(k)}: PCA of {key} features")
        for ax in axes[:, k]:
            _off(ax)
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
    pull_a = (conf_b > pos_thresh) & (conf_b > conf_a)
    pull_b = (conf_a > pos_thresh) & (conf_a > conf_b)
    direction = pull_a.float() - pull_b.float()
    return {"conf": conf, "conf_a": conf_a, "conf_b": conf_b, "pull_a": pull_a, "pull_b": pull_b,
            "direction": direction}


def plot_confidence(item: Mapping, outputs: Sequence[Mapping], pos_thresh: float = POS_THRESH):
    """Confidence maps of both crops (white contour at the threshold) and, on the shared region laid out as in
    view 1, ``conf_2 - conf_1`` on a diverging map (red: view 2 is more confident, so view 1's feature is the
    one that would move; blue: the reverse) with arrows where the loss actually pulls (the more confident side
    is above the threshold): ``<`` = view 1 pulled towards view 2, ``>`` = view 2 pulled towards view 1."""
    plt = _plt()
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
        _draw_box(ax, displayed_box(item["overlap"][k].tolist(), bool(item["flip"][k]), size))
        ax.set_title(f"{style.view(k)}: confidence", fontsize=10)
        _off(ax)
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
    _off(axes[2])
    return style.finish(fig)


# ---------------------------------------------------------------------------------------------------------------
# predictions and results


def prediction_gallery(model: torch.nn.Module, dataset, n: int = 6, indices: Optional[Sequence[int]] = None,
                       dataset_name: str = "voc", mode: str = "whole", crop_size: Optional[int] = None,
                       ignore_index: int = 255):
    """Rows of image | ground truth | prediction | prediction over the image, with each image's own mIoU.

    The class count comes from the model, not the palette, so a model with fewer or more classes than the
    dataset's palette names still gets a confusion matrix of the right size."""
    from cacnb.evaluate import predict
    from cacnb.metrics import confusion_matrix, mean_iou

    plt = _plt()
    indices = list(indices) if indices is not None else list(range(min(n, len(dataset))))
    net = unwrap(model)
    device = next(net.parameters()).device
    fig, axes = plt.subplots(len(indices), 4, figsize=(12, 3 * len(indices)), squeeze=False)
    was_training = net.training
    net.eval()
    try:
        for row, i in zip(axes, indices):
            item = dataset[i]
            with torch.inference_mode():
                scores = predict(net, item["image"].unsqueeze(0).to(device), mode=mode, crop_size=crop_size)
            pred = scores.argmax(1)[0].cpu()
            num_classes = getattr(net, "num_classes", scores.shape[1])
            miou = mean_iou(confusion_matrix(pred, item["label"], num_classes, ignore_index))
            panels = (image_to_rgb(item["image"]), colorize(item["label"], dataset_name),
                      colorize(pred, dataset_name), overlay(item["image"], pred, 0.55, dataset_name))
            for ax, img, title in zip(row, panels, ("image", "ground truth", f"prediction (mIoU {100 * miou:.1f})",
                                                    "overlay")):
                ax.imshow(img)
                ax.set_title(title if title != "image" else str(item.get("id", i)), fontsize=9)
                _off(ax)
    finally:
        net.train(was_training)
    fig.tight_layout()
    return style.finish(fig)


def _names(class_names: Optional[Sequence[str]], k: int) -> list[str]:
    return list(class_names) if class_names is not None and len(class_names) == k else [str(i) for i in range(k)]


def plot_iou_bars(iou: Sequence[float], class_names: Optional[Sequence[str]] = None, ax=None,
                  title: Optional[str] = None, dataset: str = "voc"):
    """Per-class IoU bars in each class's palette colour; classes absent from truth and prediction say n/a."""
    plt = _plt()
    values = np.array([np.nan if v is None else v for v in iou], dtype=float)
    names = _names(class_names, len(values))
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(values)), 3.6))
    fig = fig or ax.figure
    colours = colorize(np.arange(len(values))[None], dataset)[0] / 255.0
    ax.bar(range(len(values)), 100 * np.nan_to_num(values), color=colours, edgecolor="black", linewidth=0.5)
    for i, v in enumerate(values):
        if np.isnan(v):
            ax.text(i, 1, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    miou = np.nanmean(values) if np.any(~np.isnan(values)) else float("nan")
    ax.axhline(100 * miou, color="black", linestyle="--", linewidth=1, label=f"mIoU {100 * miou:.1f}")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "per-class IoU")
    fig.tight_layout()
    return style.finish(fig)


def plot_confusion(cm, class_names: Optional[Sequence[str]] = None, ax=None, title: Optional[str] = None):
    """Confusion matrix normalised per ground-truth row (each row: where that class's pixels went)."""
    plt = _plt()
    cm = torch.as_tensor(cm).double()
    rows = cm.sum(1, keepdim=True)
    norm = torch.where(rows > 0, cm / rows.clamp(min=1), torch.full_like(cm, float("nan"))).numpy()
    names = _names(class_names, cm.shape[0])
    fig = None
    if ax is None:
        side = max(5, 0.35 * len(names))
        fig, ax = plt.subplots(figsize=(side + 1, side))
    fig = fig or ax.figure
    cmap = plt.get_cmap("Blues").copy()
    cmap.set_bad("#dddddd")  # classes absent from the ground truth
    im = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks(range(len(names)))
    ax.set_yticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title or "confusion, row-normalised (grey: class absent from the ground truth)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return style.finish(fig)


def plot_compare(results: Mapping[str, Sequence[float]], class_names: Optional[Sequence[str]] = None,
                 title: Optional[str] = None):
    """Side-by-side per-class IoU bars of several runs (e.g. ``{"supervised": iou, "CAC": iou}``); the legend
    gives each run's mIoU."""
    plt = _plt()
    runs = {name: np.array([np.nan if v is None else v for v in ious], dtype=float) for name, ious in
            results.items()}
    k = len(next(iter(runs.values())))
    names = _names(class_names, k)
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * k), 3.8))
    for j, (name, vals) in enumerate(runs.items()):
        miou = np.nanmean(vals) if np.any(~np.isnan(vals)) else float("nan")
        ax.bar(np.arange(k) + (j - (len(runs) - 1) / 2) * width, 100 * np.nan_to_num(vals), width,
               label=f"{name} (mIoU {100 * miou:.1f})")
    ax.set_xticks(range(k))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(title or "per-class IoU, side by side")
    fig.tight_layout()
    return style.finish(fig)


# ---------------------------------------------------------------------------------------------------------------
# the paper's numbers


PAPER_SOURCE = ("CAC paper: Lai et al., 'Semi-supervised Semantic Segmentation with Directional Context-aware "
                "Consistency', CVPR 2021 (arXiv:2106.14133), PASCAL VOC 2012 comparison table: val mIoU (%), "
                "DeepLabv3+, labeled subsets of the 10,582-image SegmentationClassAug training set; values "
                "transcribed by hand, check them against the paper's PDF before citing")
PAPER_SHORT = "CAC paper (Lai et al., CVPR 2021), VOC table [1]"

# (backbone, labeled fraction, labeled images) -> reported mIoU (%)
PAPER_VOC = {
    ("ResNet-50", "1/16", 662): 70.1,
    ("ResNet-50", "1/8", 1323): 72.4,
    ("ResNet-50", "1/4", 2645): 74.0,
    ("ResNet-101", "1/16", 662): 72.4,
    ("ResNet-101", "1/8", 1323): 74.6,
    ("ResNet-101", "1/4", 2645): 76.3,
}


def paper_table(ours: Optional[Mapping[str, "float | Mapping"]] = None) -> list[dict]:
    """Rows ``{"method", "backbone", "labeled", "miou", "source"}``: the paper's reported VOC numbers, then ours.

    ``ours`` maps a row label to an mIoU (a fraction in [0, 1] or a percentage) or to a dict with ``miou`` and
    optionally ``backbone``, ``labeled``, ``source``. Our rows say where they came from (default: "this run,
    cacnb"); a synthetic-data number is not comparable with the paper's and is labelled so by its caller.
    """
    rows = [{"method": "CAC (paper)", "backbone": bb, "labeled": f"{frac} ({n})", "miou": v,
             "source": PAPER_SOURCE} for (bb, frac, n), v in PAPER_VOC.items()]
    for label, value in (ours or {}).items():
        info = dict(value) if isinstance(value, Mapping) else {"miou": value}
        miou = info.get("miou")
        if miou is not None and not (isinstance(miou, float) and math.isnan(miou)) and miou <= 1.0:
            miou = 100.0 * miou
        rows.append({"method": label, "backbone": info.get("backbone", "?"), "labeled": info.get("labeled", "?"),
                     "miou": None if miou is None else round(float(miou), 2),
                     "source": info.get("source", "this run, cacnb")})
    return rows


def paper_table_markdown(ours: Optional[Mapping[str, "float | Mapping"]] = None) -> str:
    """:func:`paper_table` as a Markdown table (display it with ``IPython.display.Markdown``)."""
    rows = paper_table(ours)
    lines = ["| method | backbone | labeled | mIoU (%) | source |", "|---|---|---|---|---|"]
    for r in rows:
        miou = "n/a" if r["miou"] is None or (isinstance(r["miou"], float) and math.isnan(r["miou"])) \
            else f"{r['miou']:.1f}"
        source = PAPER_SHORT if r["source"] == PAPER_SOURCE else r["source"]
        lines.append(f"| {r['method']} | {r['backbone']} | {r['labeled']} | {miou} | {source} |")
    lines += ["", f"[1] {PAPER_SOURCE}. Other rows: measured by cacnb as stated in their source column."]
    return "\n".join(lines)
