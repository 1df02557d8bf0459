"""The pretraining set of :mod:`cacnb.pretrain`: this synthetic world's ImageNet, in miniature.

The paper fine-tunes a backbone pretrained on ImageNet classification. Here the backbone is pretrained on images
of the same world as the segmentation benchmark, made for that purpose only:

* **one object per image**, and its class is its **appearance** (shape family, colour, texture), never a VOC
  class: each look-alike pair of the context benchmark (boat/car, bird/bus) is one class here, so pretraining
  cannot tell them apart; that stays the segmentation stage's job (context, extent);
* the looks of the benchmark's world (:data:`CONTEXT_CLASSES`), those of the quick demo set and others of this
  world, so that shape, colour and texture each have to be read to tell the classes apart;
* the benchmark's scene kinds (near-grey water and ground) and the demo set's muted backgrounds, with clutter,
  but **no context rule** (any look on any scene) and **no segmentation labels**;
* sizes drawn from one wide range for every class (a small or a large blob is the same class);
* **its own seed streams** (:data:`PRETRAIN_STREAMS`): image ``i`` of a split comes from the Generator
  ``(seed, stream, i)``, and no stream is one of the segmentation writer's (:data:`~.writer.SPLIT_STREAMS`), so no
  image is shared with the benchmark's train / val / test.

Images are rendered in memory (about 2 ms each at 64 px) as a uint8 tensor; nothing is written to disk.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..palette import VOC_CLASSES
from .context import CONTEXT_CLASSES, scene_background
from .drawing import ObjectClass, clutter, object_mask, paste, varied_appearance
from .objects import OBJECT_CLASSES, background
from .writer import SPLIT_STREAMS

VERSION = 1  # bumped when the images change, so that cacnb.pretrain notices a stale backbone
PRETRAIN_STREAMS = {"train": 7, "heldout": 8}
assert not set(PRETRAIN_STREAMS.values()) & set(SPLIT_STREAMS.values())
RADIUS = (0.12, 0.38)  # object radius as a fraction of the image side, the same range for every class

COLOURS = {"cyan": (70, 200, 235), "blue": (45, 75, 215), "orange": (245, 135, 30), "red": (215, 45, 35),
           "pink": (230, 90, 185), "yellow": (235, 210, 40), "brown": (120, 70, 35), "green": (45, 170, 65)}
_COLOUR_NAMES = {rgb: name for name, rgb in COLOURS.items()}


def _look(shape: str, colour: tuple[int, int, int], texture: str) -> ObjectClass:
    # index 0: an appearance is not a VOC class (ObjectClass is only the drawing recipe here)
    return ObjectClass(0, shape, colour, texture)


def _benchmark_looks() -> list[tuple[str, ObjectClass]]:
    """The context benchmark's distinct appearances, named after the classes that wear them."""
    looks: dict[tuple, list[str]] = {}
    for cls in CONTEXT_CLASSES:
        looks.setdefault((cls.shape, cls.colour, cls.texture), []).append(VOC_CLASSES[cls.index])
    return [("/".join(names), _look(*key)) for key, names in looks.items()]


def _look_name(shape: str, colour: tuple[int, int, int], texture: str) -> str:
    return f"{_COLOUR_NAMES[colour]} {shape} ({texture})"


def _demo_looks(taken: set) -> list[tuple[str, ObjectClass]]:
    """The quick demo set's appearances that the benchmark does not already have."""
    out = []
    for cls in OBJECT_CLASSES:
        key = (cls.shape, cls.colour, cls.texture)
        if key not in taken:
            out.append((_look_name(*key), _look(*key)))
            taken.add(key)
    return out


# Others of this world: each differs from a benchmark look in one cue only (texture, colour or shape), so the
# classifier has to read all three.
_OTHER_LOOKS = tuple((shape, COLOURS[colour], texture) for shape, colour, texture in (
    ("rectangle", "red", "vstripes"), ("ellipse", "orange", "checker"), ("ring", "blue", "spots"),
    ("capsule", "pink", "hstripes"), ("cross", "yellow", "spots"), ("rectangle", "green", "hstripes"),
    ("ellipse", "blue", "grain"), ("triangle", "orange", "grain"), ("triangle", "red", "checker"),
    ("hexagon", "pink", "grain"), ("star", "cyan", "vstripes"), ("ring", "orange", "speckle"),
))


def _all_looks() -> tuple[tuple[str, ObjectClass], ...]:
    looks = _benchmark_looks()
    taken = {(c.shape, c.colour, c.texture) for _, c in looks}
    looks += _demo_looks(taken)
    for key in _OTHER_LOOKS:
        if key in taken:
            raise AssertionError(f"appearance {key} is listed twice")
        taken.add(key)
        looks.append((_look_name(*key), _look(*key)))
    return tuple(looks)


APPEARANCES: tuple[tuple[str, ObjectClass], ...] = _all_looks()
CLASS_NAMES: tuple[str, ...] = tuple(name for name, _ in APPEARANCES)


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] float: a benchmark water or ground scene, or a demo-style muted one, with clutter."""
    kind = int(rng.integers(3))
    image = background(rng, size, size) if kind == 2 else scene_background(rng, size, size, water=kind == 0)
    clutter(rng, image, int(rng.integers(0, 4)))
    return image


def render_classification_image(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, int]:
    """One pretraining image: (uint8 ``[size, size, 3]``, appearance class index into :data:`APPEARANCES`)."""
    k = int(rng.integers(len(APPEARANCES)))
    look = APPEARANCES[k][1]
    image = _scene(rng, size)
    radius = rng.uniform(*RADIUS) * size
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size                        # mostly inside the frame
    mask = object_mask(rng, look, radius)
    unused = np.zeros((size, size), dtype=np.uint8)                       # paste writes a label; none is kept
    paste(image, unused, mask, varied_appearance(rng, look, mask.shape[0]), 1, cy, cx)
    image *= rng.uniform(0.85, 1.15)                                      # lighting and sensor noise, as the
    image += 4 * rng.standard_normal(image.shape, dtype=np.float32)       # benchmark's scenes
    return np.clip(image, 0, 255).astype(np.uint8), k


def make_classification_set(num: int, split: str = "train", seed: int = 0, size: int = 64,
                            progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` images of ``split`` (``"train"`` or ``"heldout"``): ``(images uint8 [num, 3, size, size],
    labels long [num])``. Image ``i`` depends only on ``(seed, split, i, size)``."""
    if split not in PRETRAIN_STREAMS:
        raise ValueError(f"split must be one of {sorted(PRETRAIN_STREAMS)}, got {split!r}")
    if num < 1 or size < 16:
        raise ValueError(f"need num >= 1 and size >= 16, got num={num}, size={size}")
    images = torch.empty(num, 3, size, size, dtype=torch.uint8)           # [N, 3, S, S]
    labels = torch.empty(num, dtype=torch.long)
    for i in tqdm(range(num), desc=f"pretraining set ({split})", unit="img", disable=not progress):
        image, k = render_classification_image(np.random.default_rng([seed, PRETRAIN_STREAMS[split], i]), size)
        images[i] = torch.from_numpy(image).permute(2, 0, 1)              # [S, S, 3] -> [3, S, S]
        labels[i] = k
    return images, labels


def describe(seed: int = 0, size: int = 64) -> dict:
    """What identifies the set (for the pretrained file's metadata): a changed value means a stale backbone."""
    return {"version": VERSION, "seed": seed, "size": size, "classes": list(CLASS_NAMES),
            "streams": dict(PRETRAIN_STREAMS), "radius": list(RADIUS)}

