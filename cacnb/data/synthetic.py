"""A small synthetic dataset in the exact PASCAL VOC 2012 layout: the embedded default of cacnb.

``make_synthetic_voc(root, num_train, num_val, seed)`` writes::

    root/VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg                   RGB, fixed JPEG quality
        SegmentationClassAug/<id>.png         8-bit palette PNG with the VOC colour map; 0 = background,
                                              class indices for objects, 255 on a thin band along borders
        ImageSets/Segmentation/train_aug.txt  one id per line
        ImageSets/Segmentation/val.txt
        cacnb_synthetic.json                  the generator's parameters

so the VOC reader loads it exactly as it loads the real dataset.

Scenes are a textured background (class 0) with 1 to 4 objects drawn from eight VOC classes. Every class has its
own shape family and its own colour and texture; per-instance jitter, rotation, scale, position and occlusion
(later objects cover earlier ones) keep it from being trivial, while colour + texture keep it learnable by a small
network in a few CPU minutes. Image sizes vary, landscape and portrait.

Each image comes from its own ``numpy`` Generator seeded by ``(seed, split, index)``, so a seed gives byte-identical
files on every run, and image ``i`` does not depend on how many others are made. Everything is written into a
temporary folder inside ``root`` and renamed into place at the end: an interrupted run leaves no half dataset.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..paths import resolve
from .errors import DatasetError, with_readme
from .palette import VOC_CLASSES, voc_palette

FORMAT_VERSION = 1
JPEG_QUALITY = 90
META_NAME = "cacnb_synthetic.json"
_TMP_PREFIX = ".cacnb-synthetic-partial-"
# Smaller than VOC's ~500x375 on purpose: the CPU demo evaluates whole images every epoch. Pass
# size_range=(200, 500) for VOC-sized scenes.
DEFAULT_SIZE_RANGE = (160, 320)


# ---------------------------------------------------------------------------------------------------------------
# shapes: vertices of a unit-size outline, scaled/rotated later. Each returns [k, 2] (x, y) in [-1, 1].


def _ellipse(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], 1)


def _regular(k: int, phase: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False) + phase
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False) - np.pi / 2
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)


def _cross(arm: float = 0.32) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                     (-1, -a), (-a, -a)], dtype=np.float64)


def _capsule(n: int = 12) -> np.ndarray:
    """A vertical stadium: half-circles of radius 0.45 on top and bottom of a 0.45-wide column."""
    r = 0.45
    t_top = np.linspace(np.pi, 2 * np.pi, n)
    t_bot = np.linspace(0, np.pi, n)
    top = np.stack([r * np.cos(t_top), -1 + r + r * np.sin(t_top)], 1)
    bot = np.stack([r * np.cos(t_bot), 1 - r + r * np.sin(t_bot)], 1)
    return np.concatenate([top, bot])


SHAPES: dict[str, Callable[[], np.ndarray]] = {
    "ellipse": _ellipse,
    "rectangle": lambda: np.array([(-1, -0.6), (1, -0.6), (1, 0.6), (-1, 0.6)], dtype=np.float64),
    "triangle": lambda: _regular(3, -np.pi / 2),
    "star": _star,
    "ring": _ellipse,          # drawn with a hole
    "cross": _cross,
    "capsule": _capsule,
    "hexagon": lambda: _regular(6),
}


# ---------------------------------------------------------------------------------------------------------------
# classes: VOC index, shape family, base colour, texture


@dataclass(frozen=True)
class ObjectClass:
    index: int                  # VOC class index
    shape: str                  # key of SHAPES
    colour: tuple[int, int, int]
    texture: str                # key of TEXTURES
    radius: tuple[float, float] = (0.1, 0.3)   # instance radius as a fraction of the image's short side
    region: Optional[str] = None               # "water" | "ground": the only kind of scene it occurs in (context)


OBJECT_CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass(1, "cross", (70, 200, 235), "smooth"),        # aeroplane: cyan, smooth gradient
    ObjectClass(3, "triangle", (235, 210, 40), "speckle"),    # bird: yellow with dark speckles
    ObjectClass(6, "rectangle", (215, 45, 35), "hstripes"),   # bus: red, horizontal stripes
    ObjectClass(7, "ring", (45, 75, 215), "checker"),         # car: blue checkerboard
    ObjectClass(8, "ellipse", (245, 135, 30), "grain"),       # cat: orange, coarse grain
    ObjectClass(12, "star", (120, 70, 35), "blotches"),       # dog: brown blotches
    ObjectClass(15, "capsule", (230, 90, 185), "vstripes"),   # person: pink, vertical stripes
    ObjectClass(16, "hexagon", (45, 170, 65), "spots"),       # pottedplant: green with pale spots
)


# The context benchmark (``style="context"``): two pairs of classes that look exactly alike, so that a small
# receptive field cannot tell them apart and only context can.
# * boat / car: one appearance; a boat occurs only in water scenes, a car only in ground scenes (the background,
#   class 0, fills the whole image; a scene-level rule, so that almost every crop still shows it).
# * bird / bus: one appearance; birds are small, buses large: only the extent of the object tells.
# aeroplane, bicycle and bottle have looks of their own and anchor the task. They are textured (a flat colour is
# what background clutter looks like after the paper's grayscale) and large enough (since version 3) that their
# thinnest parts span a few cells of CAC's stride-8 features.
_VEHICLE = dict(shape="rectangle", colour=(215, 45, 35), texture="hstripes", radius=(0.12, 0.22))
_BLOB = dict(shape="ellipse", colour=(245, 135, 30), texture="grain")
CONTEXT_CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass(1, "cross", (70, 200, 235), "spots", radius=(0.15, 0.27)),        # aeroplane
    ObjectClass(2, "ring", (45, 75, 215), "checker", radius=(0.15, 0.27)),        # bicycle
    ObjectClass(3, radius=(0.05, 0.09), **_BLOB),                                  # bird: small blob
    ObjectClass(4, region="water", **_VEHICLE),                                    # boat: only in water scenes
    ObjectClass(5, "capsule", (230, 90, 185), "vstripes", radius=(0.15, 0.27)),   # bottle
    ObjectClass(6, radius=(0.2, 0.3), **_BLOB),                                    # bus: large blob
    ObjectClass(7, region="ground", **_VEHICLE),                                   # car: only in ground scenes
)
# the ambiguous classes are drawn twice as often as the others
_CONTEXT_WEIGHTS = np.array([1.0, 1.0, 2.0, 2.0, 1.0, 2.0, 2.0]) / 11.0


def synthetic_class_indices(style: str = "objects") -> list[int]:
    """The VOC indices that occur in the synthetic set (besides 0 = background and 255 = border)."""
    return sorted(c.index for c in _style(style).classes)


# ---------------------------------------------------------------------------------------------------------------
# textures: (rng, h, w) -> multiplicative modulation [h, w] (about 1) applied to the base colour


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w].astype(np.float32)


def _lowres_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a ``cells``-sized random grid upsampled bicubically to [h, w]."""
    small = rng.random((max(2, cells), max(2, cells)), dtype=np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _tex_smooth(rng, h, w):
    yy, xx = _grid(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / max(h, w)
    return 0.85 + 0.3 * (ramp - ramp.min())


def _tex_speckle(rng, h, w):
    return np.where(rng.random((h, w), dtype=np.float32) < 0.08, 0.3, 1.0).astype(np.float32)


def _stripes(rng, coord):
    period = rng.uniform(5.0, 9.0)
    return np.where(np.sin(coord * (2 * np.pi / period) + rng.uniform(0, 6.3)) > 0, 1.08, 0.62).astype(np.float32)


def _tex_hstripes(rng, h, w):
    return _stripes(rng, _grid(h, w)[0])


def _tex_vstripes(rng, h, w):
    return _stripes(rng, _grid(h, w)[1])


def _tex_checker(rng, h, w):
    yy, xx = _grid(h, w)
    cell = rng.uniform(5.0, 9.0)
    parity = (np.floor(yy / cell) + np.floor(xx / cell)) % 2
    return np.where(parity > 0, 1.15, 0.6).astype(np.float32)


def _tex_grain(rng, h, w):
    return 1.0 + 0.22 * rng.standard_normal((h, w), dtype=np.float32)


def _tex_blotches(rng, h, w):
    cells = max(3, min(h, w) // 8)
    return 0.55 + 0.9 * _lowres_noise(rng, h, w, cells)


def _tex_spots(rng, h, w):
    cells = max(3, min(h, w) // 5)
    return np.where(_lowres_noise(rng, h, w, cells) > 0.62, 1.45, 0.95).astype(np.float32)


TEXTURES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "smooth": _tex_smooth, "speckle": _tex_speckle, "hstripes": _tex_hstripes, "vstripes": _tex_vstripes,
    "checker": _tex_checker, "grain": _tex_grain, "blotches": _tex_blotches, "spots": _tex_spots,
}


# ---------------------------------------------------------------------------------------------------------------
# one scene


def _image_size(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
    """(height, width): long side in the upper part of ``size_range``, landscape / portrait / square."""
    lo, hi = size_range
    long_side = int(rng.integers(max(lo, int(0.7 * hi)), hi + 1))
    short_side = int(np.clip(round(long_side * rng.uniform(0.6, 0.9)), lo, long_side))
    kind = rng.random()
    if kind < 0.55:
        return short_side, long_side            # landscape
    if kind < 0.85:
        return long_side, short_side            # portrait
    return long_side, long_side                 # square


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """Low-saturation colour: backgrounds stay apart from the saturated object colours."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.85))
    return np.array([r, g, b], dtype=np.float32) * 255


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """[h, w, 3] float: two muted colours mixed by clouds, a gradient, or a wavy horizon, plus grain."""
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    kind = rng.integers(3)
    if kind == 0:
        mix = _lowres_noise(rng, h, w, int(rng.integers(3, 7)))
    elif kind == 1:
        mix = _tex_smooth(rng, h, w) - 0.85
        mix = mix / max(float(mix.max()), 1e-6)
    else:
        yy, xx = _grid(h, w)
        horizon = h * rng.uniform(0.3, 0.7) + 0.06 * h * np.sin(xx / w * rng.uniform(2, 8) + rng.uniform(0, 6.3))
        mix = (yy > horizon).astype(np.float32)
    mix = mix[..., None]                                                   # [h, w, 1]
    bg = c1 * (1 - mix) + c2 * mix                                         # [h, w, 3]
    # surface texture: faint blotches plus grain, so that "flat colour" never means background
    grain = 10 * rng.standard_normal((h, w), dtype=np.float32)
    blotch = 0.88 + 0.24 * _lowres_noise(rng, h, w, int(rng.integers(8, 20)))
    return bg * blotch[..., None] + grain[..., None]


def _object_mask(rng: np.random.Generator, cls: ObjectClass, radius: float) -> np.ndarray:
    """bool [s, s] mask of one rotated, stretched instance centred in an s x s canvas."""
    aspect = rng.uniform(0.75, 1.3)
    angle = rng.uniform(0, 2 * np.pi) if cls.shape != "capsule" else rng.uniform(-0.4, 0.4)
    pts = SHAPES[cls.shape]() * np.array([radius * aspect, radius / aspect])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T
    size = int(np.ceil(np.abs(pts).max())) * 2 + 3
    pts = pts + size / 2
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([tuple(p) for p in pts], fill=1)
    if cls.shape == "ring":
        hole = (pts - size / 2) * 0.5 + size / 2
        draw.polygon([tuple(p) for p in hole], fill=0)
    return np.asarray(canvas, dtype=bool)


def _object_centre(rng, h, w, radius, previous):
    """Mostly uniform; sometimes next to the previous object so that it occludes it."""
    if previous is not None and rng.random() < 0.5:
        py, px, pr = previous
        angle = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(0.5, 1.1) * (pr + radius)
        return py + dist * np.sin(angle), px + dist * np.cos(angle)
    return rng.uniform(0.12, 0.88) * h, rng.uniform(0.12, 0.88) * w


def _paste(image, label, mask, patch, cls_index, cy, cx):
    """Write ``patch`` [s, s, 3] and ``cls_index`` where ``mask`` is set, clipped to the image."""
    h, w = label.shape
    s = mask.shape[0]
    top, left = int(round(cy)) - s // 2, int(round(cx)) - s // 2
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + s, h), min(left + s, w)
    if y0 >= y1 or x0 >= x1:
        return
    m = mask[y0 - top:y1 - top, x0 - left:x1 - left]
    image[y0:y1, x0:x1][m] = patch[y0 - top:y1 - top, x0 - left:x1 - left][m]
    label[y0:y1, x0:x1][m] = cls_index


def _appearance(rng: np.random.Generator, cls: ObjectClass, s: int) -> np.ndarray:
    """[s, s, 3] float: the class colour, jittered per instance, modulated by the class texture."""
    colour = np.asarray(cls.colour, dtype=np.float32) + rng.normal(0, 12, 3).astype(np.float32)
    colour = colour * rng.uniform(0.85, 1.1)
    modulation = TEXTURES[cls.texture](rng, s, s)[..., None]               # [s, s, 1]
    return colour * modulation


def _varied_appearance(rng: np.random.Generator, cls: ObjectClass, s: int) -> np.ndarray:
    """[s, s, 3] float for the context benchmark: like :func:`_appearance`, with a wider per-instance spread
    (hue +-0.06, saturation x0.55-1.1, value x0.6-1.15, texture contrast x0.5-1.3), so that a few labeled images
    do not show every look a class takes: the unlabeled pool does."""
    hue, sat, val = colorsys.rgb_to_hsv(*(np.asarray(cls.colour, dtype=np.float64) / 255))
    hue = (hue + rng.uniform(-0.06, 0.06)) % 1.0
    sat = min(1.0, sat * rng.uniform(0.55, 1.1))
    val = min(1.0, val * rng.uniform(0.6, 1.15))
    colour = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255
    modulation = TEXTURES[cls.texture](rng, s, s)[..., None]               # [s, s, 1]
    return colour * (1.0 + rng.uniform(0.5, 1.3) * (modulation - 1.0))


def _clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Muted blobs on the background (still class 0): a flat patch of colour is not by itself an object."""
    h, w = image.shape[:2]
    yy, xx = _grid(h, w)
    for _ in range(count):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.04, 0.12) * min(h, w), rng.uniform(0.04, 0.12) * min(h, w)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0             # [h, w]
        image[blob] = 0.5 * image[blob] + 0.5 * _muted_colour(rng)


def _border_band(label: np.ndarray, width: int) -> np.ndarray:
    """bool [h, w]: a band about ``width`` px wide centred on every class change (VOC marks it 255)."""
    band = np.zeros(label.shape, dtype=bool)
    if width <= 0:
        return band
    dy = label[1:] != label[:-1]                                          # [h-1, w] vertical changes
    dx = label[:, 1:] != label[:, :-1]                                    # [h, w-1] horizontal changes
    band[1:] |= dy
    band[:-1] |= dy                                                       # both sides: 2 px wide
    band[:, 1:] |= dx
    band[:, :-1] |= dx
    for _ in range((width - 1) // 2):                                     # widen by 1 px per side
        grown = band.copy()
        grown[1:] |= band[:-1]
        grown[:-1] |= band[1:]
        grown[:, 1:] |= band[:, :-1]
        grown[:, :-1] |= band[:, 1:]
        band = grown
    return band


def render_scene(rng: np.random.Generator, size_range: tuple[int, int] = DEFAULT_SIZE_RANGE,
                 max_objects: int = 4, border: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 [H, W, 3], label uint8 [H, W] with 0, class indices and 255 borders)."""
    h, w = _image_size(rng, size_range)
    image = _background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)
    previous = None
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))]
        radius = rng.uniform(*cls.radius) * min(h, w)
        cy, cx = _object_centre(rng, h, w, radius, previous)
        mask = _object_mask(rng, cls, radius)
        _paste(image, label, mask, _appearance(rng, cls, mask.shape[0]), cls.index, cy, cx)
        previous = (cy, cx, radius)
    # global lighting and sensor noise
    image *= rng.uniform(0.85, 1.15)
    image += 4 * rng.standard_normal(image.shape, dtype=np.float32)
    label[_border_band(label, border)] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def _region_colour(rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float]) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(*hue), rng.uniform(*sat), rng.uniform(0.45, 0.75))
    return np.array([r, g, b], dtype=np.float32) * 255


def _scene_background(rng: np.random.Generator, h: int, w: int, water: bool) -> np.ndarray:
    """[h, w, 3] float background of one kind (class 0): water (horizontal ripples, a faint blue tint) or ground
    (blotchy, a faint brown tint), with sensor noise.

    The scene is near-grey (saturation 0.08-0.2) and its kind is told by its texture. The objects are saturated,
    so that under the paper's photometric augmentation (hue +-0.1, saturation x0.6-1.4) an object stays apart
    from its scene by more than its hue. In version 2 the scenes were coloured (water blue, ground brown, saturation up to 0.5), near the hues
    of the cyan, blue and red classes, and CAC lowered the val IoU of the cyan and blue ones (data_README)."""
    yy, xx = _grid(h, w)
    if water:
        period = rng.uniform(4.0, 7.0)
        pattern = 0.85 + 0.25 * (np.sin(yy * (2 * np.pi / period) + 0.6 * np.sin(xx / 9.0)) > 0)
        rgb = _region_colour(rng, (0.55, 0.62), (0.08, 0.2))
    else:
        pattern = 0.8 + 0.4 * _lowres_noise(rng, h, w, int(rng.integers(4, 10)))
        rgb = _region_colour(rng, (0.06, 0.12), (0.08, 0.2))
    return rgb * pattern[..., None] + 8 * rng.standard_normal((h, w, 1), dtype=np.float32)


def _scene_class(rng: np.random.Generator, water: bool) -> ObjectClass:
    """A class drawn with :data:`_CONTEXT_WEIGHTS`; a region class drawn for the other kind of scene becomes its
    look-alike of this scene (a boat in a ground scene is a car), so the rule holds without exceptions."""
    cls = CONTEXT_CLASSES[int(rng.choice(len(CONTEXT_CLASSES), p=_CONTEXT_WEIGHTS))]
    if cls.region is None or (cls.region == "water") == water:
        return cls
    return next(c for c in CONTEXT_CLASSES if c.region == ("water" if water else "ground"))


def render_context_scene(rng: np.random.Generator, size_range: tuple[int, int] = (96, 144),
                         max_objects: int = 5, border: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One scene of the context benchmark (see :data:`CONTEXT_CLASSES`): a water scene or a ground scene (even
    odds), background clutter and 2 to ``max_objects`` objects. Boats occur only in water scenes and cars only
    in ground scenes. Returns (image uint8 [H, W, 3], label uint8 [H, W])."""
    h, w = _image_size(rng, size_range)
    water = bool(rng.random() < 0.5)
    image = _scene_background(rng, h, w, water)
    _clutter(rng, image, int(rng.integers(0, 4)))
    label = np.zeros((h, w), dtype=np.uint8)
    for _ in range(int(rng.integers(2, max_objects + 1))):
        cls = _scene_class(rng, water)
        radius = rng.uniform(*cls.radius) * min(h, w)
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        mask = _object_mask(rng, cls, radius)
        _paste(image, label, mask, _varied_appearance(rng, cls, mask.shape[0]), cls.index, cy, cx)
    image *= rng.uniform(0.85, 1.15)
    image += 4 * rng.standard_normal(image.shape, dtype=np.float32)
    label[_border_band(label, border)] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


@dataclass(frozen=True)
class SceneStyle:
    render: Callable[..., tuple[np.ndarray, np.ndarray]]
    classes: tuple[ObjectClass, ...]
    size_range: tuple[int, int]       # default (min, max) image side
    max_objects: int
    version: int = FORMAT_VERSION     # bumped when the style's images change; a kept set of another version warns


STYLES: dict[str, SceneStyle] = {
    "objects": SceneStyle(render_scene, OBJECT_CLASSES, DEFAULT_SIZE_RANGE, 4),    # the quick demo set
    # the benchmark. Version 1 put boats and cars on two sides of a horizon; version 2 made the context
    # scene-wide; version 3 makes the scenes near-grey (see _scene_background), the aeroplane spotted, and the
    # aeroplane, bicycle and bottle larger (see CONTEXT_CLASSES)
    "context": SceneStyle(render_context_scene, CONTEXT_CLASSES, (96, 144), 5, version=3),
}


def _style(name: str) -> SceneStyle:
    if name not in STYLES:
        raise ValueError(f"unknown synthetic style {name!r}; choose one of {sorted(STYLES)}")
    return STYLES[name]


# ---------------------------------------------------------------------------------------------------------------
# writing the dataset


def _save_sample(voc: Path, sample_id: str, image: np.ndarray, label: np.ndarray, pal: list[int]) -> None:
    Image.fromarray(image).save(voc / "JPEGImages" / f"{sample_id}.jpg", quality=JPEG_QUALITY)
    png = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label).tobytes())
    png.putpalette(pal)
    png.save(voc / "SegmentationClassAug" / f"{sample_id}.png")


def sample_ids(num_train: int, num_val: int, num_test: int = 0) -> tuple[list[str], list[str], list[str]]:
    return ([f"synth_train_{i:05d}" for i in range(num_train)], [f"synth_val_{i:05d}" for i in range(num_val)],
            [f"synth_test_{i:05d}" for i in range(num_test)])


def _meta(num_train, num_val, num_test, style, seed, size_range, max_objects, border) -> dict:
    meta = {"generator": "cacnb.data.synthetic", "format_version": _style(style).version, "seed": seed,
            "num_train": num_train, "num_val": num_val, "size_range": list(size_range),
            "max_objects": max_objects, "border": border, "jpeg_quality": JPEG_QUALITY,
            "classes": {str(c.index): VOC_CLASSES[c.index] for c in _style(style).classes}}
    if style != "objects" or num_test:  # sets written before styles and test splits existed keep their marker
        meta.update(style=style, num_test=num_test)
    return meta


def is_complete(voc: "str | os.PathLike") -> bool:
    """True when ``voc`` (a VOC2012 folder) holds a finished synthetic dataset."""
    voc = Path(voc)
    return (voc / META_NAME).is_file() and (voc / "ImageSets" / "Segmentation" / "val.txt").is_file()


def _clean_stale_partials(root: Path) -> None:
    """Remove temporary folders left by runs that were killed (their process no longer exists)."""
    for tmp in root.glob(f"{_TMP_PREFIX}*"):
        pid = tmp.name[len(_TMP_PREFIX):].split("-")[0]
        try:
            os.kill(int(pid), 0)
            continue                                  # still running: leave it alone
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            continue


def _generate(voc: Path, splits: Sequence[tuple[str, int, list[str]]], style: SceneStyle, seed: int, size_range,
              max_objects, border, progress: bool) -> None:
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    pal = voc_palette()
    total = sum(len(ids) for _, _, ids in splits)
    with tqdm(total=total, desc="synthetic VOC", unit="img", disable=not progress) as bar:
        for _, split_code, ids in splits:
            for i, sample_id in enumerate(ids):
                rng = np.random.default_rng([seed, split_code, i])
                image, label = style.render(rng, size_range, max_objects, border)
                _save_sample(voc, sample_id, image, label, pal)
                bar.update(1)
    for list_name, _, ids in splits:
        (voc / "ImageSets" / "Segmentation" / list_name).write_text("".join(f"{i}\n" for i in ids))


def make_synthetic_voc(root: "str | os.PathLike", num_train: int = 240, num_val: int = 40, seed: int = 0, *,
                       num_test: int = 0, style: str = "objects", size_range: Optional[tuple[int, int]] = None,
                       max_objects: Optional[int] = None, border: int = 2, overwrite: bool = False,
                       progress: bool = True) -> Path:
    """Write a synthetic VOC 2012 tree under ``root`` and return ``root/VOCdevkit/VOC2012``.

    Args:
        root: folder that will hold ``VOCdevkit/`` (created if missing).
        num_train, num_val, num_test: images listed in ``train_aug.txt``, ``val.txt`` and (when > 0)
            ``test.txt``; the three sets are disjoint (ids ``synth_{train,val,test}_<i>``, each drawn from its own
            seed stream).
        seed: the same seed gives byte-identical files.
        style: ``"objects"`` (the quick demo set: every class has its own look) or ``"context"`` (the benchmark:
            two pairs of look-alike classes that only context separates; see :data:`CONTEXT_CLASSES`).
        size_range: (min, max) side length in pixels; default: the style's (VOC images are at most 500 px; the
            defaults are smaller so that the CPU demo can evaluate whole images quickly).
        max_objects: upper bound of the objects per image; default: the style's.
        border: width in pixels of the 255 band along class borders (0: none).
        overwrite: replace an existing dataset; otherwise an existing complete one is kept and returned.
        progress: show a tqdm bar and messages.
    """
    if num_train < 1 or num_val < 1 or num_test < 0:
        raise ValueError(f"num_train and num_val must be >= 1 and num_test >= 0, got {num_train}, {num_val} and "
                         f"{num_test}")
    scene = _style(style)
    size_range = tuple(size_range or scene.size_range)
    max_objects = max_objects or scene.max_objects
    lo, hi = size_range
    if not 16 <= lo <= hi:
        raise ValueError(f"size_range must be (min, max) with 16 <= min <= max, got {size_range}")
    root = Path(root)
    devkit = root / "VOCdevkit"
    voc = devkit / "VOC2012"
    meta = _meta(num_train, num_val, num_test, style, seed, size_range, max_objects, border)
    if devkit.exists() and not overwrite:
        return _existing(voc, meta, progress)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(root)
    tmp = root / f"{_TMP_PREFIX}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train_ids, val_ids, test_ids = sample_ids(num_train, num_val, num_test)
        splits = [("train_aug.txt", 0, train_ids), ("val.txt", 1, val_ids)]
        if num_test:
            splits.append(("test.txt", 2, test_ids))
        _generate(tmp / "VOCdevkit" / "VOC2012", splits, scene, seed, size_range, max_objects, border, progress)
        # the marker goes last: a folder holding it is complete
        (tmp / "VOCdevkit" / "VOC2012" / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp / "VOCdevkit", devkit, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        test = f" + {num_test} test" if num_test else ""
        print(f"synthetic VOC ({style}): {num_train} train + {num_val} val{test} images written to {voc}")
    return voc


def make_synthetic_for(data_cfg, root: "str | os.PathLike | None" = None, progress: bool = True) -> Path:
    """Write the synthetic set a :class:`cacnb.config.DataConfig` describes (its ``synthetic_*`` keys) under
    ``root`` (default: ``data_dir``); an existing complete set is kept."""
    return make_synthetic_voc(root or data_cfg.data_dir, data_cfg.synthetic_train, data_cfg.synthetic_val, seed=0,
                              num_test=data_cfg.synthetic_test, style=data_cfg.synthetic_style, progress=progress)


def make_command(data_cfg, root: "str | os.PathLike") -> str:
    """The shell command that writes the synthetic set of ``data_cfg`` at ``root`` (for error messages)."""
    test = f" --num-test {data_cfg.synthetic_test}" if data_cfg.synthetic_test else ""
    return (f"python -m cacnb.data.synthetic --root {root} --style {data_cfg.synthetic_style} "
            f"--num-train {data_cfg.synthetic_train} --num-val {data_cfg.synthetic_val}{test}")


def _existing(voc: Path, meta: dict, progress: bool) -> Path:
    if not is_complete(voc):
        raise DatasetError(with_readme(
            f"{voc.parent} exists but does not hold a complete synthetic dataset (no {META_NAME} / val.txt). "
            f"Delete it, choose another root, or regenerate with overwrite=True (CLI: --force)."))
    _warn_if_settings_differ(voc, meta)
    if progress:
        print(f"synthetic VOC already exists at {voc}; skipping")
    return voc


def _warn_if_settings_differ(voc: Path, meta: dict) -> None:
    """Warn (whatever ``progress`` says) when the kept dataset was made with other settings: a silent
    mismatch would make runs use data other than the one asked for."""
    old = json.loads((voc / META_NAME).read_text())
    differ = [k for k, v in meta.items() if k != "classes" and old.get(k) != v]
    if not differ and old.get("classes") == meta["classes"]:
        return
    shown = ", ".join(f"{k}={old.get(k)!r} (requested {meta[k]!r})" for k in differ) or "another class table"
    warnings.warn(f"the synthetic dataset in {voc} was made with other settings: {shown}. It is kept and used "
                  f"as it is; pass overwrite=True (CLI: --force) to regenerate it.", stacklevel=4)


def _swap_into_place(new: Path, target: Path, overwrite: bool) -> None:
    """Rename ``new`` to ``target``. With ``overwrite`` an existing ``target`` is moved aside first and deleted
    after; without it, a complete ``target`` that another process finished meanwhile is kept."""
    old = None
    if target.exists() and overwrite:
        old = target.with_name(f"{_TMP_PREFIX}{os.getpid()}-old")
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if not is_complete(target / "VOC2012"):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cacnb.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data/synthetic", help="folder that will hold VOCdevkit/")
    parser.add_argument("--num-train", type=int, default=240)
    parser.add_argument("--num-val", type=int, default=40)
    parser.add_argument("--num-test", type=int, default=0, help="images of a held-out test split (0: none)")
    parser.add_argument("--style", default="objects", choices=sorted(STYLES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=None, help="smallest image side (default: the style's)")
    parser.add_argument("--max-size", type=int, default=None, help="largest image side (default: the style's)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the dataset exists")
    args = parser.parse_args(argv)

    try:
        default_lo, default_hi = _style(args.style).size_range
        make_synthetic_voc(resolve(args.root), args.num_train, args.num_val, args.seed, num_test=args.num_test,
                           style=args.style, size_range=(args.min_size or default_lo, args.max_size or default_hi),
                           overwrite=args.force)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
