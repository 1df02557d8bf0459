"""Reliability (issue 14), in process: bad values, bad data, storage failures, resume checks, refusals.

The tests that kill or signal real processes are in test_faults.py.
"""
import errno
import json
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cacnb.checkpoint_io import CheckpointError
from cacnb.config import ConfigError, load_config, save_config
from cacnb.data.errors import DatasetError
from cacnb.runlog import MetricsLog, read_metrics, split_kinds

from conftest import save_model_checkpoint
from test_train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


# -- item 9: every numeric key is range-checked at config time ------------------------------------------------

@pytest.mark.parametrize("key, value, allowed", [
    ("optim.lr", -0.1, "> 0"),
    ("train.log_every", 0, ">= 1"),
    ("loss.temperature", 0, "> 0"),
    ("data.num_classes", 0, "1..255"),
    ("data.scale_range", "[2.0, 0.5]", "0 < low <= high"),
    ("data.num_workers", -1, ">= 0"),
    ("train.max_iters", 0, ">= 1"),
    ("train.ckpt_every", -1, ">= 0"),
    ("data.stride", 0, ">= 1"),
    ("loss.pos_thresh", 1.5, "0..1"),
    ("optim.momentum", float("nan"), "0 <= momentum < 1"),
])
def test_out_of_range_values_name_the_key_and_range(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", {key: value})
    assert str(err.value).startswith(f"{key} must be {allowed}")


def test_every_numeric_key_has_a_range():
    import typing

    from cacnb.config import NUMERIC_RANGES, Config, valid_keys

    cfg, checked = Config(), {row[0] for row in NUMERIC_RANGES}
    for key in valid_keys():
        if key == "name" or key in ("data.iou_bound", "model.output_stride"):  # checked on their own
            continue
        section, name = key.split(".")
        hint = str(typing.get_type_hints(type(getattr(cfg, section)))[name])
        if "int" in hint or "float" in hint:
            assert key in checked, key


def test_out_of_range_value_exits_2_from_the_cli(capsys):
    from cacnb.train import main

    assert main(["--set", "train.log_every=0"]) == 2
    assert "train.log_every must be >= 1" in capsys.readouterr().err


# -- item 6 and 10: durable atomic writes, clear storage errors ------------------------------------------------

def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    import os

    from cacnb import paths

    synced = []
    real = os.fsync
    monkeypatch.setattr(paths.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                       real(fd)))
    paths.atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    assert (tmp_path / "a.txt").read_text() == "x"
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)


@pytest.mark.parametrize("error, cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (OSError(errno.EROFS, "Read-only file system"), "is read-only or not writable"),
])
def test_failed_writes_name_the_path_and_cause(tmp_path, error, cause):
    from cacnb.paths import StorageError, atomic_write

    def write(tmp):
        Path(tmp).write_bytes(b"partial")
        raise error

    (tmp_path / "last.pt").write_text("previous")
    with pytest.raises(StorageError) as err:
        atomic_write(tmp_path / "last.pt", write)
    message = str(err.value)
    assert message.startswith(f"cannot write {tmp_path / 'last.pt'}: ") and cause in message
    assert "\n" not in message
    assert (tmp_path / "last.pt").read_text() == "previous" and not list(tmp_path.glob(".*.tmp"))


def test_torch_save_on_a_full_disk_is_reported_as_such(tmp_path, monkeypatch):
    from cacnb import paths

    monkeypatch.setattr(paths, "_free_bytes", lambda folder: 0)

    def write(tmp):
        raise RuntimeError("basic_ios::clear: iostream error")

    with pytest.raises(paths.StorageError, match="no space left on the device"):
        paths.atomic_write(tmp_path / "last.pt", write)


def test_unwritable_out_dir_exits_2_with_one_line(tmp_path, synthetic_data_dir, capsys):
    from cacnb.train import main

    (tmp_path / "file").write_text("not a folder")
    assert main(["--set", f"data.data_dir={synthetic_data_dir}", "--set", f"train.out_dir={tmp_path / 'file'}",
                 "--set", "data.n_labeled=8"]) == 2
    err = capsys.readouterr().err
    assert "cacnb.train: error: cannot" in err and str(tmp_path / "file") in err and "Traceback" not in err


