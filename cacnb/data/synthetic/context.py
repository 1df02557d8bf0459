"""The context benchmark's style (``context``): look-alike classes that only context separates.

Two pairs of classes look exactly alike, so that a small receptive field cannot tell them apart and only context
can (see :data:`CONTEXT_CLASSES`): boats occur only in water scenes and cars only in ground scenes; birds are
small and buses large. The scenes are near-grey and told apart by texture.
"""
from __future__ import annotations

import colorsys

import numpy as np

from .drawing import (ObjectClass, border_band, clutter, grid, image_size, lowres_noise, object_mask, paste,
                      varied_appearance)

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




def _region_colour(rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float]) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(*hue), rng.uniform(*sat), rng.uniform(0.45, 0.75))
    return np.array([r, g, b], dtype=np.float32) * 255


def scene_background(rng: np.random.Generator, h: int, w: int, water: bool) -> np.ndarray:
    """[h, w, 3] float background of one kind (class 0): water (horizontal ripples, a faint blue tint) or ground
    (blotchy, a faint brown tint), with sensor noise.

    The scene is near-grey (saturation 0.08-0.2) and its kind is told by its texture. The objects are saturated,
    so that under the paper's photometric augmentation (hue +-0.1, saturation x0.6-1.4) an object stays apart
    from its scene by more than its hue. In version 2 the scenes were coloured (water blue, ground brown, saturation up to 0.5), near the hues
    of the cyan, blue and red classes, and CAC lowered the val IoU of the cyan and blue ones (data_README)."""
    yy, xx = grid(h, w)
    if water:
        period = rng.uniform(4.0, 7.0)
        pattern = 0.85 + 0.25 * (np.sin(yy * (2 * np.pi / period) + 0.6 * np.sin(xx / 9.0)) > 0)
        rgb = _region_colour(rng, (0.55, 0.62), (0.08, 0.2))
    else:
        pattern = 0.8 + 0.4 * lowres_noise(rng, h, w, int(rng.integers(4, 10)))
        rgb = _region_colour(rng, (0.06, 0.12), (0.08, 0.2))
    return rgb * pattern[..., None] + 8 * rng.standard_normal((h, w, 1), dtype=np.float32)


def scene_class(rng: np.random.Generator, water: bool) -> ObjectClass:
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
    h, w = image_size(rng, size_range)
    water = bool(rng.random() < 0.5)
    image = scene_background(rng, h, w, water)
    clutter(rng, image, int(rng.integers(0, 4)))
    label = np.zeros((h, w), dtype=np.uint8)
    for _ in range(int(rng.integers(2, max_objects + 1))):
        cls = scene_class(rng, water)
        radius = rng.uniform(*cls.radius) * min(h, w)
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        mask = object_mask(rng, cls, radius)
        paste(image, label, mask, varied_appearance(rng, cls, mask.shape[0]), cls.index, cy, cx)
    image *= rng.uniform(0.85, 1.15)
    image += 4 * rng.standard_normal(image.shape, dtype=np.float32)
    label[border_band(label, border)] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


