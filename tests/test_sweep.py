"""python -m cacnb.sweep: argument checks (fast), then one tiny papermill sweep that is re-run and extended by a
failing row (slow; the three steps share one sweep dir to stay within about a minute)."""
from __future__ import annotations

import csv
import json
import time

import pytest

from cacnb.results import RESULT_COLUMNS
from cacnb.sweep import build_plan, main, parse_args

from held_out import with_test_split

TINY = ["--set", "data.n_labeled=6", "--set", "data.crop_size=32", "--set", "data.base_size=48",
        "--set", "data.num_workers=0", "--set", "data.val_max_images=1", "--set", "loss.selected_num=32",
        "--set", "loss.epoch_start_unsup=0", "--set", "train.batch_size=2", "--set", "train.batch_size_unsup=2",
        "--set", "train.epochs=1", "--set", "train.iters_per_epoch=1", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def held_out_dir(synthetic_data_dir, tmp_path_factory):
    return with_test_split(synthetic_data_dir, tmp_path_factory.mktemp("held_out"), n_test=3)


def test_plan_names_runs_and_sets_seeds(held_out_dir, tmp_path):
    plan = build_plan(parse_args(["--config", "synthetic", "--modes", "supervised,semi,full", "--seeds", "3,5",
                                  "--ablate", "loss.neg_filter=false", "--split-seeds", "--data-dir",
                                  str(held_out_dir), "--out", str(tmp_path), *TINY]))
    assert [r.run for r in plan.runs] == ["supervised_s3", "supervised_s5", "semi_s3", "semi_s5", "full_s3",
                                          "full_s5", "semi-loss.neg_filter-false_s3", "semi-loss.neg_filter-false_s5"]
    ablated = plan.run_config(plan.runs[-1])
    assert ablated.train.mode == "semi" and not ablated.loss.neg_filter and ablated.train.seed == 5
    assert ablated.data.split_seed == 5 and ablated.run_dir == tmp_path / "semi-loss.neg_filter-false_s5"
    assert plan.runs[-1].overrides_text == "loss.neg_filter=false"
    plain = build_plan(parse_args(["--config", "synthetic", "--seeds", "3", "--out", str(tmp_path)]))
    assert plain.run_config(plain.runs[0]).data.split_seed == 0          # the split stays without --split-seeds


def test_every_row_is_measured_on_the_pairs_of_the_base_config(held_out_dir, tmp_path, monkeypatch):
    """An ablation of the pair rule (data.context=false) changes the run's training, not the instrument: the
    sweep measures its consistency on the study's base pairs, like every other row."""
    import cacnb.sweep.runner as runner

    plan = build_plan(parse_args(["--config", "synthetic", "--modes", "semi", "--seeds", "0", "--ablate",
                                  "data.context=false", "--data-dir", str(held_out_dir), "--out", str(tmp_path),
                                  *TINY]))
    base, ablated = plan.runs
    assert not plan.run_config(ablated).data.context
    assert plan.instrument_config(ablated).data == plan.run_config(base).data
    run_dir = tmp_path / ablated.run
    run_dir.mkdir()
    for name in ("best.pt", "last.pt"):
        (run_dir / name).write_bytes(b"")
    measured = []

    def fake_measure(run, *, split, data_cfg):
        measured.append(data_cfg)
        return {"agreement": 0.9}

    monkeypatch.setattr(runner, "read_metrics", lambda run_dir: [])
    monkeypatch.setattr(runner, "last_iteration", lambda records: 4)
    monkeypatch.setattr(runner, "best_of", lambda records: {"iter": 4, "miou": 0.5})
    monkeypatch.setattr(runner, "load_run", lambda ckpt, config: object())
    monkeypatch.setattr(runner, "evaluate_run", lambda run, split, progress: {"miou": 0.5, "class_names": []})
    monkeypatch.setattr(runner, "result_to_json", lambda r, names, checkpoint, split: {"miou": r["miou"]})
    monkeypatch.setattr(runner, "measure_run", fake_measure)
    row = runner.Runner(plan)._evaluate(ablated, run_dir, 1.0)
    assert row["status"] == "ok" and row["test_agreement"] == pytest.approx(90.0)
    assert measured == [plan.run_config(base).data] and measured[0].context


@pytest.mark.parametrize("extra,message", [
    (["--modes", "semi,teacher"], "unknown mode"),
    (["--seeds", "0,x"], "must be an integer"),
    (["--seeds", "1,1"], "twice"),
    (["--set", "train.epoch=2"], "unknown config key"),
    (["--set", "train.seed=3"], "sets these itself"),
    (["--ablate", "loss.directional"], "section.key=value"),
    (["--ablate", "loss.directional=maybe"], "true/false"),
    (["--jobs", "0"], "must be >= 1"),
    (["--config", "nope.json"], "neither a preset"),
])
def test_bad_arguments_exit_2(held_out_dir, tmp_path, capsys, extra, message):
    argv = ["--config", "synthetic", "--data-dir", str(held_out_dir), "--out", str(tmp_path / "s"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()                                   # nothing written


def test_a_dataset_without_test_split_is_refused(synthetic_data_dir, tmp_path, capsys):
    assert main(["--config", "synthetic", "--data-dir", str(synthetic_data_dir), "--out", str(tmp_path / "s"),
                 "--set", "data.n_labeled=6"]) == 2
    assert "test.txt" in capsys.readouterr().err


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, {r["run"]: r for r in reader}


@pytest.mark.slow
def test_sweep_writes_rows_skips_them_and_records_a_failure(held_out_dir, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--config", "synthetic", "--modes", "supervised,semi", "--seeds", "0", "--data-dir",
            str(held_out_dir), "--out", str(out), "--jobs", "2", *TINY]
    assert main(argv) == 0
    columns, rows = _rows(out)
    assert tuple(columns) == RESULT_COLUMNS
    assert list(rows) == ["supervised_s0", "semi_s0"]
    for name, row in rows.items():
        run_dir = out / name
        assert row["status"] == "ok" and row["mode"] == name.split("_")[0] and row["seed"] == name[-1]
        assert 0 <= float(row["test_miou"]) <= 100 and 0 <= float(row["test_miou_final"]) <= 100
        assert row["best_iter"] == "1" and float(row["train_seconds"]) > 0 and row["log"] == str(run_dir / "sweep.log")
        config = json.loads((run_dir / "config.json").read_text())
        assert config["train"]["seed"] == int(row["seed"]) and config["train"]["mode"] == row["mode"]
        test = json.loads((run_dir / "test.json").read_text())
        assert test["best"]["split"] == "test" and test["best"]["num_images"] == 3 and len(test["final"]["iou"]) == 21
        assert test["test_miou"] == pytest.approx(float(row["test_miou"]), abs=1e-4)
        # best.pt is the last iteration here: last.pt is not evaluated a second time
        assert row["final_iter"] == "1" and test["final"]["same_as"] == "best"
        assert test["final"]["miou"] == test["best"]["miou"]
        consistency = test["consistency"]
        assert consistency["num_images"] == 3 and consistency["checkpoint"].endswith("best.pt")
        assert 0 <= float(row["test_agreement"]) <= 100
        assert float(row["test_agreement"]) == pytest.approx(100 * consistency["agreement"], abs=1e-3)
        assert "best val mIoU" in (run_dir / "03_training.ipynb").read_text()   # the executed notebook is kept
    assert "| semi − supervised | 1 |" in (out / "results.md").read_text()  # intervals: tests/test_results.py
    assert "cross-context agreement" in (out / "results.md").read_text()

    # the same command again: nothing re-runs
    stamps = {n: (out / n / "03_training.ipynb").stat().st_mtime_ns for n in rows}
    tic = time.monotonic()
    assert main(argv) == 0
    assert time.monotonic() - tic < 20
    assert stamps == {n: (out / n / "03_training.ipynb").stat().st_mtime_ns for n in rows}
    assert _rows(out)[1] == rows

    # an unfinished run (no test.json) resumes from its last.pt, and an extra row whose runs fail (too few
    # negatives for the world size, which the trainer refuses at start-up) is recorded with its log; the exit
    # code is non-zero
    (out / "semi_s0" / "test.json").unlink()
    assert main(argv + ["--ablate", "loss.neg_total=1"]) == 1
    _, after = _rows(out)
    resumed = (out / "semi_s0" / "sweep.log").read_text()
    assert "resumed from" in resumed and "already complete" in resumed
    assert after["supervised_s0"] == rows["supervised_s0"]
    assert after["semi_s0"]["status"] == "ok" and after["semi_s0"]["test_miou"] == rows["semi_s0"]["test_miou"]
    for name in ("semi-loss.neg_total-1_s0",):
        assert after[name]["status"] == "failed" and after[name]["overrides"] == "loss.neg_total=1"
        assert after[name]["test_miou"] == "" and after[name]["log"] == str(out / name / "sweep.log")
        assert "loss.neg_total = 1 is too small" in open(after[name]["log"]).read()


def test_ctrl_c_keeps_finished_rows(held_out_dir, tmp_path, monkeypatch):
    """The bookkeeping of an interrupt, without training: seed 0 finishes, Ctrl-C arrives while seed 1 runs."""
    import cacnb.sweep as sweep

    def fake_run(self, spec):
        while spec.seed > 0 and not self.stopping:                      # seed 1 runs until the sweep stops it
            time.sleep(0.01)
        status = "interrupted" if self.stopping else "ok"
        return sweep.status_row(spec, self.plan.out / spec.run, status, test_miou=40.0, test_miou_final=39.0,
                                best_iter=1, train_seconds=1.0)

    real_wait = sweep.cli.futures.wait
    calls = []

    def wait_then_interrupt(fs, timeout=None, return_when=None):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        first = next(iter(fs))
        first.result()
        return {first}, set(fs) - {first}

    monkeypatch.setattr(sweep.Runner, "__call__", fake_run)
    monkeypatch.setattr(sweep.cli.futures, "wait", wait_then_interrupt)
    plan = build_plan(parse_args(["--config", "synthetic", "--modes", "supervised", "--seeds", "0,1,2",
                                  "--data-dir", str(held_out_dir), "--out", str(tmp_path / "s"), *TINY]))
    assert sweep.run_sweep(plan) == 130
    monkeypatch.setattr(sweep.cli.futures, "wait", real_wait)
    _, rows = _rows(tmp_path / "s")
    assert rows["supervised_s0"]["status"] == "ok" and rows["supervised_s0"]["test_miou"] == "40.0000"
    assert rows["supervised_s1"]["status"] == rows["supervised_s2"]["status"] == "interrupted"
    assert (tmp_path / "s" / "results.md").is_file() and (tmp_path / "s" / "sweep.json").is_file()


def test_a_broken_run_does_not_stop_the_sweep(held_out_dir, tmp_path, monkeypatch):
    import cacnb.sweep as sweep

    def fake_run(self, spec):
        if spec.seed == 0:
            raise RuntimeError("disk full")
        return sweep.status_row(spec, self.plan.out / spec.run, "ok", test_miou=40.0, test_miou_final=39.0)

    monkeypatch.setattr(sweep.Runner, "__call__", fake_run)
    plan = build_plan(parse_args(["--config", "synthetic", "--modes", "supervised", "--seeds", "0,1",
                                  "--data-dir", str(held_out_dir), "--out", str(tmp_path / "s"), *TINY]))
    assert sweep.run_sweep(plan) == 1
    _, rows = _rows(tmp_path / "s")
    assert rows["supervised_s0"]["status"] == "failed" and rows["supervised_s1"]["status"] == "ok"
    assert "disk full" in (tmp_path / "s" / "supervised_s0" / "sweep.log").read_text()


def test_the_sweep_evaluates_at_each_runs_share_of_the_cores(held_out_dir, tmp_path, monkeypatch):
    """The sweep's own evaluation of a finished run takes the threads one run has (cores // jobs), beside the
    runs still training, and gives the process its thread count back; each rank of a run gets
    cores // (jobs x nproc); a caller's lower OMP_NUM_THREADS wins."""
    import os

    import torch

    import cacnb.sweep as sweep

    plan = build_plan(parse_args(["--config", "synthetic", "--modes", "supervised", "--seeds", "0", "--jobs", "2",
                                  "--data-dir", str(held_out_dir), "--out", str(tmp_path / "s"), *TINY]))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runner = sweep.Runner(plan)
    assert runner.threads() == 2 and runner.env()["OMP_NUM_THREADS"] == "2"
    seen = []

    def fake_evaluate(self, spec, run_dir, seconds):
        seen.append(torch.get_num_threads())
        return sweep.status_row(spec, run_dir, "ok")

    monkeypatch.setattr(sweep.Runner, "_papermill", lambda self, spec, run_dir: 0)
    monkeypatch.setattr(sweep.Runner, "_evaluate", fake_evaluate)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert runner(plan.runs[0])["status"] == "ok"
        assert seen == [2] and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runner.threads() == 1 and runner(plan.runs[0])["status"] == "ok" and seen == [2, 1]
        monkeypatch.delenv("OMP_NUM_THREADS")
        plan.nproc = 2                                                   # 2 runs x 2 ranks on 4 cores
        assert runner.env()["OMP_NUM_THREADS"] == "1" and runner(plan.runs[0])["status"] == "ok"
        assert seen == [2, 1, 2]
    finally:
        torch.set_num_threads(before)
