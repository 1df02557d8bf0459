"""Where a sweep run's time and disk go: the breakdown of every run of a sweep dir, averaged per row.

    python benchmarks/bench_run.py runs/sweep            # a finished (or partly finished) sweep
    python benchmarks/bench_run.py runs/sweep --runs     # also one line per run

Per run, from what the run wrote (nothing is re-run):

* ``papermill``: notebook 03 executed by papermill, the sweep's measured wall time for the run. Of it, from the
  trainer's ``final`` line of ``metrics.jsonl`` (``seconds``): ``setup`` (checks, lock, dataset open and the
  first samples read, model and pretrained weights, resume), ``data`` (waiting for the loaders' batches),
  ``compute`` (forward, backward, SGD), ``validation``, ``checkpoint last.pt`` / ``best.pt`` writes; the rest
  (``kernel + imports + other``) is the papermill kernel start, imports, the launcher and the notebook's plots.
* after papermill, from ``test.json`` (``seconds``): the test evaluation of ``best.pt`` and of ``last.pt`` (the
  latter only when it is not best.pt's iteration) and the consistency metrics.
* disk: the run dir's checkpoints.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

TRAINER_PHASES = ("setup", "data", "compute", "validation", "checkpoint last.pt", "checkpoint best.pt")
AFTER_PHASES = ("test best.pt", "test last.pt", "consistency")


def run_breakdown(run_dir: Path) -> dict | None:
    """The seconds of one finished run by phase, and its checkpoint bytes; None when it is not finished."""
    test, metrics = run_dir / "test.json", run_dir / "metrics.jsonl"
    if not test.is_file() or not metrics.is_file():
        return None
    after = json.loads(test.read_text()).get("seconds") or {}
    finals = [json.loads(line) for line in metrics.read_text().splitlines() if '"kind": "final"' in line]
    trainer: dict[str, float] = {}
    for final in finals:  # every invocation (a resumed run has several) adds its own
        for phase, value in (final.get("seconds") or {}).items():
            trainer[phase] = trainer.get(phase, 0.0) + value
    if "papermill" not in after or not trainer:
        return None  # written before the timings existed
    out = {phase: trainer.get(phase, 0.0) for phase in TRAINER_PHASES}
    out["kernel + imports + other"] = after["papermill"] - sum(trainer.values())
    out["papermill"] = after["papermill"]
    out.update({phase: after.get(phase, 0.0) for phase in AFTER_PHASES})
    out["total"] = after["papermill"] + sum(after.get(phase, 0.0) for phase in AFTER_PHASES)
    out["checkpoint MB"] = sum(p.stat().st_size for p in run_dir.glob("*.pt")) / 1e6
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("--runs", action="store_true", help="also print every run")
    args = p.parse_args(argv)
    sweep = Path(args.sweep_dir)
    rows = {d.name: b for d in sorted(sweep.iterdir()) if d.is_dir() and (b := run_breakdown(d)) is not None}
    if not rows:
        print(f"{sweep}: no finished run with timings (test.json 'seconds' and metrics.jsonl 'final' seconds)",
              file=sys.stderr)
        return 2
    columns = [*TRAINER_PHASES, "kernel + imports + other", "papermill", *AFTER_PHASES, "total", "checkpoint MB"]
    groups: dict[str, list[dict]] = {}
    for name, b in rows.items():
        groups.setdefault(name.rsplit("_s", 1)[0], []).append(b)
    print(f"{sweep}: {len(rows)} finished runs; seconds per run (mean over the row's runs), checkpoint MB per run")
    print("| phase | " + " | ".join(f"{g} ({len(v)})" for g, v in groups.items()) + " |")
    print("|---" * (len(groups) + 1) + "|")
    for column in columns:
        print(f"| {column} | " + " | ".join(f"{statistics.mean(b[column] for b in v):.1f}"
                                           for v in groups.values()) + " |")
    if args.runs:
        for name, b in rows.items():
            print(name, {k: round(v, 1) for k, v in b.items()})
    wall = json.loads((sweep / "sweep.json").read_text()).get("wall_seconds") if (sweep / "sweep.json").is_file() \
        else None
    if wall is not None:
        print(f"sweep wall time {wall / 60:.1f} min; sum of run totals {sum(b['total'] for b in rows.values()) / 60:.1f}"
              f" min (runs side by side overlap)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
