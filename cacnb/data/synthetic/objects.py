"""The quick demo style (``objects``): a textured background with 1 to 4 objects of eight VOC classes, each class
with its own shape family, colour and texture; per-instance jitter, rotation, scale, position and occlusion (later
objects cover earlier ones) keep it from being trivial while leaving it learnable in a few CPU minutes.
"""
from __future__ import annotations

import numpy as np

from .drawing import (TEXTURES, ObjectClass, appearance, border_band, grid, image_size, lowres_noise,
                      muted_colour, object_mask, paste)

# Smaller than VOC's ~500x375 on purpose: the CPU demo evaluates whole images every epoch. Pass
# size_range=(200, 500) for VOC-sized scenes.
DEFAULT_SIZE_RANGE = (160, 320)


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


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """[h, w, 3] float: two muted colours mixed by clouds, a gradient, or a wavy horizon, plus grain."""
    c1, c2 = muted_colour(rng), muted_colour(rng)
    kind = rng.integers(3)
    if kind == 0:
        mix = lowres_noise(rng, h, w, int(rng.integers(3, 7)))
    elif kind == 1:
        mix = TEXTURES["smooth"](rng, h, w) - 0.85
        mix = mix / max(float(mix.max()), 1e-6)
    else:
        yy, xx = grid(h, w)
        horizon = h * rng.uniform(0.3, 0.7) + 0.06 * h * np.sin(xx / w * rng.uniform(2, 8) + rng.uniform(0, 6.3))
        mix = (yy > horizon).astype(np.float32)
    mix = mix[..., None]                                                   # [h, w, 1]
    bg = c1 * (1 - mix) + c2 * mix                                         # [h, w, 3]
    # surface texture: faint blotches plus grain, so that "flat colour" never means background
    grain = 10 * rng.standard_normal((h, w), dtype=np.float32)
    blotch = 0.88 + 0.24 * lowres_noise(rng, h, w, int(rng.integers(8, 20)))
    return bg * blotch[..., None] + grain[..., None]


def _object_centre(rng, h, w, radius, previous):
    """Mostly uniform; sometimes next to the previous object so that it occludes it."""
    if previous is not None and rng.random() < 0.5:
        py, px, pr = previous
        angle = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(0.5, 1.1) * (pr + radius)
        return py + dist * np.sin(angle), px + dist * np.cos(angle)
    return rng.uniform(0.12, 0.88) * h, rng.uniform(0.12, 0.88) * w


def render_scene(rng: np.random.Generator, size_range: tuple[int, int] = DEFAULT_SIZE_RANGE,
                 max_objects: int = 4, border: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 [H, W, 3], label uint8 [H, W] with 0, class indices and 255 borders)."""
    h, w = image_size(rng, size_range)
    image = background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)
    previous = None
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))]
        radius = rng.uniform(*cls.radius) * min(h, w)
        cy, cx = _object_centre(rng, h, w, radius, previous)
        mask = object_mask(rng, cls, radius)
        paste(image, label, mask, appearance(rng, cls, mask.shape[0]), cls.index, cy, cx)
        previous = (cy, cx, radius)
    # global lighting and sensor noise
    image *= rng.uniform(0.85, 1.15)
    image += 4 * rng.standard_normal(image.shape, dtype=np.float32)
    label[border_band(label, border)] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


