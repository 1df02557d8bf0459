"""Two overlapping crops of one unlabeled image: the signal CAC learns from.

Geometry (pure functions, no pixels):

* the image is rescaled once to ``h x w`` and padded bottom/right to at least ``S x S`` (the crop size);
* crop a's offset ``(y_a, x_a)`` is uniform over the padded canvas; crop b's offset differs from it by multiples
  of the feature ``stride``, so one feature cell of a covers the same pixels as one cell of b;
* the pair is kept when the IoU of the two ``S x S`` windows lies in ``iou_bound`` and the shared region holds
  at least one whole stride cell of real (unpadded) image; after ``max_tries`` the crops are identical;
* the shared region is the intersection of the two windows clipped to the unpadded image. In each crop's own
  coordinates its top/left are rounded up and its bottom/right down to multiples of the stride. Because
  ``y_a = y_b (mod stride)``, both boxes then have the same size and cover the same pixels:

      box_k = (ceil_s(top - y_k), ceil_s(left - x_k), floor_s(bottom - y_k), floor_s(right - x_k))

  with ``top = max(y_a, y_b)``, ``bottom = min(min(y_a, y_b) + S, h)`` (same for x).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch.utils.data import Dataset

from . import transforms as T
from .voc import SegFiles

Box = tuple[int, int, int, int]  # top, left, bottom, right (bottom/right exclusive)
MAX_PAIR_TRIES = 50  # the official pair loader's attempts before it falls back to identical crops


class PairWindows(NamedTuple):
    offset_a: tuple[int, int]  # (top, left) of crop a on the padded canvas
    offset_b: tuple[int, int]
    box_a: Box                 # shared region in crop a's own (unflipped) coordinates
    box_b: Box
    fallback: bool             # True when no pair met the bounds and the crops are identical


def _ceil_to(v: int, stride: int) -> int:
    return -(-v // stride) * stride


def _floor_to(v: int, stride: int) -> int:
    return (v // stride) * stride


def window_iou(offset_a: tuple[int, int], offset_b: tuple[int, int], crop: int) -> float:
    """IoU of two ``crop x crop`` windows."""
    dy, dx = abs(offset_a[0] - offset_b[0]), abs(offset_a[1] - offset_b[1])
    inter = max(0, crop - dy) * max(0, crop - dx)
    return inter / (2 * crop * crop - inter)


def overlap_boxes(height: int, width: int, offset_a: tuple[int, int], offset_b: tuple[int, int], crop: int,
                  stride: int) -> Optional[tuple[Box, Box]]:
    """The shared, unpadded, stride-aligned region in each crop's coordinates; None when it is empty."""
    top, left = max(offset_a[0], offset_b[0]), max(offset_a[1], offset_b[1])
    bottom = min(min(offset_a[0], offset_b[0]) + crop, height)
    right = min(min(offset_a[1], offset_b[1]) + crop, width)
    boxes = []
    for y, x in (offset_a, offset_b):
        box = (_ceil_to(top - y, stride), _ceil_to(left - x, stride),
               _floor_to(bottom - y, stride), _floor_to(right - x, stride))
        if box[2] <= box[0] or box[3] <= box[1]:
            return None
        boxes.append(box)
    return boxes[0], boxes[1]


def overlap_cells(box: Sequence[int], flipped: bool, grid_w: int,
                  stride: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature-map cells of one crop's overlap ``box`` (top, left, bottom, right in the crop's unflipped
    pixels) on its stride-``stride`` map of width ``grid_w``, as the map is given (mirrored when ``flipped``):
    ``(rows, cols)`` index tensors, ordered by unflipped position. Cell ``(rows[i], cols[j])`` of crop a and of
    crop b hold the same image content, which is what the loss gathers and the figures line up."""
    top, left, bottom, right = (int(v) // stride for v in box)
    cols = torch.arange(left, right)
    if flipped:
        cols = grid_w - 1 - cols
    return torch.arange(top, bottom), cols


def cell_labels(label: torch.Tensor, num_classes: int, stride: int = 8, ignore_index: int = 255,
                min_share: float = 0.5) -> torch.Tensor:
    """The ground-truth class of every stride-``stride`` cell of ``label`` ``[B, H, W]`` (H, W multiples of the
    stride): ``[B, H/stride, W/stride]`` long, the class holding more than ``min_share`` of the cell's pixels, else
    ``ignore_index`` (mixed cells, borders, padding). The one rule that puts a label on a feature cell: the
    consistency metrics and the training diagnostics both use it. Runs on ``label``'s device, reading nothing,
    in memory linear in the pixels (a per-cell histogram, not a one-hot map)."""
    b, height, width = label.shape
    h, w = height // stride, width // stride
    cls = torch.where((label >= 0) & (label < num_classes), label, torch.full_like(label, num_classes))
    rows = torch.arange(height, device=label.device) // stride                      # [H]
    cols = torch.arange(width, device=label.device) // stride                       # [W]
    cell = (torch.arange(b, device=label.device)[:, None, None] * h + rows[None, :, None]) * w + cols  # [B, H, W]
    bins = num_classes + 1                                                           # the ignore label's bin last
    hist = torch.bincount((cell * bins + cls).reshape(-1), minlength=b * h * w * bins).view(b * h * w, bins)
    best, winner = hist[:, :num_classes].max(dim=1)                                 # [B*h*w]
    clear = best > min_share * stride * stride
    return torch.where(clear, winner, torch.full_like(winner, ignore_index)).view(b, h, w)


def overlap_cell_classes(item, num_classes: int, stride: int = 8, ignore_index: int = 255) -> torch.Tensor:
    """The ground-truth classes (:func:`cell_labels`) of crop a's overlap cells in a :class:`PairDataset` item,
    ``[rows, cols]`` in crop a's map as given."""
    label = item["label"][:1]                                                      # [1, S, S] crop a as given
    classes = cell_labels(label, num_classes, stride, ignore_index)[0]             # [S/stride, S/stride]
    rows, cols = overlap_cells(item["overlap"][0].tolist(), bool(item["flip"][0]), classes.shape[1], stride)
    return classes[rows][:, cols]


