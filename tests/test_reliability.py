"""Reliability (issue 14), in process: bad values, bad data, storage failures, resume checks, refusals.

The tests that kill or signal real processes are in test_faults.py; resume checks in test_resume_checks.py; the
dataset rules and broken files in test_dataset_rules.py.
"""
import errno
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cacnb.checkpoint_io import CheckpointError
from cacnb.config import ConfigError, load_config, save_config
from cacnb.data.errors import DatasetError

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
