"""A study over seeds: ``python -m cacnb.sweep`` runs notebook 03 with papermill once per (row, seed).

::

    python -m cacnb.sweep --config synthetic_context --modes supervised,semi,full --seeds 0,1,2 \\
        [--ablate loss.directional=false --ablate loss.neg_filter=false] [--split-seeds] \\
        [--nproc N] [--jobs J] [--set key=value ...] [--timeout S] --out runs/sweep

Each run is ``notebooks/03_training.ipynb`` executed by papermill into ``<out>/<run>/03_training.ipynb``, with
its run dir ``<out>/<run>/`` (``<mode>_s<seed>``, or ``semi-<key>-<value>_s<seed>`` for an ablation) and its log
``<out>/<run>/sweep.log``. The seed sets ``train.seed`` (model init, data order, augmentation) and, with
``--split-seeds``, ``data.split_seed`` (which images are labeled). After training, the best-on-val checkpoint
(``best.pt``) and the final one (``last.pt``) are evaluated on the **test** split; ``test.json`` keeps their
per-class IoU and marks the run finished.

``<out>/results.csv`` (columns :data:`cacnb.results.RESULT_COLUMNS`; mIoU in percent) is rewritten atomically
after every run, and ``results.md`` at the end (see :mod:`cacnb.results`). Re-running the same command skips
finished runs and resumes the others from their ``last.pt``. A failed run is recorded as ``failed`` with its log;
the sweep goes on and exits 1 at the end. Ctrl-C keeps every finished row (exit 130). Bad arguments exit 2.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .config import MODES, PRESETS, Config, ConfigError, load_config, parse_overrides
from .data.errors import DatasetError
from .data.splits import split_lists
from .data.validate import check_split_lists, run_split_lists
from .evaluate import evaluate_run, result_to_json
from .paths import atomic_write_text, resolve
from .pretrain import ensure_pretrained
from .consistency import measure_run
from .results import RESULT_COLUMNS, write_results_csv, write_results_md
from .runlog import best_of, last_iteration, read_metrics
from .runs import load_run
from .train import ensure_dataset

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "03_training.ipynb"
OWNED_KEYS = ("train.mode", "train.seed", "train.run_name", "train.out_dir", "train.resume")
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class SweepError(ValueError):
    """Bad sweep arguments; the message says which and what to do (exit code 2)."""


@dataclass
class RunSpec:
    """One (row, seed) of the study."""
    run: str                     # run dir name under --out
    mode: str                    # supervised | semi | full
    seed: int
    ablation: dict = field(default_factory=dict)   # the row's own override (ablation rows), e.g. {"loss.x": "false"}

    @property
    def overrides_text(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.ablation.items())


@dataclass
class Plan:
    config: str                  # preset name or absolute JSON path
    runs: list[RunSpec]
    out: Path
    common: dict                 # --set overrides, for every run
    nproc: int = 1
    jobs: int = 1
    split_seeds: bool = False
    data_dir: Optional[str] = None
    timeout: Optional[float] = None

    def overrides(self, spec: RunSpec) -> dict:
        over = {**self.common, **spec.ablation, "train.seed": spec.seed, "train.run_name": spec.run}
        if self.split_seeds:
            over["data.split_seed"] = spec.seed
        return over

    def run_config(self, spec: RunSpec) -> Config:
        extra = {"data.data_dir": self.data_dir} if self.data_dir else {}
        return load_config(self.config, {**self.overrides(spec), **extra, "train.mode": spec.mode,
                                         "train.out_dir": str(self.out)})


# ---------------------------------------------------------------------------------------------------------------
# the plan


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _parse_list(text: str, what: str, cast=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SweepError(f"--{what} is empty; give a comma-separated list, e.g. --{what} "
                         + ("0,1,2" if cast is int else "supervised,semi"))
    try:
        values = [cast(t) for t in items]
    except ValueError:
        raise SweepError(f"--{what} {text!r}: every item must be an integer, e.g. --{what} 0,1,2") from None
    if len(set(values)) != len(values):
        raise SweepError(f"--{what} {text!r} lists a value twice")
    return values


def _parse_pairs(items: Sequence[str], flag: str) -> dict:
    try:
        pairs = parse_overrides(items)
    except ConfigError as e:
        raise SweepError(f"{flag}: {e}") from None
    owned = sorted(set(pairs) & set(OWNED_KEYS))
    if owned:
        raise SweepError(f"{flag} {', '.join(owned)}: the sweep sets these itself (--modes, --seeds, --out)")
    return pairs


def build_plan(args: argparse.Namespace) -> Plan:
    """Check every argument and every run's config before anything is written."""
    modes = _parse_list(args.modes, "modes")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SweepError(f"--modes: unknown mode(s) {bad}; choose from {list(MODES)}")
    seeds = _parse_list(args.seeds, "seeds", int)
    if importlib.util.find_spec("papermill") is None:
        raise SweepError("papermill is not installed; every run is notebook 03 executed by papermill. Install it "
                         "with `pip install -e '.[notebooks]'` (make install does)")
    if args.jobs < 1 or args.nproc < 1:
        raise SweepError(f"--jobs and --nproc must be >= 1, got --jobs {args.jobs} --nproc {args.nproc}")
    common = _parse_pairs(args.set, "--set")
    config = args.config if args.config in PRESETS else str(resolve(args.config))
    if args.config not in PRESETS and not Path(config).is_file():
        raise SweepError(f"--config {args.config!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    runs = [RunSpec(f"{mode}_s{seed}", mode, seed) for mode in modes for seed in seeds]
    for item in args.ablate:
        ablation = _parse_pairs([item], "--ablate")
        (key, value), = ablation.items()
        runs += [RunSpec(f"semi-{_slug(key)}-{_slug(str(value))}_s{seed}", "semi", seed, ablation)
                 for seed in seeds]
    names = [r.run for r in runs]
    if len(set(names)) != len(names):
        raise SweepError("--ablate lists the same ablation twice")
    plan = Plan(config=config, runs=runs, out=resolve(args.out), common=common, nproc=args.nproc, jobs=args.jobs,
                split_seeds=args.split_seeds, data_dir=str(resolve(args.data_dir)) if args.data_dir else None,
                timeout=args.timeout)
    for spec in runs:  # typos and bad values fail here, not an hour into the sweep
        try:
            plan.run_config(spec)
        except ConfigError as e:
            raise SweepError(f"run {spec.run}: {e}") from None
    return plan


def prepare_data(plan: Plan) -> None:
    """Write the synthetic set and build the synthetic pretrained backbone once, before runs race to (missing or
    stale: :func:`cacnb.pretrain.ensure_pretrained`), and make sure the split lists and test split exist."""
    done = set()
    for spec in plan.runs:
        cfg = plan.run_config(spec)  # paths absolute (load_config), as the trainer sees them
        key = json.dumps([cfg.to_dict()["data"], cfg.model.pretrained], sort_keys=True)
        if key in done:
            continue
        done.add(key)
        try:
            ensure_dataset(cfg)
            lists = split_lists(cfg.data)
            check_split_lists(run_split_lists(lists))  # the trainer's check, before any run starts
        except DatasetError as e:
            raise SweepError(str(e)) from None
        if lists.test is None:
            raise SweepError(f"the sweep reports on the test split, which this dataset lacks: {lists.test_problem}")
        ensure_pretrained(cfg.model.pretrained)  # last: minutes of work, only once every check has passed


# ---------------------------------------------------------------------------------------------------------------
# one run


def _machine() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}