def pair_showing_objects(pairs, num_classes: int, start: int = 0, min_object_cells: int = 4,
                         limit: int = 200, ignore_index: int = 255) -> tuple[int, dict]:
    """The first index from ``start`` (cycling, at most ``limit`` tries) whose pair ``(index, 0)`` holds at least
    ``min_object_cells`` overlap cells of a foreground class and some background: ``(index, item)``. For the
    figures, which say little on a pair that is all background; falls back to ``start``'s pair."""
    first = None
    for k in range(min(limit, len(pairs))):
        index = (start + k) % len(pairs)
        item = pairs[(index, 0)]
        first = first or (index, item)
        classes = overlap_cell_classes(item, num_classes, pairs.stride, ignore_index)
        objects = int(((classes != 0) & (classes != ignore_index)).sum())
        if objects >= min_object_cells and bool((classes == 0).any()):
            return index, item
    return first


def displayed_box(box: Sequence[int], flipped: bool, width: int) -> Box:
    """An overlap box in a crop's unflipped pixels -> on the crop as given (mirrored when ``flipped``)."""
    top, left, bottom, right = (int(v) for v in box)
    if flipped:
        left, right = width - right, width - left
    return top, left, bottom, right


def counterpart(item, y: int, x: int, grid_hw: tuple[int, int], stride: int = 8) -> Optional[tuple[int, int]]:
    """The cell of crop b (as given) seeing the same image content as cell ``(y, x)`` of crop a (as given) in a
    :class:`PairDataset` item, or None when ``(y, x)`` lies outside the overlap."""
    overlap, flip = item["overlap"], item["flip"]
    rows_a, cols_a = overlap_cells(overlap[0], bool(flip[0]), grid_hw[1], stride)
    rows_b, cols_b = overlap_cells(overlap[1], bool(flip[1]), grid_hw[1], stride)
    i, j = (rows_a == y).nonzero(), (cols_a == x).nonzero()
    if i.numel() == 0 or j.numel() == 0:
        return None
    return int(rows_b[int(i[0])]), int(cols_b[int(j[0])])


