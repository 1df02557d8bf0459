"""Drawing: images and labels, a crop pair with its overlap box, predictions, per-class IoU and confusion.

Coordinates: a pair item (:class:`cacnb.data.pairs.PairDataset`) holds two crops as returned (crop k is mirrored
when ``flip[k]``) and the overlap box of each crop in its own *unflipped* pixel coordinates; figures draw the crops
as the network sees them, so boxes are mirrored onto the displayed crop (:func:`cacnb.data.pairs.displayed_box`).

Names and colours (view 1 / view 2, the overlap box colour) come from :mod:`cacnb.style`. Every plotting function
returns a matplotlib Figure (assign it, or end the notebook line with ``;``, so the inline backend shows it once).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from cacnb import style
from cacnb.data.palette import colorize as _palette_colorize
from cacnb.data.pairs import displayed_box
from cacnb.data.transforms import denormalize
from cacnb.evaluate import predict
from cacnb.metrics import confusion_matrix, mean_iou
from cacnb.model import unwrap


# ---------------------------------------------------------------------------------------------------------------
# images and labels


def colorize(label, dataset: str = "voc") -> np.ndarray:
    """Class-index map ``[H, W]`` -> RGB ``uint8 [H, W, 3]`` in the dataset's palette (255 = void colour)."""
    return _palette_colorize(label, dataset)


def image_to_rgb(image: torch.Tensor) -> np.ndarray:
    """Normalised image ``[3, H, W]`` -> float RGB ``[H, W, 3]`` in [0, 1]."""
    return denormalize(image.detach().cpu()).permute(1, 2, 0).numpy()


def overlay(image: torch.Tensor, label, alpha: float = 0.5, dataset: str = "voc") -> np.ndarray:
    """The image with the colourised label blended over it (``alpha`` = label weight); float RGB in [0, 1]."""
    rgb = image_to_rgb(image)
    colours = colorize(label, dataset).astype(np.float32) / 255.0
    return (1 - alpha) * rgb + alpha * colours


def hide_axes(ax) -> None:
    """No ticks: images and maps, not charts."""
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------------------------
# a crop pair


def draw_box(ax, box, colour=style.OVERLAP, scale: float = 1.0, label: Optional[str] = None) -> None:
    """A (top, left, bottom, right) pixel box as an unfilled rectangle, in the overlap colour by default."""
    top, left, bottom, right = (v * scale for v in box)
    ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor=colour,
                           linewidth=2, label=label))


def show_pair(item: Mapping, dataset: str = "voc", with_labels: bool = True, figsize=None):
    """The two crops of a pair as the network sees them, overlap box drawn, flip state in the titles; with
    ``with_labels`` a second row shows their labels (identical inside the box when photometric is off)."""
    rows = 2 if with_labels and "label" in item else 1
    fig, axes = plt.subplots(rows, 2, figsize=figsize or (7, 3.6 * rows), squeeze=False)
    width = item["image"].shape[-1]
    for k in range(2):
        flipped = bool(item["flip"][k])
        box = displayed_box(item["overlap"][k].tolist(), flipped, width)
        axes[0, k].imshow(image_to_rgb(item["image"][k]))
        draw_box(axes[0, k], box)
        axes[0, k].set_title(style.view(k) + (" (h-flipped)" if flipped else " (not flipped)"))
        if rows == 2:
            axes[1, k].imshow(colorize(item["label"][k], dataset))
            draw_box(axes[1, k], box)
            axes[1, k].set_title(f"{style.view(k)}: label")
        for ax in axes[:, k]:
            hide_axes(ax)
    fig.suptitle(f"{item.get('id', '')}: the boxed region is the same image content in both views")
    fig.legend(handles=[style.overlap_handle()], loc="lower center", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return style.finish(fig)


# ---------------------------------------------------------------------------------------------------------------
# predictions and results


def prediction_gallery(model: torch.nn.Module, dataset, n: int = 6, indices: Optional[Sequence[int]] = None,
                       dataset_name: str = "voc", mode: str = "whole", crop_size: Optional[int] = None,
                       ignore_index: int = 255):
    """Rows of image | ground truth | prediction | prediction over the image, with each image's own mIoU.

    The class count comes from the model, not the palette, so a model with fewer or more classes than the
    dataset's palette names still gets a confusion matrix of the right size."""
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
                hide_axes(ax)
    finally:
        net.train(was_training)
    fig.tight_layout()
    return style.finish(fig)


def _names(class_names: Optional[Sequence[str]], k: int) -> list[str]:
    return list(class_names) if class_names is not None and len(class_names) == k else [str(i) for i in range(k)]


def plot_iou_bars(iou: Sequence[float], class_names: Optional[Sequence[str]] = None, ax=None,
                  title: Optional[str] = None, dataset: str = "voc"):
    """Per-class IoU bars in each class's palette colour; classes absent from truth and prediction say n/a."""
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
