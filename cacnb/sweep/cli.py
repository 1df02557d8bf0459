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

This module holds the command line and the sweep loop; :mod:`cacnb.sweep.plan` the runs, :mod:`cacnb.sweep.runner`
one run.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..config import MODES, PRESETS
from ..paths import atomic_write_text
from ..results import write_results_csv, write_results_md
from .plan import Plan, RunSpec, SweepError, build_plan, prepare_data
from .runner import Runner, finished_row, status_row

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _machine() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}



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
    rows = {s.run: finished_row(s, plan.out / s.run) or status_row(s, plan.out / s.run, "pending")
            for s in plan.runs}
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
        return status_row(spec, run_dir, "failed")


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