def _randint(lo: int, hi: int, generator: Optional[torch.Generator]) -> int:
    """Uniform in [lo, hi], both inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=generator).item())


def _partner(start: int, span: int, stride: int, generator: Optional[torch.Generator]) -> int:
    """A position in [0, span] that differs from ``start`` by a multiple of ``stride``, uniformly."""
    k_lo, k_hi = -(start // stride), (span - start) // stride
    return start + stride * _randint(k_lo, k_hi, generator)


def sample_pair_windows(height: int, width: int, crop: int, stride: int = 8,
                        iou_bound: Sequence[float] = (0.1, 1.0), max_tries: int = MAX_PAIR_TRIES,
                        generator: Optional[torch.Generator] = None) -> PairWindows:
    """Draw two crop windows on an ``height x width`` image (padded to ``crop``) per the module docstring.

    ``height`` and ``width`` must be >= ``stride`` so that identical crops share at least one whole cell.
    """
    if min(height, width) < stride:
        raise ValueError(f"image {height}x{width} is smaller than one stride cell ({stride}); rescale it first")
    if crop % stride:
        raise ValueError(f"crop size {crop} must be a multiple of the stride {stride}")
    lo, hi = iou_bound
    span_y, span_x = max(height, crop) - crop, max(width, crop) - crop
    offset_a = (0, 0)
    for _ in range(max_tries):
        offset_a = (_randint(0, span_y, generator), _randint(0, span_x, generator))
        offset_b = (_partner(offset_a[0], span_y, stride, generator), _partner(offset_a[1], span_x, stride, generator))
        if not lo <= window_iou(offset_a, offset_b, crop) <= hi:
            continue
        boxes = overlap_boxes(height, width, offset_a, offset_b, crop, stride)
        if boxes is not None:
            return PairWindows(offset_a, offset_b, boxes[0], boxes[1], False)
    boxes = overlap_boxes(height, width, offset_a, offset_a, crop, stride)
    assert boxes is not None  # guaranteed by height, width >= stride
    return PairWindows(offset_a, offset_a, boxes[0], boxes[1], True)


def same_window(height: int, width: int, crop: int, stride: int = 8,
                generator: Optional[torch.Generator] = None) -> PairWindows:
    """Both crops from one uniformly drawn window (IoU 1, same offset): the "no context" ablation
    (``data.context=false``), where the two views differ only by their flips and photometric augmentation."""
    if min(height, width) < stride:
        raise ValueError(f"image {height}x{width} is smaller than one stride cell ({stride}); rescale it first")
    offset = (_randint(0, max(height, crop) - crop, generator), _randint(0, max(width, crop) - crop, generator))
    boxes = overlap_boxes(height, width, offset, offset, crop, stride)
    assert boxes is not None  # guaranteed by height, width >= stride
    return PairWindows(offset, offset, boxes[0], boxes[1], False)


class PairDataset(Dataset):
    """Unlabeled images as overlapping crop pairs (the ARCHITECTURE ``PairDataset`` contract).

    Item: ``image`` float ``[2, 3, S, S]``, ``label`` long ``[2, S, S]`` (monitoring only), ``overlap`` long
    ``[2, 4]`` (top, left, bottom, right of the shared region in each crop's own unflipped coordinates, multiples
    of ``stride``), ``flip`` bool ``[2]`` (crop k as returned is ``hflip(raw crop k)`` when ``flip[k]``), ``id``.
    ``ds[(i, sample_seed)]`` makes every random draw of the item a function of ``sample_seed``.
    """

    def __init__(self, files: SegFiles, *, crop_size: int = 320, base_size: int = 400,
                 scale_range: Sequence[float] = (0.8, 2.0), stride: int = 8,
                 iou_bound: Sequence[float] = (0.1, 1.0), photometric: bool = True, ignore_index: int = 255,
                 max_tries: int = MAX_PAIR_TRIES, context: bool = True):
        if crop_size % stride:
            raise ValueError(f"crop_size {crop_size} must be a multiple of stride {stride}")
        self.files = files
        self.crop_size = crop_size
        self.base_size = base_size
        self.scale_range = tuple(scale_range)
        self.stride = stride
        self.iou_bound = tuple(iou_bound)
        self.photometric = photometric
        self.ignore_index = ignore_index
        self.max_tries = max_tries
        self.context = context  # False: both crops from the same window (data.context ablation)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> dict:
        index, sample_seed = T.split_key(key)
        image, mask = self.files.read(index)
        with T.seeded(sample_seed):
            item = self._augment(image, mask)
        item["id"] = self.files.item_id(index)
        return item

    def _augment(self, image: torch.Tensor, mask: torch.Tensor) -> dict:
        crop = self.crop_size
        image, mask = T.as_tv(image, mask)
        long_side = T.random_long_side(self.base_size, self.scale_range)
        h, w = T.scaled_size(*image.shape[-2:], long_side, min_side=self.stride)
        win = (sample_pair_windows(h, w, crop, self.stride, self.iou_bound, self.max_tries) if self.context
               else same_window(h, w, crop, self.stride))
        image, mask = T.resize_pair(image, mask, (h, w))
        image, mask = T.pad_pair(image, mask, crop, self.ignore_index)
        out_image = torch.empty(2, 3, crop, crop)  # [2, 3, S, S]
        out_label = torch.empty(2, crop, crop, dtype=torch.long)  # [2, S, S]
        flips = [T.coin(0.5), T.coin(0.5)]  # all geometry is drawn before any photometric draw
        for k, ((top, left), flip) in enumerate(zip((win.offset_a, win.offset_b), flips)):
            crop_img, crop_mask = T.crop_pair(image, mask, top, left, crop)
            if flip:
                crop_img, crop_mask = T.hflip_pair(crop_img, crop_mask)
            if self.photometric:
                crop_img = T.photometric(crop_img)
            T.normalize_into(crop_img, out_image[k])
            out_label[k].copy_(crop_mask)
        return {"image": out_image, "label": out_label,
                "overlap": torch.tensor([win.box_a, win.box_b], dtype=torch.long),
                "flip": torch.tensor(flips, dtype=torch.bool)}

