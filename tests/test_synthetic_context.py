"""The context benchmark: look-alike classes that only context separates, three disjoint splits."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from cacnb.config import SYNTHETIC_STYLES, load_config
from cacnb.data import synthetic
from cacnb.data.synthetic import context, writer
from cacnb.data.synthetic import CONTEXT_CLASSES, STYLES, make_synthetic_for, make_synthetic_voc

SMALL = (48, 72)


def _ids(voc, name):
    return (voc / "ImageSets" / "Segmentation" / name).read_text().split()


def _by_index():
    return {c.index: c for c in CONTEXT_CLASSES}


def test_config_styles_are_the_generators_styles():
    assert tuple(sorted(STYLES)) == SYNTHETIC_STYLES


def test_look_alike_pairs_differ_only_in_context_or_size():
    cls = _by_index()
    look = ("shape", "colour", "texture")
    boat, car, bird, bus = cls[4], cls[7], cls[3], cls[6]
    assert all(getattr(boat, k) == getattr(car, k) for k in look + ("radius",))
    assert (boat.region, car.region) == ("water", "ground")
    assert all(getattr(bird, k) == getattr(bus, k) for k in look + ("region",))
    assert bird.radius[1] < bus.radius[0]                      # sizes never overlap
    others = [c for c in CONTEXT_CLASSES if c.index not in (3, 4, 6, 7)]
    looks = {tuple(getattr(c, k) for k in look) for c in others} | {tuple(getattr(boat, k) for k in look),
                                                                   tuple(getattr(bird, k) for k in look)}
    assert len(looks) == len(others) + 2                       # every other class has a look of its own


def test_classes_with_looks_of_their_own_are_textured_and_large():
    """Version 3: grayscale (in the paper's augmentation) turns a flat-coloured object into something like the
    flat clutter on the background, and a part one stride-8 feature cell wide is all boundary."""
    others = [c for c in CONTEXT_CLASSES if c.index in (1, 2, 5)]
    assert {c.texture for c in CONTEXT_CLASSES}.isdisjoint({"smooth"})
    assert all(c.radius[0] >= 0.15 for c in others)


def test_region_classes_occur_only_in_their_kind_of_scene():
    rng = np.random.default_rng(3)
    for water in (True, False):
        drawn = {context.scene_class(rng, water).index for _ in range(400)}
        assert (4 in drawn, 7 in drawn) == (water, not water)      # boat only in water, car only on ground
        assert {3, 6} <= drawn                                      # the size pair occurs in both kinds


def test_boats_are_in_water_scenes_and_cars_in_ground_scenes_in_rendered_images():
    """Measured on the background pixels of each image: an image holding a boat has a blue (water) background,
    one holding a car a brown (ground) one, and no image holds both."""
    blue_boat, blue_car = [], []
    for i in range(40):
        image, label = synthetic.render_context_scene(np.random.default_rng([0, 9, i]))
        present = set(np.unique(label))
        assert not {4, 7} <= present
        background = image.astype(np.float32)[label == 0]                  # [n, 3]
        blueness = float((background[:, 2] - background[:, 0]).mean())      # blue minus red of the scene
        if 4 in present:
            blue_boat.append(blueness)
        if 7 in present:
            blue_car.append(blueness)
    assert len(blue_boat) > 5 and len(blue_car) > 5
    assert min(blue_boat) > 0 > max(blue_car)


def _saturation(pixels: np.ndarray) -> np.ndarray:
    """HSV saturation of [n, 3] RGB pixels."""
    top = pixels.max(axis=1)
    return (top - pixels.min(axis=1)) / np.maximum(top, 1.0)


def test_scenes_are_near_grey_and_objects_saturated():
    """Version 3: the scene's kind is in its texture, not its colour, so that the paper's hue and saturation
    jitter cannot turn an object's colour into its scene's."""
    scene, objects = [], []
    for i in range(30):
        image, label = synthetic.render_context_scene(np.random.default_rng([0, 11, i]))
        pixels = image.reshape(-1, 3).astype(np.float32)                    # [h*w, 3]
        scene.append(float(np.median(_saturation(pixels[label.reshape(-1) == 0]))))
        objects.append(float(np.median(_saturation(pixels[~np.isin(label.reshape(-1), (0, 255))]))))
    assert max(scene) < 0.25
    assert np.median(objects) > 0.45 and min(objects) > max(scene)


def test_the_context_style_carries_its_own_format_version(tmp_path):
    voc = make_synthetic_voc(tmp_path, 2, 1, style="context", size_range=SMALL, progress=False)
    meta = json.loads((voc / synthetic.META_NAME).read_text())
    assert meta["format_version"] == STYLES["context"].version == 3
    with pytest.warns(UserWarning, match="format_version=3 \\(requested 1\\)"):
        meta["format_version"] = 1
        writer._warn_if_settings_differ(voc, meta)


def test_three_disjoint_splits_of_the_requested_sizes(tmp_path):
    voc = make_synthetic_voc(tmp_path, 12, 5, num_test=4, style="context", size_range=SMALL, progress=False)
    train, val, test = (_ids(voc, n) for n in ("train_aug.txt", "val.txt", "test.txt"))
    assert (len(train), len(val), len(test)) == (12, 5, 4)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    for sample_id in train + val + test:
        assert (voc / "JPEGImages" / f"{sample_id}.jpg").is_file()
        values = set(np.unique(np.asarray(Image.open(voc / "SegmentationClassAug" / f"{sample_id}.png"))))
        assert values <= {0, 255} | set(synthetic.synthetic_class_indices("context"))
    # the same image index in two splits is a different image (own seed stream per split)
    first = [np.asarray(Image.open(voc / "JPEGImages" / f"{s[0]}.jpg")) for s in (train, val, test)]
    assert all(first[0].shape != f.shape or not np.array_equal(first[0], f) for f in first[1:])


def test_context_set_is_deterministic(tmp_path):
    a = make_synthetic_voc(tmp_path / "a", 3, 2, num_test=2, style="context", size_range=SMALL, progress=False)
    b = make_synthetic_voc(tmp_path / "b", 3, 2, num_test=2, style="context", size_range=SMALL, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_preset_describes_a_label_scarce_three_split_benchmark(tmp_path):
    cfg = load_config("synthetic_context")
    d = cfg.data
    assert d.synthetic_style == "context" and d.synthetic_test > 0
    assert d.n_labeled * 8 <= d.synthetic_train                         # labeled <= 1/8 of the training set
    assert d.synthetic_train - d.n_labeled >= 8 * d.n_labeled           # unlabeled pool >= 8x labeled
    assert d.num_classes == max(synthetic.synthetic_class_indices("context")) + 1
    small = dataclasses.replace(d, synthetic_train=4, synthetic_val=2, synthetic_test=2)
    voc = make_synthetic_for(small, root=tmp_path, progress=False)
    assert len(_ids(voc, "test.txt")) == 2


def test_unknown_style_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic style 'nope'"):
        make_synthetic_voc(tmp_path, 2, 1, style="nope", progress=False)
    with pytest.raises(Exception, match="data.synthetic_style"):
        load_config("synthetic", {"data.synthetic_style": "nope"})


def test_make_command_writes_the_configs_set(tmp_path):
    d = dataclasses.replace(load_config("synthetic_context").data, synthetic_train=3, synthetic_val=2,
                            synthetic_test=2)
    argv = synthetic.make_command(d, tmp_path / "x").split()[3:]       # drop "python -m cacnb.data.synthetic"
    assert synthetic.main(argv + ["--min-size", "48", "--max-size", "64"]) == 0
    voc = tmp_path / "x" / "VOCdevkit" / "VOC2012"
    assert [len(_ids(voc, n)) for n in ("train_aug.txt", "val.txt", "test.txt")] == [3, 2, 2]
    assert '"style": "context"' in (voc / synthetic.META_NAME).read_text()
