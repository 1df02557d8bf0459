"""The preflight check reports every kind of broken dataset, naming the offending file."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from cacnb.config import load_config
from cacnb.data.errors import DatasetError
from cacnb.data.preflight import check_dataset
from cacnb.data.synthetic import make_synthetic_voc


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny synthetic set (small images) that broken copies are made from."""
    root = tmp_path_factory.mktemp("pristine")
    make_synthetic_voc(root, 4, 2, seed=0, size_range=(40, 64), progress=False)
    return root


@pytest.fixture
def copy(pristine, tmp_path):
    """A fresh copy of the pristine set: (data_dir, VOC2012 folder)."""
    data_dir = tmp_path / "data"
    shutil.copytree(pristine, data_dir)
    return data_dir, data_dir / "VOCdevkit" / "VOC2012"


def _kinds(report):
    return {p.kind for p in report.problems}


def test_clean_dataset_passes(copy, synthetic_data_dir):
    data_dir, voc = copy
    report = check_dataset(data_dir, "synthetic", progress=False)
    assert report.ok and report.checked == report.listed == 6, str(report)
    report.raise_if_failed()
    assert "OK" in str(report)
    cfg = load_config("synthetic", {"data.data_dir": str(synthetic_data_dir)})
    assert check_dataset(cfg, progress=False).ok                 # a Config works too
    assert check_dataset(voc, progress=False).ok                 # and the VOC2012 folder itself


def test_missing_data_dir(tmp_path):
    report = check_dataset(tmp_path / "nowhere", "synthetic", progress=False)
    assert _kinds(report) == {"missing_dir"}
    with pytest.raises(DatasetError, match=r"(?s)nowhere.*does not exist.*data_README\.md"):
        report.raise_if_failed()


def test_missing_folder_and_list(copy):
    data_dir, voc = copy
    shutil.rmtree(voc / "SegmentationClassAug")
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    report = check_dataset(data_dir, progress=False)
    assert {"missing_folder", "missing_list", "missing_label"} <= _kinds(report)
    text = str(report)
    assert "SegmentationClassAug" in text and "val.txt" in text


def test_every_broken_file_reported_at_once(copy):
    data_dir, voc = copy
    train = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    no_label, bad_value, mismatch, corrupt = train[:4]
    (voc / "SegmentationClassAug" / f"{no_label}.png").unlink()
    # a label holding class 42 (VOC has 0..20 and 255)
    png = voc / "SegmentationClassAug" / f"{bad_value}.png"
    with Image.open(png) as lb:
        arr = np.asarray(lb).copy()
        pal = lb.getpalette()
    arr[0, 0] = 42
    out = Image.fromarray(arr).convert("P")
    out.putpalette(pal)
    out.save(png)
    # a label whose size differs from its image
    png = voc / "SegmentationClassAug" / f"{mismatch}.png"
    with Image.open(png) as lb:
        lb.resize((lb.width + 3, lb.height), Image.NEAREST).save(png)
    # a truncated JPEG
    jpg = voc / "JPEGImages" / f"{corrupt}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    # an RGB (colour) label, and garbage instead of a PNG
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    with Image.open(voc / "SegmentationClassAug" / f"{val[0]}.png") as lb:
        lb.convert("RGB").save(voc / "SegmentationClassAug" / f"{val[0]}.png")
    (voc / "SegmentationClassAug" / f"{val[1]}.png").write_bytes(b"not a png")

    report = check_dataset(data_dir, progress=False)
    found = {(p.kind, p.path.rsplit("/", 1)[-1]) for p in report.problems}
    assert found == {("missing_label", f"{no_label}.png"), ("bad_values", f"{bad_value}.png"),
                     ("size_mismatch", f"{mismatch}.png"), ("unreadable", f"{corrupt}.jpg"),
                     ("bad_mode", f"{val[0]}.png"), ("unreadable", f"{val[1]}.png")}
    assert "42" in next(p.detail for p in report.problems if p.kind == "bad_values")
    with pytest.raises(DatasetError) as info:
        report.raise_if_failed()
    message = str(info.value)
    for name in (no_label, bad_value, mismatch, corrupt, val[0], val[1]):
        assert name in message
    assert "data_README.md" in message and "Traceback" not in message


def test_max_files_limits_the_opened_files(copy):
    data_dir, voc = copy
    train = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    (voc / "JPEGImages" / f"{train[-1]}.jpg").write_bytes(b"garbage")
    report = check_dataset(data_dir, max_files=2, progress=False)
    assert report.ok and report.checked == 2 and report.listed == 6
    assert not check_dataset(data_dir, progress=False).ok


def test_split_dir_lists_are_checked(copy, tmp_path):
    data_dir, _ = copy
    cfg = load_config("synthetic", {"data.data_dir": str(data_dir), "data.n_labeled": 2,
                                    "data.split_dir": str(tmp_path / "lists")})
    assert "data.split_dir does not exist" in str(check_dataset(cfg, progress=False))
    (tmp_path / "lists").mkdir()
    report = check_dataset(cfg, progress=False)
    assert "2_train_supervised.txt" in str(report) and "2_train_unsupervised.txt" in str(report)


def test_cityscapes_layout(tmp_path):
    img_dir = tmp_path / "leftImg8bit" / "train" / "aachen"
    lbl_dir = tmp_path / "gtFine" / "train" / "aachen"
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    Image.new("RGB", (32, 16)).save(img_dir / "aachen_000000_000019_leftImg8bit.png")
    Image.fromarray(np.full((16, 32), 19, np.uint8)).save(lbl_dir / "aachen_000000_000019_gtFine_labelTrainIds.png")
    Image.new("RGB", (32, 16)).save(img_dir / "aachen_000001_000019_leftImg8bit.png")
    report = check_dataset(tmp_path, "cityscapes", progress=False)
    found = {(p.kind, p.path.rsplit("/", 1)[-1]) for p in report.problems}
    assert ("bad_values", "aachen_000000_000019_gtFine_labelTrainIds.png") in found      # 19 is not a trainId
    assert ("missing_label", "aachen_000001_000019_gtFine_labelTrainIds.png") in found
    assert ("missing_folder", "val") in found
