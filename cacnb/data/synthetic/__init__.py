"""Synthetic data in the exact PASCAL VOC 2012 layout (the embedded default of cacnb), and the pretraining set.

* :mod:`.drawing`: the primitives every style shares (outlines, textures, masks, pasting, the 255 border band);
* :mod:`.objects`: the quick demo style (every class has its own look);
* :mod:`.context`: the context benchmark's style (look-alike classes that only context separates);
* :mod:`.writer`: :func:`make_synthetic_voc`, the style table and the on-disk layout;
* :mod:`.classification`: the pretraining set of :mod:`cacnb.pretrain` (one object appearance per image, no
  segmentation labels, its own seed stream);
* :mod:`.cli`: ``python -m cacnb.data.synthetic``.
"""
from .cli import main
from .context import CONTEXT_CLASSES, render_context_scene
from .drawing import ObjectClass, border_band
from .objects import DEFAULT_SIZE_RANGE, OBJECT_CLASSES, render_scene
from .writer import (FORMAT_VERSION, META_NAME, SPLIT_STREAMS, STYLES, SceneStyle, is_complete, make_command,
                     make_synthetic_for, make_synthetic_voc, sample_ids, scene_style, synthetic_class_indices)

__all__ = ["CONTEXT_CLASSES", "DEFAULT_SIZE_RANGE", "FORMAT_VERSION", "META_NAME", "OBJECT_CLASSES", "SPLIT_STREAMS",
           "STYLES", "ObjectClass", "SceneStyle", "border_band", "is_complete", "main", "make_command",
           "make_synthetic_for", "make_synthetic_voc", "render_context_scene", "render_scene", "sample_ids",
           "scene_style", "synthetic_class_indices"]
