"""The notebook-side launcher: command lines, failures surfacing with the log tail, timeouts."""
import sys
from pathlib import Path

import pytest

from cacnb.config import overrides_from_parameters
from cacnb.launch import LaunchError, launch, torchrun_command


def test_commands_for_one_and_many_workers(tmp_path):
    cfg = tmp_path / "config.json"
    one = torchrun_command(cfg, 1)
    assert one == [sys.executable, "-m", "cacnb.train", "--config", str(cfg)]
    four = torchrun_command(cfg, 4)
    assert four[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in four and "--nproc_per_node=4" in four and four[-4:] == ["-m", "cacnb.train",
                                                                                     "--config", str(cfg)]
    multi = torchrun_command(cfg, 8, nnodes=2, rdzv_endpoint="node0:29500")
    assert "--nnodes=2" in multi and "--rdzv_endpoint=node0:29500" in multi and "--standalone" not in multi
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(cfg, 8, nnodes=2)


def test_parameters_become_typed_overrides():
    over = overrides_from_parameters("synthetic", mode="supervised", epochs=2, data_dir=None, out_dir="runs/x")
    assert over == {"train.mode": "supervised", "train.epochs": 2, "train.out_dir": "runs/x"}
    assert overrides_from_parameters("voc_r50_1323") == {}
    # a baseline and a CAC run of one config never share a run dir

    from cacnb.config import load_config

    from cacnb.paths import resolve

    assert load_config("voc_r50_1323").run_dir == resolve("runs") / "voc_r50_1323_semi"
    assert load_config("synthetic", over).run_dir == resolve("runs/x") / "synthetic_supervised"


def test_kernel_relative_paths_reach_the_worker_resolved(tmp_path, monkeypatch):
    """A notebook kernel runs in notebooks/; the worker runs from the project root: paths must not drift."""
    import importlib

    launch_mod = importlib.import_module("cacnb.launch")  # the module; `cacnb.launch` itself is the function
    from cacnb.config import load_config

    seen = {}

    def fake_run(cmd, env, **kw):  # the config file the worker is given, read while it exists
        seen["cmd"], seen["cfg"] = cmd, load_config(cmd[-1])
        return 0, []

    monkeypatch.setattr(launch_mod, "_run_streaming", fake_run)
    (tmp_path / "kernel" / "mydata").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "kernel")
    run = launch("synthetic", overrides={"data.data_dir": "mydata", "train.out_dir": str(tmp_path / "runs")},
                 quiet=True)
    assert seen["cfg"].data.data_dir == str(tmp_path / "kernel" / "mydata")
    assert Path(seen["cmd"][-1]).parent == run
    assert not Path(seen["cmd"][-1]).exists()  # the launch request is removed; the worker writes config.json


def test_a_failing_worker_raises_with_the_tail_of_its_log(tmp_path, capsys):
    over = {"data.data_dir": str(tmp_path / "missing_voc"), "train.out_dir": str(tmp_path),
            "model.pretrained": None}
    with pytest.raises(LaunchError) as e:
        launch("voc_r50_1323", nproc=1, overrides=over, timeout=120)
    assert "exited with code" in str(e.value) and "missing_voc" in str(e.value)
    assert "missing_voc" in capsys.readouterr().out  # the output was streamed into the cell as well


def test_timeout_stops_the_run(tmp_path):
    with pytest.raises(LaunchError, match="timed out"):
        launch("synthetic", overrides={"train.out_dir": str(tmp_path)}, timeout=0.5, quiet=True)