def test_stale_temporaries_are_removed(tmp_path):
    from cacnb.paths import remove_stale_temporaries

    stale = tmp_path / ".last.pt.k2j3h.tmp"
    stale.write_bytes(b"x" * 100)
    keep = tmp_path / "last.pt"
    keep.write_bytes(b"y")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and keep.exists()


# -- item 1: the run-dir lock ---------------------------------------------------------------------------------

def test_run_dir_lock_names_the_holder_and_dies_with_it(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from cacnb.paths import RunDirLock, RunDirLocked

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cacnb.paths import RunDirLock; "
                               f"RunDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked) as err:
            RunDirLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(err.value) and socket.gethostname() in str(err.value)
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
        holder.stdout.close()
    with RunDirLock(tmp_path):
        pass


def test_second_start_into_a_locked_run_dir_exits_2_and_writes_nothing(tmp_path, synthetic_data_dir, capsys):
    from cacnb.paths import RunDirLock
    from cacnb.train import main

    cfg = tiny(tmp_path, synthetic_data_dir)
    path = save_config(cfg, tmp_path / "cfg.json")
    with RunDirLock(tmp_path / "run"):
        assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is in use by another run (pid" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


# -- items 2, 6, 11: resume checks come before any write ------------------------------------------------------

def _fake_checkpoint(path, cfg, **config_changes):
    from cacnb.config import apply_overrides
    from cacnb.engine import CHECKPOINT_FORMAT, save_checkpoint

    saved = apply_overrides(cfg, config_changes)
    state = {"format": CHECKPOINT_FORMAT, "model": {}, "optimizer": {}, "iteration": 1, "config": saved.to_dict()}
    return save_checkpoint(state, path)


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_refused_resume_leaves_config_and_env_alone(tmp_path, synthetic_data_dir):
    from cacnb.train import train

    cfg = tiny(tmp_path, synthetic_data_dir)
    run = tmp_path / "run"
    _fake_checkpoint(run / "last.pt", cfg, **{"train.mode": "supervised"})
    (run / "config.json").write_text('{"the": "original"}')
    (run / "env.json").write_text('{"the": "original env"}')
    (run / ".last.pt.abcd.tmp").write_bytes(b"half-written")
    with pytest.raises(CheckpointError, match="train.mode is 'supervised' there but 'semi' here"):
        train(cfg)
    assert json.loads((run / "config.json").read_text()) == {"the": "original"}
    assert json.loads((run / "env.json").read_text()) == {"the": "original env"}
    assert not (run / ".last.pt.abcd.tmp").exists()  # the start removed the killed run's temporary


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_resuming_from_best_pt_exits_2_pointing_at_last_pt(tmp_path, synthetic_data_dir, capsys):
    from cacnb.engine import CHECKPOINT_FORMAT, save_checkpoint, weights_checkpoint
    from cacnb.train import main

    cfg = tiny(tmp_path, synthetic_data_dir)
    full = {"format": CHECKPOINT_FORMAT, "model": {}, "optimizer": {}, "bank": None, "rng": [], "scaler": None,
            "iteration": 3, "config": cfg.to_dict(), "history": []}
    best = save_checkpoint(weights_checkpoint(full), tmp_path / "old" / "best.pt")
    assert set(torch.load(best, weights_only=True)) == {"format", "model", "iteration", "config", "history",
                                                        "resumable"}
    assert main(["--config", str(save_config(cfg, tmp_path / "cfg.json")), "--resume", str(best)]) == 2
    err = capsys.readouterr().err
    assert f"cacnb.train: error: {best} is a best-on-val checkpoint" in err and "no optimiser state" in err
    assert f"Resume from last.pt ({tmp_path / 'old' / 'last.pt'}" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # refused before any write


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_changed_split_is_refused_unless_forced(tmp_path, synthetic_data_dir, capsys):
    from cacnb.train import train

    first = train(tiny(tmp_path, synthetic_data_dir, **{"train.max_iters": 1, "train.val_every": 0}))
    changed = tiny(tmp_path, synthetic_data_dir, **{"train.max_iters": 2, "train.val_every": 0,
                                                    "data.n_labeled": 10, "optim.lr": 0.03})
    with pytest.raises(CheckpointError, match=r"data.n_labeled is 8 there but 10 here.*--force"):
        train(changed)
    assert load_config(first / "config.json").data.n_labeled == 8  # untouched by the refusal
    train(changed, force=True)
    out = capsys.readouterr().out
    assert "optim.lr is 0.02 there but 0.03 here" in out  # other changes are reported, not silent
    assert load_config(first / "config.json").data.n_labeled == 10
    iters = [r["iter"] for r in split_kinds(read_metrics(first))["train"]]
    assert iters == [1, 2]


def test_resume_drops_duplicate_metric_lines(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for r in ({"kind": "train", "iter": 1}, {"kind": "train", "iter": 2}, {"kind": "val", "iter": 2},
              {"kind": "train", "iter": 2}, {"kind": "val", "iter": 2}, {"kind": "train", "iter": 3}):
        log.write(r)
    log.truncate_after(2)
    assert [(r["kind"], r["iter"]) for r in read_metrics(tmp_path)] == [("train", 1), ("train", 2), ("val", 2)]
    log.truncate_after(2, drop_val_at_end=True)
    assert [(r["kind"], r["iter"]) for r in read_metrics(tmp_path)] == [("train", 1), ("train", 2)]


# -- item 3: last.pt is written before validation --------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_a_crash_in_validation_keeps_the_epoch_and_the_resume_validates(tmp_path, synthetic_data_dir,
                                                                        monkeypatch):
    import cacnb.evaluate
    import cacnb.train as train_mod

    cfg = tiny(tmp_path, synthetic_data_dir, **{"train.epochs": 1, "train.iters_per_epoch": 2})
    real = cacnb.evaluate.evaluate

    def crash(*args, **kwargs):
        raise MemoryError("validation ran out of memory")

    monkeypatch.setattr(cacnb.evaluate, "evaluate", crash)
    with pytest.raises(MemoryError):
        train_mod.train(cfg)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["iteration"] == 2
    monkeypatch.setattr(cacnb.evaluate, "evaluate", real)
    run = train_mod.train(cfg)  # resumes at the end, validates what the crash missed, finishes
    kinds = split_kinds(read_metrics(run))
    assert [r["iter"] for r in kinds["val"]] == [2] and [r["iter"] for r in kinds["train"]] == [1, 2]
    assert (run / "best.pt").exists()
    assert torch.load(run / "last.pt", weights_only=True)["history"][-1]["iter"] == 2
    train_mod.train(cfg)  # complete now: nothing is validated or logged again
    assert split_kinds(read_metrics(run)) == kinds


# -- item 5: non-finite buffers ---------------------------------------------------------------------------------

def _tiny_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))


