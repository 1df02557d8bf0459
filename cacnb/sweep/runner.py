"""One run of a sweep: notebook 03 executed by papermill in a subprocess, then its checkpoints evaluated on the
test split (mIoU and the consistency metrics) into ``test.json``, which marks the run finished."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from ..consistency import measure_run
from ..evaluate import evaluate_run, result_to_json
from ..paths import atomic_write_text
from ..results import RESULT_COLUMNS
from ..runlog import best_of, last_iteration, read_metrics
from ..runs import load_run
from .plan import Plan, RunSpec

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "03_training.ipynb"


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` intra-op threads in this process, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def status_row(spec: RunSpec, run_dir: Path, status: str, **values) -> dict:
    row = {"run": spec.run, "mode": spec.mode, "seed": spec.seed, "overrides": spec.overrides_text,
           "status": status, "log": str(run_dir / "sweep.log")}
    row.update(values)
    return row


def finished_row(spec: RunSpec, run_dir: Path) -> Optional[dict]:
    """The results row of a finished run (its ``test.json``), else None."""
    path = run_dir / "test.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return status_row(spec, run_dir, "ok", **{k: saved.get(k) for k in RESULT_COLUMNS if k in saved})


def consistency_columns(consistency: Optional[dict]) -> dict:
    """The ``results.csv`` columns of a :func:`cacnb.consistency.measure` result (percent for agreement and
    overlap mIoU, cosines for the similarities)."""
    c = consistency or {}
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    return {"test_agreement": pct(c.get("agreement")), "test_overlap_miou": pct(c.get("overlap_miou")),
            "test_pos_sim": c.get("pos_sim"), "test_other_sim": c.get("other_sim"), "test_margin": c.get("margin")}


class Runner:
    """Executes runs (papermill subprocesses) and evaluates them on test; safe to use from several threads."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.eval_lock = threading.Lock()  # one evaluation at a time: they are short and would fight for cores
        self.stopping = False

    def threads(self, per_rank: bool = True) -> int:
        """A share of the cores: one rank's (``cores // (jobs × nproc)``, each papermill run's OpenMP threads), or
        one run's (``per_rank=False``: ``cores // jobs``), which the sweep's own evaluation of a finished run takes
        beside the runs still training. OpenMP spin-waits make oversubscribed tiny convolutions crawl: an evaluation
        at 2 threads beside a 1-thread training took 15-21 s against 9-10 s at 1 thread, and slowed that
        training's steps by a quarter (benchmarks/bench_eval_threads.py). Never above a thread count the caller
        set."""
        share = max(1, (os.cpu_count() or 1) // (self.plan.jobs * (self.plan.nproc if per_rank else 1)))
        return min(share, int(os.environ.get("OMP_NUM_THREADS") or share))

    def env(self) -> dict:
        env = dict(os.environ)
        root = str(NOTEBOOK.parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["OMP_NUM_THREADS"] = str(self.threads())
        return env

    def parameters(self, spec: RunSpec) -> dict:
        params = {"config": self.plan.config, "mode": spec.mode, "nproc": self.plan.nproc,
                  "out_dir": str(self.plan.out), "overrides": self.plan.overrides(spec), "also_supervised": False,
                  "timeout": self.plan.timeout}
        if self.plan.data_dir:
            params["data_dir"] = self.plan.data_dir
        return params

    def __call__(self, spec: RunSpec) -> dict:
        run_dir = self.plan.out / spec.run
        run_dir.mkdir(parents=True, exist_ok=True)
        seconds = self._previous_seconds(run_dir)
        tic = time.monotonic()
        code = self._papermill(spec, run_dir)
        seconds += time.monotonic() - tic
        atomic_write_text(run_dir / "sweep_state.json", json.dumps({"train_seconds": seconds}) + "\n")
        if code != 0 or self.stopping:
            return status_row(spec, run_dir, "interrupted" if self.stopping else "failed", train_seconds=seconds)
        try:
            with self.eval_lock, torch_threads(self.threads(per_rank=False)):
                return self._evaluate(spec, run_dir, seconds)
        except Exception as e:  # a broken checkpoint fails this run, not the sweep
            with open(run_dir / "sweep.log", "a") as log:
                log.write(f"\n[cacnb.sweep] test evaluation failed: {type(e).__name__}: {e}\n")
            return status_row(spec, run_dir, "failed", train_seconds=seconds)

    @staticmethod
    def _previous_seconds(run_dir: Path) -> float:
        state = run_dir / "sweep_state.json"
        return float(json.loads(state.read_text())["train_seconds"]) if state.is_file() else 0.0

    def _papermill(self, spec: RunSpec, run_dir: Path) -> int:
        params_path = run_dir / "sweep_parameters.json"
        atomic_write_text(params_path, json.dumps(self.parameters(spec), indent=2) + "\n")
        cmd = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(run_dir / NOTEBOOK.name), "-f",
               str(params_path), "--log-output", "--no-progress-bar", "-k", "python3"]
        with open(run_dir / "sweep.log", "a") as log:
            log.write(f"\n[cacnb.sweep] {datetime.datetime.now().isoformat(timespec='seconds')} $ "
                      f"{shlex.join(cmd)}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return -1
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                        cwd=str(Path.cwd()))
                self.procs.add(proc)
            try:
                return proc.wait()
            finally:
                with self.lock:
                    self.procs.discard(proc)

    def _evaluate(self, spec: RunSpec, run_dir: Path, seconds: float) -> dict:
        """Test mIoU of best.pt and last.pt (evaluated once when they hold the same iteration) and the consistency
        metrics of best.pt (:mod:`cacnb.consistency`); written to ``test.json``, which marks the run finished."""
        if not (run_dir / "last.pt").is_file():
            raise FileNotFoundError(f"{run_dir / 'last.pt'} is missing after training")
        records = read_metrics(run_dir)
        final_iter, best = last_iteration(records), best_of(records)
        results, consistency, timing = {"best": None, "final": None}, None, {"papermill": seconds}
        for which, name in (("best", "best.pt"), ("final", "last.pt")):
            ckpt = run_dir / name
            if which == "final" and results["best"] is not None and best and best["iter"] == final_iter:
                results["final"] = {**results["best"], "checkpoint": str(ckpt), "same_as": "best"}
                continue
            if not ckpt.is_file():
                continue
            tic = time.monotonic()
            run = load_run(ckpt, config=run_dir / "config.json")
            r = evaluate_run(run, split="test", progress=False)
            results[which] = result_to_json(r, r["class_names"], checkpoint=str(ckpt), split="test")
            timing[f"test {name}"] = time.monotonic() - tic
            if consistency is None:  # best.pt's (evaluated first), or last.pt's when there is no best.pt
                tic = time.monotonic()
                data = self.plan.instrument_config(spec).data  # the same pairs for every row of the study
                consistency = {**measure_run(run, split="test", data_cfg=data), "checkpoint": str(ckpt)}
                timing["consistency"] = time.monotonic() - tic
        values = {
            "val_miou": 100 * best["miou"] if best else None,
            "best_iter": best["iter"] if best else None,
            "final_iter": final_iter,
            "test_miou": 100 * results["best"]["miou"] if results["best"] else None,
            "test_miou_final": 100 * results["final"]["miou"],
            **consistency_columns(consistency),
            "train_seconds": seconds,
        }
        payload = {"run": spec.run, "mode": spec.mode, "seed": spec.seed, "overrides": spec.overrides_text,
                   **values, **results, "consistency": consistency, "seconds": timing}
        atomic_write_text(run_dir / "test.json", json.dumps(payload, indent=2) + "\n")  # last: marks it finished
        return status_row(spec, run_dir, "ok", **values)

    def stop(self, grace: float = 60.0) -> None:
        """Ctrl-C: the children got SIGINT too (same process group) and checkpoint; give them time, then kill."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
