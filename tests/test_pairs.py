"""Overlapping crop pairs: pure geometry properties, then pixels and labels through PairDataset."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from cacnb.data import transforms as T
from cacnb.data.pairs import PairDataset, overlap_boxes, sample_pair_windows, window_iou
from cacnb.data.transforms import MEAN_UINT8, denormalize
from cacnb.data.voc import SegFiles

CROP, STRIDE = 64, 8


# ---------------------------------------------------------------------------------------------------------------
# geometry


def _check_windows(h, w, crop, stride, bound, win):
    span_y, span_x = max(h, crop) - crop, max(w, crop) - crop
    for y, x in (win.offset_a, win.offset_b):
        assert 0 <= y <= span_y and 0 <= x <= span_x
    dy, dx = win.offset_b[0] - win.offset_a[0], win.offset_b[1] - win.offset_a[1]
    assert dy % stride == 0 and dx % stride == 0
    if win.fallback:
        assert win.offset_a == win.offset_b
    else:
        assert bound[0] <= window_iou(win.offset_a, win.offset_b, crop) <= bound[1]
    sizes = []
    for (y, x), (t, l, b, r) in ((win.offset_a, win.box_a), (win.offset_b, win.box_b)):
        assert all(v % stride == 0 for v in (t, l, b, r))
        assert 0 <= t < b <= crop and 0 <= l < r <= crop  # non-empty, inside the crop
        assert y + b <= h and x + r <= w  # no padding inside the shared region
        sizes.append((b - t, r - l))
    assert sizes[0] == sizes[1]
    # both boxes are the same canvas region
    assert win.box_a[0] + win.offset_a[0] == win.box_b[0] + win.offset_b[0]
    assert win.box_a[1] + win.offset_a[1] == win.box_b[1] + win.offset_b[1]


def test_windows_properties_over_many_draws():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    fallbacks = 0
    for _ in range(600):
        crop = rng.choice([32, 64, 96])
        h, w = rng.randint(STRIDE, 3 * crop), rng.randint(STRIDE, 3 * crop)  # smaller and larger than the crop
        lo = rng.choice([0.0, 0.1, 0.3, 0.5])
        bound = (lo, rng.choice([lo + 0.2, 1.0]))
        win = sample_pair_windows(h, w, crop, STRIDE, bound, max_tries=20, generator=gen)
        _check_windows(h, w, crop, STRIDE, bound, win)
        fallbacks += win.fallback
    assert fallbacks < 300  # the bounds are usually met, not trivially satisfied by the fallback


def test_windows_fallback_when_bounds_unreachable():
    # any non-zero shift of a 64 crop has IoU <= 0.78 and a zero shift has IoU 1, so (0.9, 0.95) is impossible
    win = sample_pair_windows(200, 300, 64, 8, (0.9, 0.95), max_tries=5, generator=torch.Generator().manual_seed(1))
    assert win.fallback and win.offset_a == win.offset_b and win.box_a == win.box_b
    _check_windows(200, 300, 64, 8, (0.9, 0.95), win)


def _official_boxes(height, width, offset_a, offset_b, crop, stride):
    """The official pair loader's overlap boxes (dataloaders/voc.py, restated): in each crop's coordinates the
    windows' intersection, its bottom/right also capped at the image size rounded down to the stride."""
    boxes = []
    for (y, x), (y_other, x_other) in ((offset_a, offset_b), (offset_b, offset_a)):
        dy, dx = y_other - y, x_other - x
        boxes.append((max(0, dy), max(0, dx), min(crop, crop + dy, height // stride * stride),
                      min(crop, crop + dx, width // stride * stride)))
    return tuple(boxes)


def test_overlap_boxes_equal_the_official_rule():
    """For the same two windows cacnb's boxes are the official ones: both hold no padded pixels (the official cap
    at ``h // 8 * 8`` only binds on an image smaller than the crop, where both windows sit at offset 0)."""
    crop = 64
    for size in range(STRIDE, 3 * crop):                   # images smaller, as large as and larger than the crop
        span = max(size, crop) - crop
        for u in range(span + 1):
            for v in range(u % STRIDE, span + 1, STRIDE):  # offsets that differ by multiples of the stride
                if abs(u - v) >= crop:
                    continue                               # disjoint windows share nothing
                windows = ((u, v), (v, u))                 # crop a at row u, column v; crop b the other way round
                ours = overlap_boxes(size, size, *windows, crop, STRIDE)
                assert ours == _official_boxes(size, size, *windows, crop, STRIDE), (size, windows)
                for (y, x), (top, left, bottom, right) in zip(windows, ours):
                    assert y + bottom <= size and x + right <= size  # no padded pixel inside
    win = sample_pair_windows(20, 45, 64, 8, (0.1, 1.0), generator=torch.Generator().manual_seed(0))
    assert win.offset_a == win.offset_b == (0, 0)  # nothing to slide on a padded canvas of exactly the crop
    assert win.box_a == (0, 0, 16, 40) == _official_boxes(20, 45, (0, 0), (0, 0), 64, 8)[0]


def test_overlap_boxes_rounding():
    # offsets differ by 8 and are not stride-aligned themselves: top/left round up, bottom/right down
    boxes = overlap_boxes(100, 100, (3, 5), (11, 13), 64, 8)
    assert boxes == ((8, 8, 64, 64), (0, 0, 56, 56))
    assert overlap_boxes(100, 200, (0, 0), (0, 64), 64, 8) is None  # touching windows share nothing


def test_iou():
    assert window_iou((0, 0), (0, 0), 64) == 1.0
    assert window_iou((0, 0), (0, 32), 64) == pytest.approx(1 / 3)
    assert window_iou((0, 0), (64, 0), 64) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# pixels


def _palette(num=21):
    rng = np.random.default_rng(123)
    colours = rng.choice(np.arange(16, 240, 16), size=(num, 3))  # distinct, far from each other and from the mean
    while len({tuple(c) for c in colours}) < num:
        colours = rng.choice(np.arange(16, 240, 16), size=(num, 3))
    return colours.astype(np.uint8)


COLOURS = _palette()


def _write(root, name, image, label):
    (root / "img").mkdir(exist_ok=True)
    (root / "lbl").mkdir(exist_ok=True)
    Image.fromarray(image).save(root / "img" / f"{name}.png")
    Image.fromarray(label, mode="L").save(root / "lbl" / f"{name}.png")
    return f"/img/{name}.png", f"/lbl/{name}.png"


def make_images(root, kind: str, sizes, seed=0):
    """``noise``: random pixels and labels (any misalignment shows); ``blocks``: 12-px blocks whose colour encodes
    their label."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i, (h, w) in enumerate(sizes):
        if kind == "noise":
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            label = rng.integers(0, 21, (h, w), dtype=np.uint8)
        else:
            cells = rng.integers(0, 21, (h // 12 + 1, w // 12 + 1))
            label = np.kron(cells, np.ones((12, 12), dtype=np.int64))[:h, :w].astype(np.uint8)
            image = COLOURS[label]
        pairs.append(_write(root, f"{kind}{i}", image, label))
    return SegFiles(root, pairs)


SIZES = [(30, 50), (50, 30), (80, 120), (120, 80), (47, 61), (200, 90), (64, 64), (20, 150)]


@pytest.fixture(scope="module")
def noise_files(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("noise"), "noise", SIZES)


@pytest.fixture(scope="module")
def block_files(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("blocks"), "blocks", SIZES)


def _unflip(item):
    image, label = item["image"].clone(), item["label"].clone()
    for k in range(2):
        if item["flip"][k]:
            image[k], label[k] = image[k].flip(-1), label[k].flip(-1)
    return image, label


def _regions(x, overlap):
    return [x[k][..., t:b, l:r] for k, (t, l, b, r) in enumerate(overlap.tolist())]


def test_contract_shapes_and_types(noise_files):
    ds = PairDataset(noise_files, crop_size=CROP, base_size=80, stride=STRIDE)
    item = ds[(0, 7)]
    assert item["image"].shape == (2, 3, CROP, CROP) and item["image"].dtype == torch.float32
    assert item["label"].shape == (2, CROP, CROP) and item["label"].dtype == torch.long
    assert item["overlap"].shape == (2, 4) and item["overlap"].dtype == torch.long
    assert item["flip"].shape == (2,) and item["flip"].dtype == torch.bool
    assert item["id"] == "noise0"
    batch = torch.utils.data.default_collate([ds[(i, i)] for i in range(3)])
    assert batch["image"].shape == (3, 2, 3, CROP, CROP) and batch["overlap"].shape == (3, 2, 4)
    assert batch["flip"].shape == (3, 2)


@pytest.mark.parametrize("base", [40, 80, 160])  # 40: scaled images smaller than the crop (padding)
def test_overlap_holds_identical_pixels_and_labels(noise_files, base):
    ds = PairDataset(noise_files, crop_size=CROP, base_size=base, stride=STRIDE, iou_bound=(0.1, 1.0),
                     photometric=False)
    flips = set()
    for seed in range(120):
        item = ds[(seed % len(ds), seed)]
        image, label = _unflip(item)
        ov = item["overlap"]
        assert (ov % STRIDE == 0).all()
        img_a, img_b = _regions(image, ov)
        lbl_a, lbl_b = _regions(label, ov)
        assert img_a.numel() > 0
        assert torch.equal(img_a, img_b)
        assert torch.equal(lbl_a, lbl_b)
        assert (lbl_a != 255).all()  # the region never includes padding
        flips.add(tuple(item["flip"].tolist()))
    assert len(flips) == 4  # flips are independent per crop


def test_photometric_changes_pixels_not_geometry(noise_files):
    ds = PairDataset(noise_files, crop_size=CROP, base_size=80, stride=STRIDE, photometric=True)
    plain = PairDataset(noise_files, crop_size=CROP, base_size=80, stride=STRIDE, photometric=False)
    differ = 0
    for seed in range(24):
        item = ds[(seed % len(ds), seed)]
        image, label = _unflip(item)
        lbl_a, lbl_b = _regions(label, item["overlap"])
        assert torch.equal(lbl_a, lbl_b)
        img_a, img_b = _regions(image, item["overlap"])
        differ += not torch.allclose(img_a, img_b)
        assert torch.isfinite(item["image"]).all()
        # photometric draws come after the geometry ones, so the crops are the same as without it
        ref = plain[(seed % len(ds), seed)]
        assert torch.equal(ref["overlap"], item["overlap"]) and torch.equal(ref["label"], item["label"])
    assert differ > 16


def _bilinear(image, size):
    return F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


@pytest.mark.parametrize("base", [40, 100])
def test_labels_stay_aligned_with_colours(block_files, base, monkeypatch):
    # bilinear instead of the (official) bicubic image resize, whose ringing near edges would blur this check of
    # the geometry: crops, flips and padding must keep every label on its pixels
    monkeypatch.setattr(T, "resize_image", _bilinear)
    ds = PairDataset(block_files, crop_size=CROP, base_size=base, stride=STRIDE, photometric=False)
    colours = torch.from_numpy(COLOURS).long()
    checked = 0
    for seed in range(40):
        item = ds[(seed % len(ds), seed)]
        pixels = (denormalize(item["image"]) * 255).round().long()  # [2, 3, S, S]
        for k in range(2):
            checked += _assert_colour_matches_label(pixels[k], item["label"][k], colours)
    assert checked > 40 * 2 * 300  # enough block interiors were compared


def _assert_colour_matches_label(pixels, label, colours, margin=2) -> int:
    """Inside uniform label areas (``margin`` px from any label change) the colour is the label's colour;
    padding (255) has the mean colour. Returns the number of interior pixels compared."""
    lab = label.clone()
    pad = lab == 255
    mean = torch.tensor(MEAN_UINT8).view(3, 1)
    assert ((pixels[:, pad] - mean).abs() <= 1).all()
    lab[pad] = 21
    # uniform (2 * margin + 1)^2 neighbourhood <=> its max equals its min
    k = 2 * margin + 1
    as_float = lab.float()[None, None]
    upper = torch.nn.functional.max_pool2d(as_float, k, stride=1)[0, 0]
    lower = -torch.nn.functional.max_pool2d(-as_float, k, stride=1)[0, 0]
    interior = torch.zeros_like(pad)
    interior[margin:-margin, margin:-margin] = upper == lower
    interior &= ~pad
    expected = colours[lab[interior]].T  # [3, n]
    assert ((pixels[:, interior] - expected).abs() <= 2).all()
    return int(interior.sum())


def test_same_seed_same_crops_different_seed_different(noise_files):
    ds = PairDataset(noise_files, crop_size=CROP, base_size=120, stride=STRIDE)
    a, b = ds[(2, 99)], ds[(2, 99)]
    for key in ("image", "label", "overlap", "flip"):
        assert torch.equal(a[key], b[key])
    others = [ds[(2, s)] for s in range(100, 106)]
    assert any(not torch.equal(a["image"], o["image"]) for o in others)
    assert len({tuple(o["overlap"].flatten().tolist()) for o in others}) > 1


def test_seeded_item_leaves_global_rng_alone(noise_files):
    ds = PairDataset(noise_files, crop_size=CROP, base_size=80, stride=STRIDE)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ds[(0, 1)]
    assert torch.equal(torch.rand(3), expected)