def test_saving_refuses_inf_batchnorm_statistics(tmp_path):
    from cacnb.train import Trainer, TrainingDiverged

    model = _tiny_model()
    model[1].running_var.fill_(float("inf"))
    fake = SimpleNamespace(model=model, device=torch.device("cpu"), iteration=7, run_dir=tmp_path)
    with pytest.raises(TrainingDiverged, match=r"iteration 7: tensor '1.running_var' is no longer finite"):
        Trainer._check_finite_weights(fake)


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_evaluation_refuses_non_finite_buffers_naming_the_tensor(tmp_path, synthetic_data_dir):
    from cacnb.model import build_model
    from cacnb.runs import load_run

    cfg = load_config("synthetic", {"data.data_dir": str(synthetic_data_dir), "model.proj_dim": 16})
    model = build_model(cfg)
    bn = next(name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    model.get_submodule(bn).running_mean[0] = float("nan")
    save_model_checkpoint(model, tmp_path / "nan.pt", cfg)
    with pytest.raises(CheckpointError, match=rf"non-finite values \(NaN/Inf\) in '{bn}.running_mean'"):
        load_run(tmp_path / "nan.pt", config=cfg, device="cpu")


# -- item 13: an unsafe pickle is refused as such ---------------------------------------------------------------

class _Payload:
    pass


def test_evaluate_leads_with_the_unsafe_pickle_refusal(tmp_path, synthetic_data_dir, capsys):
    from cacnb.evaluate import main

    cfg = load_config("synthetic", {"data.data_dir": str(synthetic_data_dir), "data.n_labeled": 8})
    save_config(cfg, tmp_path / "config.json")
    torch.save({"model": _Payload()}, tmp_path / "unsafe.pt")
    assert main(["--config", str(tmp_path / "config.json"), "--checkpoint", str(tmp_path / "unsafe.pt")]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert "arbitrary pickled objects" in first and "refuses to unpickle" in first
    assert "does not fit" not in first


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


# -- item 14: the synthetic set is generated only where it belongs -----------------------------------------------

def test_synthetic_set_is_not_generated_at_a_mistyped_path(tmp_path):
    from cacnb.train import ensure_dataset

    cfg = load_config("synthetic", {"data.data_dir": str(tmp_path / "synthtic"), "data.synthetic_train": 4,
                                    "data.synthetic_val": 2})
    with pytest.raises(DatasetError) as err:
        ensure_dataset(cfg)
    assert "holds no synthetic dataset" in str(err.value)
    assert f"python -m cacnb.data.synthetic --root {tmp_path / 'synthtic'}" in str(err.value)
    assert not (tmp_path / "synthtic").exists()
    ensure_dataset(cfg, make_synthetic=True)  # the explicit flag writes it
    assert (tmp_path / "synthtic" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").exists()


def test_the_default_synthetic_dir_is_the_presets(monkeypatch):
    from cacnb.paths import resolve
    from cacnb.train import default_synthetic_dir

    assert default_synthetic_dir(load_config("synthetic")) == resolve("data/synthetic")


# -- item 4: signals (the handler; the kill tests are in test_faults.py) ---------------------------------------

def test_second_ctrl_c_exits_at_once_but_repeats_do_not(monkeypatch):
    import os

    from cacnb import interrupts
    from cacnb.data import sampling

    exits = []
    monkeypatch.setattr(interrupts.os, "_exit", exits.append)
    with interrupts.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)      # torchrun / SLURM re-sending: not a reason to quit
        os.kill(os.getpid(), signal.SIGINT)       # the same Ctrl-C forwarded by torchrun, within the grace
        assert exits == []
        stop._first_at -= interrupts.REPEAT_GRACE_S + 1
        os.kill(os.getpid(), signal.SIGINT)       # a second Ctrl-C by the user
        assert exits == [130]
        assert sampling._STOPPING.value == 1  # loader workers now outlive a SIGTERM to the process group
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert sampling._STOPPING.value == 0


def test_loader_workers_survive_a_group_sigterm_only_while_the_trainer_stops(tmp_path):
    """In a subprocess: a dying loader worker makes torch raise in its parent."""
    import subprocess
    import sys

    script = """
import os, signal, sys, time, torch
from cacnb.data import sampling
class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, key):  # key: (index, sample seed)
        return torch.tensor(float(key[0]))
loader = iter(sampling.make_train_loader(Items(), 2, seed=0, num_workers=1))
next(loader)
worker = loader._workers[0]
if sys.argv[1] == "stopping":
    sampling.mark_stopping()
os.kill(worker.pid, signal.SIGTERM)
try:
    time.sleep(1.5)
    print("alive" if worker.is_alive() else "dead", flush=True)
except RuntimeError:  # torch's SIGCHLD handler: "DataLoader worker ... is killed by signal"
    print("dead", flush=True)
os._exit(0)
"""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"}
    outs = [subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=60,
                           env=env).stdout.strip() for mode in ("stopping", "not-stopping")]
    assert outs == ["alive", "dead"]


# -- item 15: the failing rank's own error first ----------------------------------------------------------------

def test_launch_failure_leads_with_the_first_failing_ranks_error():
    from cacnb.launch import failure_message

    noise = [f"[W gloo] Connection closed by peer [127.0.0.1]:{i}\n" for i in range(80)]
    lines = (["cacnb.train[rank 0]: error: data.data_dir='/x' does not exist\n",
              "cacnb.train[rank 0]:   See data_README.md\n"] + noise +
             ["torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n", "Failures:\n", "[1]:\n",
              "  rank      : 1 (local_rank: 1)\n", "  exitcode  : 1 (pid: 11)\n",
              "Root Cause (first observed failure):\n", "[0]:\n", "  rank      : 0 (local_rank: 0)\n", "  exitcode  : 2 (pid: 10)\n"])
    message = failure_message(1, lines, Path("/runs/r"))
    head = message.splitlines()
    assert head[0] == "training exited with code 1; run dir /runs/r."
    assert head[1] == "rank 0 failed first (exit code 2):"
    assert "data.data_dir='/x' does not exist" in head[2] and "See data_README.md" in head[3]
    assert head[4] == "other ranks: rank 1 exit code 1"
    assert "Connection closed" in message.split("Last lines of its output:")[1]
