"""Split lists: official line format, round trip, seeded disjoint splits, official lists by path, no writes into
the dataset folder, and the lists recorded in the run dir."""
from __future__ import annotations

import pytest

from cacnb.config import load_config
from cacnb.data import splits
from cacnb.data.errors import DatasetError
from cacnb.data.splits import make_splits, read_split, record_splits, split_lists, write_split


def _cfg(data_dir, **over):
    return load_config("synthetic", {"data.data_dir": str(data_dir), **{f"data.{k}": v for k, v in over.items()}})


def test_line_format_round_trip(tmp_path):
    pairs = splits.voc_pairs(["2007_000032", "2011_003271"])
    assert pairs[0] == ("/JPEGImages/2007_000032.jpg", "/SegmentationClassAug/2007_000032.png")
    path = write_split(tmp_path / "x" / "list.txt", pairs)
    assert path.read_text().splitlines()[0] == "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png"
    assert read_split(path) == pairs
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["list.txt"]   # no temporary files left


def test_cityscapes_pairs_and_other_line_forms(tmp_path):
    img = "/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    pair = splits.cityscapes_pair(img)
    assert pair == (img, "/gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png")
    assert splits.parse_line(img) == pair
    assert splits.parse_line("2007_000032") == splits.voc_pair("2007_000032")
    assert splits.parse_line("JPEGImages/a.jpg SegmentationClassAug/a.png") == splits.voc_pair("a")
    bad = tmp_path / "bad.txt"
    bad.write_text("/JPEGImages/a.jpg /SegmentationClassAug/a.png\none two three\n")
    with pytest.raises(DatasetError, match=r"bad.txt, line 2"):
        read_split(bad)


def test_read_split_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"missing\.txt.*\n.*data_README\.md"):
        read_split(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DatasetError, match="empty"):
        read_split(tmp_path / "empty.txt")


def test_make_splits_disjoint_seeded_and_complete():
    ids = [f"id{i:03d}" for i in range(50)]
    lab, unl = make_splits(ids, 12, seed=0)
    assert len(lab) == 12 and len(unl) == 38
    assert not set(lab) & set(unl) and set(lab) | set(unl) == set(ids)
    assert lab == sorted(lab, key=ids.index)                     # input order kept
    assert make_splits(ids, 12, seed=0) == (lab, unl)
    assert make_splits(ids, 12, seed=1)[0] != lab
    with pytest.raises(DatasetError, match="only 50 images"):
        make_splits(ids, 50, seed=0)
    with pytest.raises(DatasetError, match=">= 1"):
        make_splits(ids, 0, seed=0)


def test_make_splits_is_pinned():
    """The seeded draw must never change: a run's split (and so its result) is reproducible from its seed."""
    lab, _ = make_splits([f"id{i:03d}" for i in range(50)], 12, seed=0)
    assert lab == ["id001", "id002", "id003", "id004", "id011", "id018", "id020", "id023", "id024", "id026",
                   "id034", "id036"]


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_split_lists_seeded_in_memory(synthetic_data_dir):
    cfg = _cfg(synthetic_data_dir, n_labeled=5, split_seed=7)
    before = _snapshot(synthetic_data_dir)
    lists = split_lists(cfg.data)
    root = splits.dataset_root(cfg.data)
    lab, unl, val = lists
    assert len(lab) == 5 and len(unl) == 19 and len(val) == 6
    assert not set(lab) & set(unl) and not (set(lab) | set(unl)) & set(val)
    # the same lists as the files earlier versions wrote to cacnb_splits/seed7/ for this set
    assert [splits.pair_id(p) for p in lab] == ["synth_train_00003", "synth_train_00004", "synth_train_00014",
                                                "synth_train_00015", "synth_train_00018"]
    for pair in lab + val:
        image, label = splits.pair_paths(root, pair)
        assert image.is_file() and label.is_file()
    assert split_lists(cfg) == lists                                                    # deterministic
    assert "split_seed=7" in lists.sources["labeled"]
    other = split_lists(_cfg(synthetic_data_dir, n_labeled=5, split_seed=8).data)
    assert other.labeled != lab
    assert _snapshot(synthetic_data_dir) == before                    # nothing written into the dataset folder


