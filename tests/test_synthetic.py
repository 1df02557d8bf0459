"""The synthetic dataset: VOC layout, palette PNGs, label values, determinism, atomic writing."""
from __future__ import annotations

import hashlib
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cacnb.data import synthetic
from cacnb.data.synthetic import writer
from cacnb.data.errors import DatasetError
from cacnb.data.palette import VOC_CLASSES, voc_palette
from cacnb.data.synthetic import DEFAULT_SIZE_RANGE, make_synthetic_voc

SMALL = (48, 80)


def _digest(voc: Path) -> dict[str, str]:
    return {p.relative_to(voc).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(voc.rglob("*")) if p.is_file()}


def _ids(voc: Path, name: str) -> list[str]:
    return (voc / "ImageSets" / "Segmentation" / name).read_text().split()


def test_voc_layout_and_lists(synthetic_voc):
    voc = synthetic_voc
    assert voc.name == "VOC2012" and voc.parent.name == "VOCdevkit"
    train, val = _ids(voc, "train_aug.txt"), _ids(voc, "val.txt")
    assert len(train) == 24 and len(val) == 6 and not set(train) & set(val)
    for i in train + val:
        assert (voc / "JPEGImages" / f"{i}.jpg").is_file()
        assert (voc / "SegmentationClassAug" / f"{i}.png").is_file()
    assert len(list((voc / "JPEGImages").iterdir())) == 30


def test_labels_are_voc_palette_pngs_with_expected_values(synthetic_voc):
    allowed = {0, 255, *synthetic.synthetic_class_indices()}
    assert allowed <= set(range(len(VOC_CLASSES))) | {255}
    seen, shapes = set(), set()
    for png in sorted((synthetic_voc / "SegmentationClassAug").glob("*.png")):
        with Image.open(png) as lb, Image.open(synthetic_voc / "JPEGImages" / f"{png.stem}.jpg") as im:
            assert lb.format == "PNG" and lb.mode == "P"
            assert lb.getpalette()[:768] == voc_palette()
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == lb.size
            values = set(np.unique(np.asarray(lb)).tolist())
        assert values <= allowed, (png, values - allowed)
        assert 0 in values and 255 in values                     # background and the border band
        seen |= values
        shapes.add("landscape" if lb.width > lb.height else "portrait" if lb.width < lb.height else "square")
        assert DEFAULT_SIZE_RANGE[0] <= min(lb.size) and max(lb.size) <= DEFAULT_SIZE_RANGE[1]
    assert len(seen - {0, 255}) >= 5                            # several classes appear
    assert {"landscape", "portrait"} <= shapes


def test_border_band_is_thin_and_follows_class_changes():
    label = np.zeros((20, 20), dtype=np.uint8)
    label[5:15, 5:15] = 3
    band = synthetic.border_band(label, 2)
    assert band[4, 10] and band[5, 10] and not band[3, 10] and not band[6, 10]   # 2 px across the edge
    assert not band[10, 10] and not band[0, 0]
    assert synthetic.border_band(label, 4)[3, 10] and not synthetic.border_band(label, 4)[2, 10]


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = make_synthetic_voc(tmp_path / "a", 5, 2, seed=3, size_range=SMALL, progress=False)
    b = make_synthetic_voc(tmp_path / "b", 5, 2, seed=3, size_range=SMALL, progress=False)
    c = make_synthetic_voc(tmp_path / "c", 5, 2, seed=4, size_range=SMALL, progress=False)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    assert da.keys() == dc.keys()
    assert all(da[k] != dc[k] for k in da if k.endswith((".jpg", ".png")))
    # image i does not depend on how many images are made
    d = make_synthetic_voc(tmp_path / "d", 3, 1, seed=3, size_range=SMALL, progress=False)
    assert _digest(d)["JPEGImages/synth_train_00002.jpg"] == da["JPEGImages/synth_train_00002.jpg"]
    for name in ("JPEGImages/synth_train_00000.jpg", "SegmentationClassAug/synth_val_00000.png"):
        size = Image.open(a / name).size
        assert SMALL[0] <= min(size) and max(size) <= SMALL[1]


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interrupt")
        return real_save(*args, **kwargs)

    real_save = writer._save_sample
    monkeypatch.setattr(writer, "_save_sample", failing_save)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_voc(tmp_path, 4, 2, size_range=SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []                        # no VOCdevkit, no temporary folder


def test_existing_dataset_is_kept_unless_overwritten(tmp_path, capsys):
    voc = make_synthetic_voc(tmp_path, 2, 1, seed=0, size_range=SMALL, progress=False)
    before = _digest(voc)
    with pytest.warns(UserWarning, match=r"seed=0 \(requested 1\).*overwrite=True.*--force"):
        assert make_synthetic_voc(tmp_path, 2, 1, seed=1, size_range=SMALL) == voc
    assert "already exists" in capsys.readouterr().out
    with pytest.warns(UserWarning, match=r"num_train=2 \(requested 3\)"):     # also when not printing
        make_synthetic_voc(tmp_path, 3, 1, seed=0, size_range=SMALL, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                          # same settings: silent
        make_synthetic_voc(tmp_path, 2, 1, seed=0, size_range=SMALL, progress=False)
    assert _digest(voc) == before
    make_synthetic_voc(tmp_path, 2, 1, seed=1, size_range=SMALL, overwrite=True, progress=False)
    assert _digest(voc) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOCdevkit"]


def test_incomplete_existing_folder_is_an_error(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    with pytest.raises(DatasetError, match="complete synthetic dataset"):
        make_synthetic_voc(tmp_path, 2, 1, size_range=SMALL, progress=False)


def test_cli_writes_then_skips(tmp_path, capsys, monkeypatch):
    args = ["--root", str(tmp_path / "syn"), "--num-train", "2", "--num-val", "1", "--min-size", "40",
            "--max-size", "64"]
    # what `python -m cacnb.data.synthetic ...` runs, in-process (a subprocess would re-import torch)
    monkeypatch.setattr(sys, "argv", ["synthetic", *args])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # runpy: module already imported
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("cacnb.data.synthetic", run_name="__main__")
    assert exit_info.value.code == 0
    assert (tmp_path / "syn" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").is_file()
    assert synthetic.main(args) == 0 and "skipping" in capsys.readouterr().out
    assert synthetic.main([*args, "--num-train", "0"]) == 2 and "num_train" in capsys.readouterr().err
