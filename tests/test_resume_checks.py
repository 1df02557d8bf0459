"""Reliability (issue 14), in process: a resume is checked before anything is written, and last.pt comes before
validation. The rest of issue 14 is in test_reliability.py and test_faults.py."""
import json

import pytest
import torch

from cacnb.checkpoint_io import CheckpointError
from cacnb.config import load_config, save_config
from cacnb.runlog import MetricsLog, read_metrics, split_kinds

from test_train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


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
