"""Writing a synthetic set in the exact PASCAL VOC 2012 layout: :func:`make_synthetic_voc` and the style table.

``make_synthetic_voc(root, num_train, num_val, seed)`` writes::

    root/VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg                   RGB, fixed JPEG quality
        SegmentationClassAug/<id>.png         8-bit palette PNG with the VOC colour map; 0 = background,
                                              class indices for objects, 255 on a thin band along borders
        ImageSets/Segmentation/train_aug.txt  one id per line
        ImageSets/Segmentation/val.txt        (and test.txt when a test split is asked for)
        cacnb_synthetic.json                  the generator's parameters

so the VOC reader loads it exactly as it loads the real dataset.

Each image comes from its own ``numpy`` Generator seeded by ``(seed, split, index)`` (:data:`SPLIT_STREAMS`), so a
seed gives byte-identical files on every run, and image ``i`` does not depend on how many others are made.
Everything is written into a temporary folder inside ``root`` and renamed into place at the end: an interrupted
run leaves no half dataset.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import DatasetError, with_readme
from ..palette import VOC_CLASSES, voc_palette
from .context import CONTEXT_CLASSES, render_context_scene
from .drawing import ObjectClass
from .objects import DEFAULT_SIZE_RANGE, OBJECT_CLASSES, render_scene

FORMAT_VERSION = 1
JPEG_QUALITY = 90
META_NAME = "cacnb_synthetic.json"
_TMP_PREFIX = ".cacnb-synthetic-partial-"
# the second seed of every image's Generator, per split: (seed, stream, index). The pretraining set
# (:mod:`.classification`) draws from a stream of its own, so no image is shared with these.
SPLIT_STREAMS = {"train_aug.txt": 0, "val.txt": 1, "test.txt": 2}


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
    # scene-wide; version 3 makes the scenes near-grey (see scene_background), the aeroplane spotted, and the
    # aeroplane, bicycle and bottle larger (see CONTEXT_CLASSES)
    "context": SceneStyle(render_context_scene, CONTEXT_CLASSES, (96, 144), 5, version=3),
}


def scene_style(name: str) -> SceneStyle:
    if name not in STYLES:
        raise ValueError(f"unknown synthetic style {name!r}; choose one of {sorted(STYLES)}")
    return STYLES[name]


def synthetic_class_indices(style: str = "objects") -> list[int]:
    """The VOC indices that occur in the synthetic set (besides 0 = background and 255 = border)."""
    return sorted(c.index for c in scene_style(style).classes)


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
    meta = {"generator": "cacnb.data.synthetic", "format_version": scene_style(style).version, "seed": seed,
            "num_train": num_train, "num_val": num_val, "size_range": list(size_range),
            "max_objects": max_objects, "border": border, "jpeg_quality": JPEG_QUALITY,
            "classes": {str(c.index): VOC_CLASSES[c.index] for c in scene_style(style).classes}}
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
    scene = scene_style(style)
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
        splits = [(name, SPLIT_STREAMS[name], ids) for name, ids in
                  (("train_aug.txt", train_ids), ("val.txt", val_ids), ("test.txt", test_ids)) if ids]
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


