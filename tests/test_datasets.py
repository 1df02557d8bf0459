"""VOC / synthetic / Cityscapes readers, the config builders, and bad input (also inside a DataLoader worker)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cacnb.config import DataConfig
from cacnb.data import (PairDataset, build_labeled_dataset, build_pair_dataset, build_val_dataset,
                        make_train_loader)
from cacnb.data.cityscapes import CityscapesFiles, label_id_to_train_id
from cacnb.data.errors import DatasetError
from cacnb.data.voc import LabeledDataset, SegFiles


def _cfg(data_dir, **kw):
    base = dict(dataset="synthetic", data_dir=str(data_dir), n_labeled=8, crop_size=64, base_size=80,
                num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def test_builders_on_synthetic_voc(synthetic_data_dir):
    cfg = _cfg(synthetic_data_dir)
    labeled, pairs, val = build_labeled_dataset(cfg), build_pair_dataset(cfg), build_val_dataset(cfg)
    assert len(labeled) == 8 and len(pairs) == 24 - 8 and len(val) == 6
    assert not set(labeled.files.pairs) & set(pairs.files.pairs)
    item = labeled[(0, 1)]
    assert item["image"].shape == (3, 64, 64) and item["label"].shape == (64, 64)
    assert item["label"].dtype == torch.long
    assert set(item["label"].unique().tolist()) <= set(range(21)) | {255}
    assert isinstance(pairs, PairDataset) and pairs[(0, 1)]["image"].shape == (2, 3, 64, 64)
    v = val[0]
    image_path, _ = val.files.paths(0)
    with Image.open(image_path) as im:
        assert v["image"].shape == (3, im.height, im.width)  # whole image at its own size
    assert v["label"].shape == (im.height, im.width) and v["id"] == image_path.stem
    batch = next(iter(make_train_loader(pairs, 2, seed=0, num_workers=0)))
    assert batch["image"].shape == (2, 2, 3, 64, 64) and batch["overlap"].shape == (2, 2, 4)


def _write_pair(root, name, size=(30, 40), label_mode="P"):
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    h, w = size
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    label = np.zeros((h, w), np.uint8)
    label[:, : w // 2] = 15
    label[0] = 255
    im = Image.fromarray(label, mode="L")
    if label_mode == "P":
        im = im.convert("P")
        im.putpalette([(i * 37) % 256 for i in range(768)])  # colours unrelated to the indices
    elif label_mode == "RGB":
        im = im.convert("RGB")
    im.save(root / "SegmentationClassAug" / f"{name}.png")
    return f"/JPEGImages/{name}.jpg", f"/SegmentationClassAug/{name}.png"


def test_palette_labels_are_read_as_indices(tmp_path):
    pair = _write_pair(tmp_path, "a")
    _, label = SegFiles(tmp_path, [pair]).read(0)
    assert label.shape == (30, 40)
    assert set(torch.unique(label).tolist()) == {0, 15, 255}


def test_colour_label_is_rejected(tmp_path):
    pair = _write_pair(tmp_path, "rgb", label_mode="RGB")
    with pytest.raises(DatasetError, match="rgb.png.*index PNGs"):
        SegFiles(tmp_path, [pair]).read(0)


def _save_16bit_label(path, label):
    Image.fromarray(label.astype(np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"  # what the test is about


def test_16bit_label_out_of_range_is_rejected_not_wrapped(tmp_path):
    pair = _write_pair(tmp_path, "wide")
    label = np.zeros((30, 40), np.uint16)
    label[5, 5] = 300                                     # would wrap to 44 as uint8
    _save_16bit_label(tmp_path / "SegmentationClassAug" / "wide.png", label)
    with pytest.raises(DatasetError, match=r"wide\.png.*0\.\.300.*8-bit"):
        SegFiles(tmp_path, [pair]).read(0)


def test_16bit_label_in_range_is_read(tmp_path):
    pair = _write_pair(tmp_path, "narrow")
    label = np.zeros((30, 40), np.uint16)
    label[:, :3] = 255
    _save_16bit_label(tmp_path / "SegmentationClassAug" / "narrow.png", label)
    _, mask = SegFiles(tmp_path, [pair]).read(0)
    assert set(torch.unique(mask).tolist()) == {0, 255}


def test_decompression_bomb_label_names_the_file(tmp_path, monkeypatch):
    pair = _write_pair(tmp_path, "bomb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 30x40 is over twice this: PIL raises, not warns
    with pytest.raises(DatasetError, match=r"bomb\.png"):
        SegFiles(tmp_path, [pair]).read_label(tmp_path / "SegmentationClassAug" / "bomb.png")


def test_mismatched_sizes_are_reported(tmp_path):
    pair = _write_pair(tmp_path, "a")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "SegmentationClassAug" / "a.png")
    with pytest.raises(DatasetError, match="a.png.*does not belong"):
        SegFiles(tmp_path, [pair]).read(0)


@pytest.fixture
def broken_dataset(tmp_path):
    good = _write_pair(tmp_path, "good")
    corrupt = _write_pair(tmp_path, "corrupt")
    (tmp_path / "JPEGImages" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    missing = _write_pair(tmp_path, "nolabel")
    (tmp_path / "SegmentationClassAug" / "nolabel.png").unlink()
    return tmp_path, good, corrupt, missing


@pytest.mark.parametrize("kind", ["labeled", "pairs"])
def test_bad_files_raise_naming_the_file(broken_dataset, kind):
    root, good, corrupt, missing = broken_dataset

    def make(pair):
        files = SegFiles(root, [pair])
        if kind == "labeled":
            return LabeledDataset(files, crop_size=32, base_size=40)
        return PairDataset(files, crop_size=32, base_size=40)

    make(good)[0]
    with pytest.raises(DatasetError, match=r"corrupt\.jpg.*corrupt"):
        make(corrupt)[0]
    with pytest.raises(DatasetError, match=r"nolabel\.png is missing"):
        make(missing)[0]


def test_bad_file_error_crosses_the_worker_boundary(broken_dataset):
    root, good, corrupt, _ = broken_dataset
    ds = PairDataset(SegFiles(root, [good, corrupt]), crop_size=32, base_size=40)
    loader = make_train_loader(ds, 2, seed=0, num_workers=1)
    with pytest.raises(DatasetError, match=r"corrupt\.jpg"):
        next(iter(loader))


# ---------------------------------------------------------------------------------------------------------------
# Cityscapes


def _fake_cityscapes(root, raw_ids=False):
    rng = np.random.default_rng(0)
    for subset, cities in (("train", ("aachen", "bonn")), ("val", ("lindau",))):
        for city in cities:
            for k in range(2):
                stem = f"{city}_{k:06d}_000019"
                img_dir, gt_dir = root / "leftImg8bit" / subset / city, root / "gtFine" / subset / city
                img_dir.mkdir(parents=True, exist_ok=True)
                gt_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (24, 48, 3), dtype=np.uint8)).save(
                    img_dir / f"{stem}_leftImg8bit.png")
                train_ids = rng.integers(0, 19, (24, 48)).astype(np.uint8)
                train_ids[:2] = 255
                Image.fromarray(train_ids).save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
                Image.fromarray(np.full((24, 48), 26, np.uint8)).save(gt_dir / f"{stem}_gtFine_labelIds.png")
    return root


def test_cityscapes_reader_and_builders(tmp_path):
    root = _fake_cityscapes(tmp_path / "cityscapes")
    cfg = _cfg(root, dataset="cityscapes", n_labeled=2, num_classes=19, crop_size=32, base_size=48,
               color_jitter=True)
    labeled, pairs, val = build_labeled_dataset(cfg), build_pair_dataset(cfg), build_val_dataset(cfg)
    assert isinstance(labeled.files, CityscapesFiles)
    assert len(labeled) == 2 and len(pairs) == 2 and len(val) == 2
    v = val[0]
    assert v["id"].startswith("lindau_") and v["image"].shape == (3, 24, 48)
    assert set(v["label"].unique().tolist()) <= set(range(19)) | {255}
    assert (v["label"][:2] == 255).all()
    item = labeled[(0, 3)]
    assert item["image"].shape == (3, 32, 32) and item["label"].max() <= 255
    assert pairs[(1, 3)]["overlap"].shape == (2, 4)


def test_cityscapes_raw_label_ids(tmp_path):
    root = _fake_cityscapes(tmp_path)
    img = "/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    raw = "/gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    # with the labelTrainIds sibling present, it is used
    _, from_sibling = CityscapesFiles(root, [(img, raw)]).read(0)
    assert (from_sibling[:2] == 255).all()
    (root / raw.lstrip("/")).with_name("aachen_000000_000019_gtFine_labelTrainIds.png").unlink()
    _, converted = CityscapesFiles(root, [(img, raw)]).read(0)
    assert (converted == 13).all()  # raw id 26 (car) is train id 13
    assert label_id_to_train_id(np.array([0, 7, 33, 34], np.uint8)).tolist() == [255, 0, 18, 255]