def _row(spec: RunSpec, run_dir: Path, status: str, **values) -> dict:
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
    return _row(spec, run_dir, "ok", **{k: saved.get(k) for k in RESULT_COLUMNS if k in saved})


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

    def env(self) -> dict:
        env = dict(os.environ)
        root = str(NOTEBOOK.parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        # share the cores between side-by-side runs (OpenMP spin-waits make oversubscribed tiny convs crawl),
        # never raising a thread count the caller set
        share = max(1, (os.cpu_count() or 1) // (self.plan.jobs * self.plan.nproc))
        env["OMP_NUM_THREADS"] = str(min(share, int(os.environ.get("OMP_NUM_THREADS") or share)))
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
            return _row(spec, run_dir, "interrupted" if self.stopping else "failed", train_seconds=seconds)
        try:
            with self.eval_lock:
                return self._evaluate(spec, run_dir, seconds)
        except Exception as e:  # a broken checkpoint fails this run, not the sweep
            with open(run_dir / "sweep.log", "a") as log:
                log.write(f"\n[cacnb.sweep] test evaluation failed: {type(e).__name__}: {e}\n")
            return _row(spec, run_dir, "failed", train_seconds=seconds)

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
                consistency = {**measure_run(run, split="test"), "checkpoint": str(ckpt)}
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
        return _row(spec, run_dir, "ok", **values)

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


# ---------------------------------------------------------------------------------------------------------------
# the sweep


def _write_info(plan: Plan, argv: Sequence[str], started: str, wall: float, finished: Optional[str]) -> None:
    path = plan.out / "sweep.json"
    previous = json.loads(path.read_text()).get("wall_seconds", 0.0) if path.is_file() else 0.0
    info = {"command": "python -m cacnb.sweep " + shlex.join(argv), "config": plan.config, "started": started,
            "finished": finished, "wall_seconds": previous + wall, "machine": _machine(),
            "seeds": sorted({r.seed for r in plan.runs}), "split_seeds": plan.split_seeds, "jobs": plan.jobs,
            "nproc": plan.nproc}
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")


def run_sweep(plan: Plan, argv: Sequence[str] = ()) -> int:
    """Run every unfinished run of ``plan``; return the exit code (0, 1 if a run failed, 130 on Ctrl-C)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    started, tic = _now(), time.monotonic()
    rows = {s.run: finished_row(s, plan.out / s.run) or _row(s, plan.out / s.run, "pending") for s in plan.runs}
    todo = [s for s in plan.runs if rows[s.run]["status"] != "ok"]

    def save() -> None:
        write_results_csv(plan.out / "results.csv", [rows[s.run] for s in plan.runs])

    save()
    runner = Runner(plan)
    bar = tqdm(total=len(plan.runs), initial=len(plan.runs) - len(todo), desc="sweep", unit="run",
               dynamic_ncols=True)
    code = 0
    pool = futures.ThreadPoolExecutor(max_workers=plan.jobs)
    pending: dict = {}
    try:
        for spec in todo:
            pending[pool.submit(runner, spec)] = spec
        while pending:
            done, _ = futures.wait(pending, timeout=1.0, return_when=futures.FIRST_COMPLETED)
            for fut in done:
                spec = pending.pop(fut)
                rows[spec.run] = _result_row(fut, spec, plan.out / spec.run)
                bar.update(1)
                bar.write(f"[cacnb.sweep] {spec.run}: {_describe(rows[spec.run])}")
                save()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        bar.write("[cacnb.sweep] interrupted: stopping the running runs (they checkpoint); finished rows are kept")
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        for fut, spec in pending.items():  # runs that finished while we were stopping keep their row
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                row = fut.result()
                # the children got the SIGINT too: a run that died with it was interrupted, not broken
                rows[spec.run] = row if row["status"] == "ok" else {**row, "status": "interrupted"}
        for spec in todo:
            if rows[spec.run]["status"] == "pending":
                rows[spec.run] = {**rows[spec.run], "status": "interrupted"}
        save()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        _write_info(plan, argv, started, time.monotonic() - tic, _now() if code == 0 else None)
        write_results_md(plan.out)
    failed = [r["run"] for r in rows.values() if r["status"] == "failed"]
    if failed:
        print(f"[cacnb.sweep] {len(failed)} run(s) failed: " + ", ".join(f"{r} (log {rows[r]['log']})"
                                                                        for r in failed), file=sys.stderr)
    print(f"[cacnb.sweep] wrote {plan.out / 'results.csv'} and {plan.out / 'results.md'}")
    return code or (EXIT_FAILED if failed else 0)


def _result_row(fut: futures.Future, spec: RunSpec, run_dir: Path) -> dict:
    """The row a run returned; an unexpected error in the sweep's own bookkeeping fails that run, not the sweep."""
    try:
        return fut.result()
    except Exception as e:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "sweep.log", "a") as log:
                log.write(f"\n[cacnb.sweep] the sweep failed to run this: {type(e).__name__}: {e}\n")
        except OSError:
            pass
        return _row(spec, run_dir, "failed")


def _describe(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']} (log {row['log']})"
    test = row.get("test_miou")
    return (f"test mIoU {test:.2f}% (best.pt), {row['test_miou_final']:.2f}% (last.pt)" if test is not None
            else f"test mIoU {row['test_miou_final']:.2f}% (last.pt; no best.pt)")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cacnb.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"a preset ({', '.join(PRESETS)}) or a JSON config")
    p.add_argument("--modes", default="supervised,semi", help=f"comma-separated rows, from {', '.join(MODES)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds (train.seed)")
    p.add_argument("--ablate", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra semi row with this override, repeatable, e.g. --ablate loss.directional=false")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run, repeatable, e.g. --set train.epochs=2")
    p.add_argument("--split-seeds", action="store_true", help="the seed also draws the labeled subset "
                                                              "(data.split_seed)")
    p.add_argument("--nproc", type=int, default=1, help="worker processes (GPUs) per run")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side")
    p.add_argument("--data-dir", default=None, help="shortcut for --set data.data_dir=...")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default: none)")
    p.add_argument("--out", default="runs/sweep", help="the sweep dir (default runs/sweep)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        plan = build_plan(args)
        prepare_data(plan)
    except SweepError as e:
        print(f"cacnb.sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return run_sweep(plan, argv)


if __name__ == "__main__":
    sys.exit(main())
