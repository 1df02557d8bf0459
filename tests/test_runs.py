"""cacnb.runs.load_run: a run dir or a checkpoint, each file read once, errors passed through as they are."""
from __future__ import annotations

import json

import pytest
import torch

import cacnb.runs as runs
from cacnb.checkpoint_io import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError, ours_to_official
from cacnb.config import load_config
from cacnb.runs import config_diff, describe_diff, load_run


@pytest.fixture(scope="module")
def run_dir(trained_run):
    """The session's trained run (conftest.py) as training left it: config.json, metrics.jsonl with validations
    at iterations 2 and 4, best.pt from the better of them and last.pt at iteration 5 (different weights); with
    best.pt's weights and iteration, and the best validation line, read here without load_run."""
    best = torch.load(trained_run / "best.pt", weights_only=True)
    lines = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    best_val = max((r for r in lines if r["kind"] == "val"), key=lambda r: r["miou"])
    return trained_run, best["model"], best["iteration"], best_val


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
    root, best, best_iter, best_val = run_dir
    run = load_run(root, device="cpu")
    assert reads == {"torch.load": 1, "config.json": 1, "metrics.jsonl": 1}
    assert run.checkpoint == root / "best.pt" and run.run_dir == root
    assert _same_weights(run.model, best) and not run.model.training
    assert run.config.model.proj_dim == 16 and run.config.model.pretrained is None
    assert [(r["kind"], r["iter"]) for r in run.metrics] == [
        ("train", 1), ("train", 2), ("val", 2), ("train", 3), ("train", 4), ("val", 4), ("train", 5), ("final", 5)]
    assert run.best_val() == best_val and best_val["iter"] == best_iter
    assert run.progress == (best_iter, 6) and run.state["source"] == "cacnb" and "optimizer" not in run.state


def test_a_checkpoint_path_opens_its_run(run_dir, reads):
    root, best, _, _ = run_dir
    run = load_run(root / "last.pt", device="cpu")
    assert reads["torch.load"] == 1
    assert run.checkpoint == root / "last.pt" and run.run_dir == root and len(run.metrics) == 8
    assert not _same_weights(run.model, best) and run.progress == (5, 6)


def test_a_lone_checkpoint_uses_its_saved_config(run_dir, tmp_path, reads):
    root, best, _, _ = run_dir
    (tmp_path / "m.pt").write_bytes((root / "best.pt").read_bytes())
    run = load_run(tmp_path / "m.pt", device="cpu")
    assert reads["torch.load"] == 1
    assert run.run_dir is None and run.metrics == [] and run.config.model.proj_dim == 16
    assert _same_weights(run.model, best)


def test_the_architecture_comes_from_the_checkpoint(run_dir):
    root, best, _, _ = run_dir
    # preset: proj_dim 128; the run: data.n_labeled 8
    run = load_run(root, config="synthetic", overrides={"data.n_labeled": 6}, device="cpu")
    assert run.config.model.proj_dim == 16 and run.config.data.n_labeled == 6 and _same_weights(run.model, best)


def test_an_override_that_contradicts_the_checkpoint_is_refused(run_dir):
    root = run_dir[0]
    with pytest.raises(CheckpointError, match="model.proj_dim is 16 in the checkpoint but 32 in the config"):
        load_run(root, overrides=["model.proj_dim=32"], device="cpu")


def test_an_official_checkpoint_loads(run_dir, tmp_path):
    root, best, _, _ = run_dir
    cfg = load_config(root / "config.json")
    torch.save({"state_dict": {f"module.{k}": v for k, v in ours_to_official(best).items()}},
               tmp_path / "official.pth")
    run = load_run(tmp_path / "official.pth", config=cfg, device="cpu")
    assert run.state["source"] == "official" and _same_weights(run.model, best)


def test_bad_checkpoints_raise_their_own_errors(run_dir, tmp_path):
    root = run_dir[0]
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


def test_a_notebook_at_its_defaults_finds_the_newest_trained_run_of_its_config(trained_run, capsys):
    from cacnb import notebook as nb

    out = trained_run.parent
    assert runs.newest_run("synthetic", "semi", out) == trained_run          # config.json name and train.mode
    assert runs.newest_run("synthetic", "supervised", out) is None
    assert runs.newest_run("synthetic_context", "semi", out) is None
    # the conventional <out_dir>/synthetic_semi holds nothing: the newest trained run is used, and named
    assert nb.find_run("synthetic", "semi", str(out)) == trained_run
    assert str(trained_run) in capsys.readouterr().out
    assert nb.find_run("synthetic", "supervised", str(out)) == out / "synthetic_supervised"   # none: as before
