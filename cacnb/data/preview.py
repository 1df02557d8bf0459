"""Small plotting helpers for notebook 00: a grid of images with their coloured labels, and class frequencies.

``python -m cacnb.data.preview --data-dir data/synthetic_context --out docs/synthetic_context.png`` writes the
grid of a dataset's first training images as a PNG (the figure of data_README.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from .lines import Pair, pair_id, pair_paths, voc_pairs
from .palette import class_names, colorize, palette
from .splits import find_voc_root, voc_train_ids


def load_sample(root: "str | os.PathLike", pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], label uint8 [H, W]) of one list entry."""
    image_path, label_path = pair_paths(root, pair)
    with Image.open(image_path) as im:
        image = np.asarray(im.convert("RGB"))
    with Image.open(label_path) as lb:
        label = np.asarray(lb)
    return image, label


def show_grid(root: "str | os.PathLike", pairs: Sequence[Pair], n: int = 8, dataset: str = "voc",
              cols: int = 4, tile: float = 2.6):
    """Figure: the first ``n`` samples, each image above its label drawn with the dataset's colour map."""
    pairs = list(pairs)[:n]
    cols = max(1, min(cols, len(pairs)))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(tile * cols, tile * 2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, pair in enumerate(pairs):
        image, label = load_sample(root, pair)
        r, c = divmod(k, cols)
        axes[2 * r, c].imshow(image)
        axes[2 * r, c].set_title(pair_id(pair), fontsize=8)
        axes[2 * r + 1, c].imshow(colorize(label, dataset), interpolation="nearest")
    fig.tight_layout()
    return fig


def class_pixel_counts(root: "str | os.PathLike", pairs: Sequence[Pair], num_classes: int) -> np.ndarray:
    """Labelled pixels per class over ``pairs`` (the 255 border / ignore value not counted): int64 [K]."""
    counts: Counter = Counter()
    for pair in pairs:
        with Image.open(pair_paths(root, pair)[1]) as im:
            values, n = np.unique(np.asarray(im), return_counts=True)
        counts.update(dict(zip(values.tolist(), n.tolist())))
    return np.array([counts.get(k, 0) for k in range(num_classes)], dtype=np.int64)


def plot_class_frequencies(counts: np.ndarray, dataset: str = "voc", title: str = "class frequencies",
                           hide_empty: bool = True):
    """Bar chart of the fraction of labelled pixels per class, bars in the class colours."""
    names = class_names(dataset)
    counts = np.asarray(counts, dtype=np.float64)
    keep = [k for k in range(len(counts)) if counts[k] > 0 or not hide_empty]
    colours = np.asarray(palette(dataset), dtype=np.float64).reshape(256, 3)[keep] / 255
    frac = counts[keep] / max(counts.sum(), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(keep) + 1), 3.2))
    ax.bar(range(len(keep)), frac, color=colours, edgecolor="black", linewidth=0.5)
    ax.set_xticks(range(len(keep)), [names[k] for k in keep], rotation=45, ha="right")
    ax.set_ylabel("fraction of labelled pixels")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cacnb.data.preview", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding VOCdevkit/VOC2012 (or VOC2012 itself)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--n", type=int, default=8, help="images to show")
    p.add_argument("--cols", type=int, default=8)
    args = p.parse_args(argv)
    root = find_voc_root(Path(args.data_dir))
    if root is None:
        print(f"error: no VOC2012 folder under {args.data_dir}", file=sys.stderr)
        return 2
    fig = show_grid(root, voc_pairs(voc_train_ids(root)), n=args.n, cols=args.cols, tile=1.6)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
