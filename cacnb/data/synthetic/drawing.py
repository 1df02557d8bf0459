"""Drawing primitives shared by every synthetic style: outlines, textures, object masks, pasting, clutter and the
VOC-style 255 band along class borders. Each takes a ``numpy`` Generator, so a scene is a pure function of its
seed.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

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



# ---------------------------------------------------------------------------------------------------------------
# textures: (rng, h, w) -> multiplicative modulation [h, w] (about 1) applied to the base colour


def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w].astype(np.float32)


def lowres_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a ``cells``-sized random grid upsampled bicubically to [h, w]."""
    small = rng.random((max(2, cells), max(2, cells)), dtype=np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _tex_smooth(rng, h, w):
    yy, xx = grid(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / max(h, w)
    return 0.85 + 0.3 * (ramp - ramp.min())


def _tex_speckle(rng, h, w):
    return np.where(rng.random((h, w), dtype=np.float32) < 0.08, 0.3, 1.0).astype(np.float32)


def _stripes(rng, coord):
    period = rng.uniform(5.0, 9.0)
    return np.where(np.sin(coord * (2 * np.pi / period) + rng.uniform(0, 6.3)) > 0, 1.08, 0.62).astype(np.float32)


def _tex_hstripes(rng, h, w):
    return _stripes(rng, grid(h, w)[0])


def _tex_vstripes(rng, h, w):
    return _stripes(rng, grid(h, w)[1])


def _tex_checker(rng, h, w):
    yy, xx = grid(h, w)
    cell = rng.uniform(5.0, 9.0)
    parity = (np.floor(yy / cell) + np.floor(xx / cell)) % 2
    return np.where(parity > 0, 1.15, 0.6).astype(np.float32)


def _tex_grain(rng, h, w):
    return 1.0 + 0.22 * rng.standard_normal((h, w), dtype=np.float32)


def _tex_blotches(rng, h, w):
    cells = max(3, min(h, w) // 8)
    return 0.55 + 0.9 * lowres_noise(rng, h, w, cells)


def _tex_spots(rng, h, w):
    cells = max(3, min(h, w) // 5)
    return np.where(lowres_noise(rng, h, w, cells) > 0.62, 1.45, 0.95).astype(np.float32)


TEXTURES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "smooth": _tex_smooth, "speckle": _tex_speckle, "hstripes": _tex_hstripes, "vstripes": _tex_vstripes,
    "checker": _tex_checker, "grain": _tex_grain, "blotches": _tex_blotches, "spots": _tex_spots,
}


# ---------------------------------------------------------------------------------------------------------------
# one scene


def image_size(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
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


def muted_colour(rng: np.random.Generator) -> np.ndarray:
    """Low-saturation colour: backgrounds stay apart from the saturated object colours."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.85))
    return np.array([r, g, b], dtype=np.float32) * 255


def object_mask(rng: np.random.Generator, cls: ObjectClass, radius: float) -> np.ndarray:
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


def paste(image, label, mask, patch, cls_index, cy, cx):
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


def appearance(rng: np.random.Generator, cls: ObjectClass, s: int) -> np.ndarray:
    """[s, s, 3] float: the class colour, jittered per instance, modulated by the class texture."""
    colour = np.asarray(cls.colour, dtype=np.float32) + rng.normal(0, 12, 3).astype(np.float32)
    colour = colour * rng.uniform(0.85, 1.1)
    modulation = TEXTURES[cls.texture](rng, s, s)[..., None]               # [s, s, 1]
    return colour * modulation


def varied_appearance(rng: np.random.Generator, cls: ObjectClass, s: int) -> np.ndarray:
    """[s, s, 3] float for the context benchmark: like :func:`appearance`, with a wider per-instance spread
    (hue +-0.06, saturation x0.55-1.1, value x0.6-1.15, texture contrast x0.5-1.3), so that a few labeled images
    do not show every look a class takes: the unlabeled pool does."""
    hue, sat, val = colorsys.rgb_to_hsv(*(np.asarray(cls.colour, dtype=np.float64) / 255))
    hue = (hue + rng.uniform(-0.06, 0.06)) % 1.0
    sat = min(1.0, sat * rng.uniform(0.55, 1.1))
    val = min(1.0, val * rng.uniform(0.6, 1.15))
    colour = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255
    modulation = TEXTURES[cls.texture](rng, s, s)[..., None]               # [s, s, 1]
    return colour * (1.0 + rng.uniform(0.5, 1.3) * (modulation - 1.0))


def clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Muted blobs on the background (still class 0): a flat patch of colour is not by itself an object."""
    h, w = image.shape[:2]
    yy, xx = grid(h, w)
    for _ in range(count):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.04, 0.12) * min(h, w), rng.uniform(0.04, 0.12) * min(h, w)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0             # [h, w]
        image[blob] = 0.5 * image[blob] + 0.5 * muted_colour(rng)


def border_band(label: np.ndarray, width: int) -> np.ndarray:
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


