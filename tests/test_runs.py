"""cacnb.runs.load_run: a run dir or a checkpoint, each file read once, errors passed through as they are."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import cacnb.runs as runs
from cacnb.checkpoint_io import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError, ours_to_official
from cacnb.config import load_config, save_config
from cacnb.model import build_model
from cacnb.runs import config_diff, describe_diff, load_run
from conftest import save_model_checkpoint


def _model(cfg, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return build_model(cfg)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir as training leaves it: config.json, metrics.jsonl, best.pt and last.pt (different weights)."""
    root = tmp_path_factory.mktemp("run")
    cfg = load_config("synthetic", {"model.proj_dim": 16, "train.epochs": 2, "train.iters_per_epoch": 5})
    save_config(cfg, root / "config.json")
    best, last = _model(cfg, 0), _model(cfg, 1)
    for name, model in (("best.pt", best), ("last.pt", last)):
        path = save_model_checkpoint(model, root / name, cfg)
        state = torch.load(path, weights_only=True)
        state.update(iteration=4, history=[{"iter": 4, "miou": 0.25}])
        torch.save(state, path)
    records = [{"kind": "train", "iter": 1, "loss": 2.0}, {"kind": "val", "iter": 5, "miou": 0.25},
               {"kind": "val", "iter": 10, "miou": 0.5}]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, best.state_dict()


class _Payload:
    """An object a checkpoint must never unpickle."""


def _same_weights(model, sd):
    return all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


@pytest.fixture()
def reads(monkeypatch):
    """Count every torch.load and every read of a config.json or metrics.jsonl while the test runs."""
    counts = {"torch.load": 0, "config.json": 0, "metrics.jsonl": 0}
    real_load, real_read = torch.load, type(runs.resolve(".")).read_text

    def load(*args, **kwargs):
        counts["torch.load"] += 1
        return real_load(*args, **kwargs)

    def read_text(self, *args, **kwargs):
        if self.name in counts:
            counts[self.name] += 1
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(type(runs.resolve(".")), "read_text", read_text)
    return counts


def test_a_run_dir_opens_with_each_file_read_once(run_dir, reads):
    root, best = run_dir
    run = load_run(root, device="cpu")
    assert reads == {"torch.load": 1, "config.json": 1, "metrics.jsonl": 1}
    assert run.checkpoint == root / "best.pt" and run.run_dir == root
    assert _same_weights(run.model, best) and not run.model.training
    assert run.config.model.proj_dim == 16 and run.config.model.pretrained is None
    assert [r["iter"] for r in run.metrics] == [1, 5, 10] and run.best_val()["miou"] == 0.5
    assert run.progress == (4, 10) and run.state["source"] == "cacnb" and "optimizer" not in run.state


def test_a_checkpoint_path_opens_its_run(run_dir, reads):
    root, best = run_dir
    run = load_run(root / "last.pt", device="cpu")
    assert reads["torch.load"] == 1
    assert run.checkpoint == root / "last.pt" and run.run_dir == root and len(run.metrics) == 3
    assert not _same_weights(run.model, best)


def test_a_lone_checkpoint_uses_its_saved_config(run_dir, tmp_path, reads):
    root, best = run_dir
    (tmp_path / "m.pt").write_bytes((root / "best.pt").read_bytes())
    run = load_run(tmp_path / "m.pt", device="cpu")
    assert reads["torch.load"] == 1
    assert run.run_dir is None and run.metrics == [] and run.config.model.proj_dim == 16
    assert _same_weights(run.model, best)


def test_the_architecture_comes_from_the_checkpoint(run_dir):
    root, best = run_dir
    run = load_run(root, config="synthetic", overrides={"data.n_labeled": 8}, device="cpu")  # preset: proj_dim 128
    assert run.config.model.proj_dim == 16 and run.config.data.n_labeled == 8 and _same_weights(run.model, best)


def test_an_override_that_contradicts_the_checkpoint_is_refused(run_dir):
    root, _ = run_dir
    with pytest.raises(CheckpointError, match="model.proj_dim is 16 in the checkpoint but 32 in the config"):
        load_run(root, overrides=["model.proj_dim=32"], device="cpu")


def test_an_official_checkpoint_loads(run_dir, tmp_path):
    root, best = run_dir
    cfg = load_config(root / "config.json")
    torch.save({"state_dict": {f"module.{k}": v for k, v in ours_to_official(best).items()}},
               tmp_path / "official.pth")
    run = load_run(tmp_path / "official.pth", config=cfg, device="cpu")
    assert run.state["source"] == "official" and _same_weights(run.model, best)


def test_bad_checkpoints_raise_their_own_errors(run_dir, tmp_path):
    root, _ = run_dir
    (tmp_path / "torn.pt").write_bytes((root / "best.pt").read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="corrupt or not a torch checkpoint"):
        load_run(tmp_path / "torn.pt", config=root / "config.json")
    torch.save({"model": _Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(UnsafeCheckpointError, match="refuses to unpickle"):
        load_run(tmp_path / "unsafe.pt", config=root / "config.json")
    with pytest.raises(CheckpointError, match="does not match the model"):  # no saved config: the loader's words
        torch.save({"state_dict": {"classifier.1.weight": torch.zeros(3, 256, 1, 1)}}, tmp_path / "other.pth")
        load_run(tmp_path / "other.pth", config=root / "config.json")


def test_a_missing_run_is_an_error_or_a_random_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no best.pt or last.pt"):
        load_run(tmp_path)
    run = load_run(tmp_path / "none", config="synthetic", allow_random=True, device="cpu")
    assert run.checkpoint is None and run.run_dir is None and run.progress is None


def test_config_diff_is_the_one_saved_config_comparison():
    cfg = load_config("synthetic")
    saved = json.loads(json.dumps(load_config("synthetic", {"data.n_labeled": 8, "train.seed": 1}).to_dict()))
    saved["train"].pop("seed")                     # written by an older version without the key
    assert isinstance(saved["data"]["scale_range"], list)  # tuples come back from JSON as lists: still equal
    changes = config_diff(saved, cfg)
    assert changes == {"data.n_labeled": (8, 60)}
    assert "data.n_labeled" not in config_diff(saved, cfg, skip=["data.n_labeled"])
    assert describe_diff({"a.b": (1, 2)}) == "a.b is 1 there but 2 here"
