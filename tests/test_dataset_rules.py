"""Reliability (issue 14), in process: one set of dataset rules for preflight and training, failing fast on a
broken first sample, and a broken file met mid-run (last.pt first, then exit 2). The rest of issue 14 is in
test_reliability.py and test_faults.py."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cacnb.config import load_config, save_config
from cacnb.data.errors import DatasetError
from cacnb.runlog import read_metrics, split_kinds

from test_train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


# -- items 7 and 12: one set of dataset rules for preflight and training ---------------------------------------

def _voc_copy(synthetic_voc, tmp_path) -> Path:
    """A private copy of the synthetic VOC tree (returns the folder holding VOCdevkit)."""
    data_dir = tmp_path / "data"
    shutil.copytree(synthetic_voc.parent.parent, data_dir)
    return data_dir


def _first_val_id(voc: Path) -> str:
    return (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]


def test_label_ids_above_num_classes_are_refused_by_training_validation_and_preflight(tmp_path, synthetic_voc):
    from cacnb.data import build_labeled_dataset, build_val_dataset
    from cacnb.data.preflight import check_dataset

    data_dir = _voc_copy(synthetic_voc, tmp_path)
    voc = data_dir / "VOCdevkit" / "VOC2012"
    cfg = load_config("synthetic", {"data.data_dir": str(data_dir), "data.n_labeled": 8})
    val_id = _first_val_id(voc)
    label_path = voc / "SegmentationClassAug" / f"{val_id}.png"
    label = np.array(Image.open(label_path))
    label[0, :3] = [30, 40, 254]
    Image.fromarray(label).save(label_path)
    with pytest.raises(DatasetError) as err:
        build_val_dataset(cfg)[0]
    message = str(err.value)
    assert f"{val_id}.png" in message and "class ids 30, 40, 254 outside 0..20" in message
    with pytest.raises(DatasetError, match="class ids 30, 40, 254 outside 0..20"):
        train_set = build_labeled_dataset(load_config(cfg, {"data.split_dir": None}))
        train_set.files.pairs = [p for p in train_set.files.pairs] + [(f"/JPEGImages/{val_id}.jpg",
                                                                       f"/SegmentationClassAug/{val_id}.png")]
        train_set[len(train_set) - 1]
    report = check_dataset(cfg, progress=False)
    found = [p for p in report.problems if p.kind == "bad_values"]
    assert len(found) == 1 and "class ids 30, 40, 254 outside 0..20" in found[0].detail


def test_preflight_and_training_agree_on_split_lists(tmp_path, synthetic_voc, synthetic_data_dir):
    from cacnb.data.preflight import check_dataset
    from cacnb.data.splits import split_lists, write_split
    from cacnb.data.validate import check_split_lists, run_split_lists

    labeled, unlabeled, _ = split_lists(load_config("synthetic", {"data.data_dir": str(synthetic_data_dir),
                                                                  "data.n_labeled": 8}).data)
    split_dir = tmp_path / "splits"
    write_split(split_dir / "8_train_supervised.txt", labeled + labeled[:1])          # a duplicate
    write_split(split_dir / "8_train_unsupervised.txt", unlabeled + labeled[1:2])     # labeled and unlabeled
    cfg = load_config("synthetic", {"data.data_dir": str(synthetic_data_dir), "data.n_labeled": 8,
                                    "data.split_dir": str(split_dir)})
    report = check_dataset(cfg, max_files=0, progress=False)
    kinds = {p.kind: p.detail for p in report.problems}
    assert set(kinds) == {"duplicate_id", "labeled_and_unlabeled"}
    with pytest.raises(DatasetError) as err:
        check_split_lists(run_split_lists(split_lists(cfg.data)))
    for detail in kinds.values():
        assert detail in str(err.value)


def test_preflight_and_training_agree_on_symlink_loops_and_16bit_labels(tmp_path, synthetic_voc):
    from cacnb.data import build_val_dataset
    from cacnb.data.preflight import check_dataset
    from cacnb.data.validate import SampleError

    data_dir = _voc_copy(synthetic_voc, tmp_path)
    voc = data_dir / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[:2]) + "\n")
    loop = voc / "SegmentationClassAug" / f"{ids[0]}.png"
    loop.unlink()
    loop.symlink_to(loop)
    wide = voc / "SegmentationClassAug" / f"{ids[1]}.png"
    Image.fromarray(np.array(Image.open(wide)).astype(np.uint16)).save(wide)  # 16-bit, ids in range
    cfg = load_config("synthetic", {"data.data_dir": str(data_dir), "data.n_labeled": 8})
    val = build_val_dataset(cfg)
    with pytest.raises(SampleError, match="is a symlink loop") as err:
        val[0]
    assert err.value.kind == "symlink_loop"
    assert val[1]["label"].shape[-2:] == val[1]["image"].shape[-2:]   # 16-bit in-range labels are read
    report = check_dataset(cfg, progress=False)
    assert [(p.kind, Path(p.path).name) for p in report.problems] == [("symlink_loop", loop.name)]


# -- item 8: fail fast ------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_a_broken_first_val_image_fails_before_the_first_step(tmp_path, synthetic_voc, monkeypatch):
    import cacnb.train as train_mod
    import cacnb.train.loop as loop

    data_dir = _voc_copy(synthetic_voc, tmp_path)
    voc = data_dir / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages" / f"{_first_val_id(voc)}.jpg").write_bytes(b"not a jpeg")
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: pytest.fail("a step ran"))
    with pytest.raises(DatasetError, match=rf"{_first_val_id(voc)}\.jpg is corrupt"):
        train_mod.train(tiny(tmp_path, data_dir))


# -- a broken file met mid-run: last.pt first, then exit 2 ----------------------------------------------------

def truncate_unlabeled_image(cfg, step: int, rank: int = 0, world: int = 1) -> tuple[Path, bytes]:
    """Cut in half the unlabeled image that ``rank`` first reads at pair step ``step`` (CAC from the first step)
    and that no rank reads earlier or in the same step; returns its path and its original bytes."""
    import itertools

    from cacnb.data import build_pair_dataset
    from cacnb.data.sampling import InfiniteSampler
    from cacnb.data.splits import split_lists

    pairs = build_pair_dataset(cfg.data, lists=split_lists(cfg.data))
    per = cfg.train.batch_size_unsup // world
    streams = [[i for i, _ in itertools.islice(InfiniteSampler(len(pairs), seed=cfg.train.seed + 1, rank=r,
                                                               world_size=world), (step + 1) * per)]
               for r in range(world)]
    read_elsewhere = {0} | {i for r, stream in enumerate(streams) for i in stream[:step * per]} | {
        i for r, stream in enumerate(streams) if r != rank for i in stream[step * per:]}  # 0: read at start-up
    index = next(i for i in streams[rank][step * per:] if i not in read_elsewhere)
    path = pairs.files.paths(index)[0]
    original = path.read_bytes()
    path.write_bytes(original[:len(original) // 2])
    return path, original


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_a_broken_unlabeled_image_mid_run_saves_last_pt_and_the_rerun_resumes(tmp_path, synthetic_voc, capsys):
    """Iteration 5 of 6 reads a truncated JPEG: the run saves iteration 4 (mid-epoch, past the epoch-end
    checkpoint at 3) and exits 2 naming the file; restored, the same command finishes the run as if unbroken."""
    from cacnb.train import main

    data_dir = _voc_copy(synthetic_voc, tmp_path)
    over = {"train.log_every": 3, "train.val_every": 0}
    cfg = tiny(tmp_path / "broken", data_dir, **over)
    broken, original = truncate_unlabeled_image(cfg, step=4)
    command = ["--config", str(save_config(cfg, tmp_path / "cfg.json"))]
    assert main(command) == 2
    err = capsys.readouterr().err
    first = next(line for line in err.replace("\r", "\n").splitlines() if "cacnb.train: " in line)
    assert first.startswith("cacnb.train: error: image ") and f"{broken} is corrupt" in first, err
    assert "Traceback" not in err and "run the same command again to resume" in err
    run = tmp_path / "broken" / "run"
    assert f"after iteration 4/6 and saved it in {run / 'last.pt'}" in err
    assert torch.load(run / "last.pt", weights_only=True)["iteration"] == 4
    assert [r["iter"] for r in split_kinds(read_metrics(run))["train"]] == [3, 4]  # the interval's line too

    broken.write_bytes(original)
    assert main(command) == 0
    assert f"resumed from {run / 'last.pt'} at iteration 4/6" in capsys.readouterr().out
    assert [r["iter"] for r in split_kinds(read_metrics(run))["train"]] == [3, 4, 6]
    straight = main(["--config", str(save_config(tiny(tmp_path / "straight", data_dir, **over),
                                                 tmp_path / "straight.json"))])
    assert straight == 0
    resumed = torch.load(run / "last.pt", weights_only=True)
    reference = torch.load(tmp_path / "straight" / "run" / "last.pt", weights_only=True)
    assert resumed["iteration"] == reference["iteration"] == 6
    assert all(torch.equal(resumed["model"][k], reference["model"][k]) for k in reference["model"])


def test_a_loader_workers_error_keeps_the_workers_own_message():
    from cacnb.data.sampling import loader_error_message
    from cacnb.data.validate import SampleError

    text = ("Caught SampleError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            '  File "voc.py", line 37, in read_image\n    raise open_failure(path, "image", e) from None\n'
            "cacnb.data.validate.SampleError: image /d/x.jpg is corrupt or not an image (truncated).\n"
            "See data_README.md\n")
    assert loader_error_message(SampleError(text)) == "image /d/x.jpg is corrupt or not an image (truncated).\n" \
                                                      "See data_README.md"
    assert loader_error_message(DatasetError("image /d/y.jpg is missing")) == "image /d/y.jpg is missing"