def test_read_only_dataset_builds_and_the_run_dir_records_the_lists(synthetic_voc, tmp_path):
    import shutil
    import stat

    from cacnb.data import build_labeled_dataset, build_pair_dataset, build_val_dataset

    data_dir = tmp_path / "shared"
    shutil.copytree(synthetic_voc.parent.parent, data_dir)
    for p in [data_dir, *data_dir.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _snapshot(data_dir)
    try:
        cfg = _cfg(data_dir, n_labeled=5)
        lists = split_lists(cfg.data)
        assert len(build_labeled_dataset(cfg.data, lists=lists)) == 5
        assert len(build_pair_dataset(cfg.data)) == 19 and len(build_val_dataset(cfg.data)) == 6
        assert _snapshot(data_dir) == before          # read-only or not (root ignores the mode), nothing changed
        written = record_splits(lists, tmp_path / "run")
    finally:
        for p in [data_dir, *data_dir.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert {role: p.name for role, p in written.items()} == \
        {"labeled": "labeled.txt", "unlabeled": "unlabeled.txt", "val": "val.txt"}
    for role, pairs in lists.items():
        assert read_split(tmp_path / "run" / "splits" / f"{role}.txt") == pairs
    assert (tmp_path / "run" / "splits" / "labeled.txt").read_text().startswith(f"# {lists.sources['labeled']}\n")


def test_too_many_labeled_is_explained(synthetic_data_dir):
    with pytest.raises(DatasetError, match="n_labeled=24 but the training set has only 24"):
        split_lists(_cfg(synthetic_data_dir, n_labeled=24, split_seed=99).data).labeled   # on first use


def test_official_lists_are_taken_by_path(synthetic_data_dir, tmp_path):
    ids = [f"synth_train_{i:05d}" for i in range(24)]
    official = tmp_path / "voc_splits0"
    write_split(official / "3_train_supervised.txt", splits.voc_pairs(ids[:3]))
    write_split(official / "3_train_unsupervised.txt", splits.voc_pairs(ids[3:]))
    lists = split_lists(_cfg(synthetic_data_dir, n_labeled=3, split_dir=str(official)).data)
    assert lists.sources["labeled"] == str(official / "3_train_supervised.txt")
    assert lists.labeled == splits.voc_pairs(ids[:3]) and lists.unlabeled == splits.voc_pairs(ids[3:])
    assert len(lists.val) == 6                                      # val from the dataset when not given
    (official / "val.txt").write_text("/JPEGImages/synth_val_00000.jpg /SegmentationClassAug/synth_val_00000.png\n")
    lists = split_lists(_cfg(synthetic_data_dir, n_labeled=3, split_dir=str(official)).data)
    assert lists.sources["val"] == str(official / "val.txt") and len(lists.val) == 1
    other_size = split_lists(_cfg(synthetic_data_dir, n_labeled=1323, split_dir=str(official)).data)
    assert len(other_size.val) == 1                              # val alone needs no training list ...
    with pytest.raises(DatasetError, match=r"no 1323_train_supervised.txt.*n_labeled in \['3'\]"):
        other_size.labeled                                       # ... which fails, naming the sizes there are
    (official / "test.txt").write_text("/JPEGImages/synth_val_00001.jpg /SegmentationClassAug/synth_val_00001.png\n")
    lists = split_lists(_cfg(synthetic_data_dir, n_labeled=3, split_dir=str(official)).data)
    assert lists.eval_split("test") == (splits.voc_pairs(["synth_val_00001"]), str(official / "test.txt"))


def test_one_object_holds_every_list_and_computes_each_once(synthetic_data_dir, monkeypatch):
    lists = split_lists(_cfg(synthetic_data_dir, n_labeled=5).data)
    calls = []
    real = splits.train_pairs
    monkeypatch.setattr(splits, "train_pairs", lambda cfg: calls.append(1) or real(cfg))
    assert lists.labeled and lists.unlabeled and lists.sources["unlabeled"]
    assert len(calls) == 1                                       # drawn once, then kept
    assert lists.test is None and "test.txt is missing" in lists.test_problem     # the fixture has no test list
    with pytest.raises(DatasetError, match="no test split"):
        lists.eval_split("test")
    assert "test" not in lists.sources and list(lists) == [lists.labeled, lists.unlabeled, lists.val]


def test_dataset_root_forms_and_errors(synthetic_voc, tmp_path):
    assert splits.dataset_root(_cfg(synthetic_voc.parent.parent).data) == synthetic_voc
    assert splits.dataset_root(_cfg(synthetic_voc).data) == synthetic_voc              # VOC2012 itself
    with pytest.raises(DatasetError, match=r"does not exist.*cacnb\.data\.synthetic"):
        splits.dataset_root(_cfg(tmp_path / "nowhere").data)
    with pytest.raises(DatasetError, match="no JPEGImages"):
        splits.dataset_root(_cfg(tmp_path).data)
    city = load_config("cityscapes_r50_372", {"data.data_dir": str(tmp_path)})
    with pytest.raises(DatasetError, match="leftImg8bit, gtFine"):
        splits.dataset_root(city.data)


def test_cityscapes_lists_by_scanning(tmp_path):
    for subset, city, n in (("train", "aachen", 3), ("val", "lindau", 1)):
        (tmp_path / "leftImg8bit" / subset / city).mkdir(parents=True)
        (tmp_path / "gtFine" / subset / city).mkdir(parents=True)
        for k in range(n):
            (tmp_path / "leftImg8bit" / subset / city / f"{city}_{k:06d}_000019_leftImg8bit.png").touch()
    cfg = load_config("cityscapes_r50_372", {"data.data_dir": str(tmp_path), "data.n_labeled": 1,
                                             "data.datalist": None})  # a seeded split of what is on disk
    lab, unl, val = split_lists(cfg.data)
    assert len(lab) == 1 and len(unl) == 2 and len(val) == 1
    assert val[0][1] == "/gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
