"""Training: run dir contents, exact resume, NaN stop, 2-process gloo DDP, CLI errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cacnb.config import load_config, save_config
from cacnb.runlog import read_metrics, split_kinds

ROOT = Path(__file__).resolve().parent.parent

# in-process trainings: two OpenMP threads on a loaded 2-core machine make them ~10x slower (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, data_dir, **over):
    base = {
        "data.data_dir": str(data_dir), "data.n_labeled": 8, "data.crop_size": 64, "data.base_size": 80,
        "data.num_workers": 0, "data.val_max_images": 2,
        "model.backbone": "resnet18", "model.pretrained": None,
        "loss.selected_num": 64, "loss.epoch_start_unsup": 0,
        "train.epochs": 2, "train.iters_per_epoch": 3, "train.batch_size": 2, "train.batch_size_unsup": 2,
        "train.log_every": 1, "train.out_dir": str(tmp_path), "train.run_name": "run",
    }
    base.update(over)
    return load_config("synthetic", base)


def train_losses(run_dir):
    rows = split_kinds(read_metrics(run_dir))["train"]
    return {r["iter"]: (r["loss"], r.get("loss_sup"), r.get("loss_unsup")) for r in rows}


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_semi_run_writes_the_run_dir(tmp_path, synthetic_data_dir):
    from cacnb.train import train

    run = train(tiny(tmp_path, synthetic_data_dir, **{"optim.backbone_lr_mult": 0.1}))
    for name in ("config.json", "env.json", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run / name).exists(), name
    kinds = split_kinds(read_metrics(run))
    assert [r["iter"] for r in kinds["train"]] == list(range(1, 7))
    assert all("loss_unsup" in r and "frac_pos_a" in r and "lr" in r for r in kinds["train"])
    assert len(kinds["val"]) == 2 and 0.0 <= kinds["val"][-1]["miou"] <= 1.0
    assert kinds["final"][0]["ranks_in_sync"] is True
    state = torch.load(run / "last.pt", weights_only=True)  # plain tensors and primitives only
    assert state["iteration"] == 6 and state["format"] == "cacnb-checkpoint"
    assert set(state) >= {"model", "optimizer", "bank", "rng", "config", "history", "epoch", "scaler"}
    # best.pt: the weights, config and history, none of what only resuming needs (about half the size)
    best = torch.load(run / "best.pt", weights_only=True)
    assert {"model", "config", "history", "iteration", "best_miou"} <= set(best)
    assert not set(best) & {"optimizer", "bank", "rng", "scaler"} and best["resumable"] is False
    assert best["history"][-1]["miou"] == best["best_miou"] == max(r["miou"] for r in kinds["val"])
    assert (run / "best.pt").stat().st_size < 0.75 * (run / "last.pt").stat().st_size
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__
    # the poly schedule decays every iteration; the backbone runs at lr / 10
    lrs = [r["lr"] for r in kinds["train"]]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert groups["backbone"]["initial_lr"] == pytest.approx(0.1 * groups["head"]["initial_lr"])
    assert groups["head"]["momentum"] == 0.9 and groups["head"]["weight_decay"] == 1e-4
    # a finished run is not retrained when launched again
    assert train(tiny(tmp_path, synthetic_data_dir, **{"optim.backbone_lr_mult": 0.1})) == run
    assert len(split_kinds(read_metrics(run))["train"]) == 6


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_resume_is_exact(tmp_path, synthetic_data_dir):
    """N iterations + resume + N iterations give the same losses as 2N straight."""
    from cacnb.train import train

    straight = train(tiny(tmp_path / "a", synthetic_data_dir))
    # stop mid-epoch (3 iterations per epoch), with the pair loader and the feature bank mid-stream
    first = train(tiny(tmp_path / "b", synthetic_data_dir, **{"train.max_iters": 4}))
    assert torch.load(first / "last.pt", weights_only=True)["iteration"] == 4
    resumed = train(tiny(tmp_path / "b", synthetic_data_dir))
    logged = [r["iter"] for r in split_kinds(read_metrics(resumed))["train"]]
    assert logged == list(range(1, 7))  # no duplicated or missing lines after the resume
    a, b = train_losses(straight), train_losses(resumed)
    for it in a:
        assert a[it] == pytest.approx(b[it], rel=1e-6, abs=1e-7), f"iteration {it}: {a[it]} vs {b[it]}"
    sa = torch.load(straight / "last.pt", weights_only=True)["model"]
    sb = torch.load(resumed / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
def test_supervised_mode_trains_without_the_unlabeled_branch(tmp_path, synthetic_data_dir):
    from cacnb.checkpoint_io import CheckpointError
    from cacnb.train import train

    run = train(tiny(tmp_path, synthetic_data_dir, **{"train.mode": "supervised", "train.epochs": 1}))
    rows = split_kinds(read_metrics(run))["train"]
    assert rows and all("loss_unsup" not in r for r in rows)
    # a CAC run pointed at the baseline's run dir refuses its checkpoint instead of resuming it
    with pytest.raises(CheckpointError, match="train.mode is 'supervised' there but 'semi' here"):
        train(tiny(tmp_path, synthetic_data_dir, **{"train.epochs": 1}))


@pytest.mark.filterwarnings("ignore:model.pretrained is None:UserWarning")
@pytest.mark.parametrize("log_every", [1, 4])  # 4: found at a later read (a checkpoint or the last log line)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_data_dir, monkeypatch, log_every):
    """One diverging run, trained once: with ckpt_every=0 the NaN at iteration index 4 (second epoch) keeps the
    epoch-end checkpoint (3); resumed from it with ckpt_every=1, the same NaN keeps the checkpoint of every
    iteration (4). With log_every=4 the NaN is read later, and the error still names iteration 4."""
    import cacnb.train as train_mod
    import cacnb.train.loop as loop

    real = loop.train_step
    calls = {"n": 0, "poison_at": 5}

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == calls["poison_at"]:  # iteration index 4, in the second epoch
            result.terms["loss_sup"] = torch.tensor(float("nan"))
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(loop, "train_step", poisoned)  # where the loop looks it up
    diverged = "iteration 4: loss term 'loss_sup'.*last good checkpoint"
    with pytest.raises(train_mod.TrainingDiverged, match=diverged):
        train_mod.train(tiny(tmp_path, synthetic_data_dir, **{"train.ckpt_every": 0, "train.log_every": log_every}))
    kept = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert kept["iteration"] == 3  # every epoch
    assert (calls["n"] == 5) if log_every == 1 else (calls["n"] >= 5)  # a later read may come a few steps on
    # resume at 3: index 3 trains and is saved, index 4 is poisoned again
    calls.update(n=0, poison_at=2)
    with pytest.raises(train_mod.TrainingDiverged, match=diverged):
        train_mod.train(tiny(tmp_path, synthetic_data_dir, **{"train.ckpt_every": 1, "train.log_every": log_every}))
    kept = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert kept["iteration"] == 4  # every ckpt_every iterations
    assert calls["n"] == 2


def _torchrun(args, env=None, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CACNB_DIST_TIMEOUT": "120", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "cacnb.train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_process_gloo_semi_run(tmp_path, synthetic_data_dir):
    # epoch 0 is supervised only (the projector idles under DDP), CAC starts at epoch 1
    cfg = tiny(tmp_path, synthetic_data_dir, **{"train.epochs": 2, "train.iters_per_epoch": 2,
                                                "loss.epoch_start_unsup": 1, "loss.step_save": 1,
                                                "train.batch_size": 4, "train.batch_size_unsup": 4})
    path = save_config(cfg, tmp_path / "cfg.json")
    proc = _torchrun(["--config", str(path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    kinds = split_kinds(read_metrics(run))
    final = kinds["final"][0]
    assert len(final["param_digests"]) == 2 and final["ranks_in_sync"] is True
    assert [("loss_unsup" in r) for r in kinds["train"]] == [False, False, True, True]
    state = torch.load(run / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["world_size"] == 2
    assert (run / "best.pt").exists()
    # the bank holds step_save + 1 gathered sets: 2 crops x selected_num (64) x 2 ranks each
    assert state["bank"]["lengths"].tolist() == [2 * 64 * 2] * 2
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    # a clean run's log: each warning once (rank 0), DDP stops searching unused parameters once CAC uses them all
    log = proc.stdout + proc.stderr
    assert log.count("starts from random weights") == 1, log[-3000:]
    assert "find_unused_parameters" not in log and "Traceback" not in log and "KeyboardInterrupt" not in log


def test_cli_errors_are_clear(tmp_path):
    from cacnb.train import main

    assert main(["--config", "voc_r50_1323", "--set", "train.epoch=1"]) == 2
    proc = subprocess.run([sys.executable, "-m", "cacnb.train", "--config", "voc_r50_1323", "--set",
                           f"data.data_dir={tmp_path / 'nowhere'}", "--set", f"train.out_dir={tmp_path}",
                           "--set", "model.pretrained=null"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr


def test_indivisible_global_batch_under_two_ranks(tmp_path, synthetic_data_dir, monkeypatch, capsys):
    """The start-up check for two ranks, in one process: only the world size the trainer sees is two (the message
    needs no process group; the genuine two-process runs are above)."""
    from cacnb import dist
    from cacnb.train import main

    cfg = tiny(tmp_path, synthetic_data_dir, **{"train.batch_size": 5})
    path = save_config(cfg, tmp_path / "cfg.json")
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert main(["--config", str(path)]) == 2
    assert "train.batch_size=5 is a global batch and must divide by the world size (2)" in capsys.readouterr().err


def test_batch_of_one_per_rank_is_refused_clearly(tmp_path, synthetic_data_dir):
    from cacnb.config import ConfigError
    from cacnb.train import train

    with pytest.raises(ConfigError, match="at least 2 per rank"):
        train(tiny(tmp_path, synthetic_data_dir, **{"train.batch_size": 1}))
