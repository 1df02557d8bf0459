"""Reading a sweep: intervals over seeds, paired differences, the results tables, the figure, the README paste.

A sweep dir (written by :mod:`cacnb.sweep`) holds ``results.csv`` (one row per run), ``sweep.json`` (command,
date, machine, wall time) and one run dir per run with its ``test.json`` (per-class IoU on the test split of the
best-on-val checkpoint ``best.pt`` and of the final one ``last.pt``, and the consistency metrics of
:mod:`cacnb.consistency` for ``best.pt``).

The statistics live in :mod:`cacnb.stats` (scipy.stats): a Student-t interval over seeds per row, paired
differences on the seed, and a bootstrap interval and a Wilcoxon signed-rank p beside each paired difference.
Every metric gets the same treatment: test mIoU, and the consistency metrics (cross-context agreement, overlap
mIoU, positive and other-class feature similarity and their margin).

``python -m cacnb.results SWEEP_DIR`` rewrites ``SWEEP_DIR/results.md``; ``--readme README.md`` also pastes it
between the README's ``<!-- cacnb-results:begin -->`` and ``<!-- cacnb-results:end -->`` markers
(:mod:`cacnb.readme_block`), so the README's table is always written by this tool, never typed.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from .paths import atomic_write_text
from .readme_block import paste_into_readme
from .stats import LEVEL, Interval, fmt, mean_interval, paired_difference, second_opinion

# the consistency metrics of best.pt on test (cacnb.consistency): agreement and overlap mIoU in percent,
# similarities as cosines
CONSISTENCY_COLUMNS = ("test_agreement", "test_overlap_miou", "test_pos_sim", "test_other_sim", "test_margin")
RESULT_COLUMNS = ("run", "mode", "seed", "overrides", "val_miou", "test_miou", "test_miou_final", "best_iter",
                  "final_iter", *CONSISTENCY_COLUMNS, "train_seconds", "status", "log")
NUMBER_COLUMNS = ("val_miou", "test_miou", "test_miou_final", *CONSISTENCY_COLUMNS, "train_seconds")
# (column, heading, unit) of every metric a study reports per row and compares between rows
METRICS = (("test_miou", "test mIoU", "%"), ("test_agreement", "cross-context agreement", "%"),
           ("test_overlap_miou", "overlap mIoU", "%"), ("test_pos_sim", "positive similarity", "cos"),
           ("test_other_sim", "other-class similarity", "cos"), ("test_margin", "margin", "cos"))
ROW_ORDER = ("supervised", "semi", "full")


# ---------------------------------------------------------------------------------------------------------------
# a sweep's rows


def row_label(mode: str, overrides: str) -> str:
    """``semi``, ``supervised``, ``full``, or an ablation such as ``semi [loss.directional=false]``."""
    return f"{mode} [{overrides}]" if overrides else mode


def read_results(sweep_dir: "str | Path") -> list[dict]:
    """The rows of ``results.csv``, numbers parsed (missing -> NaN / None)."""
    path = Path(sweep_dir) / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python -m cacnb.sweep ... --out {sweep_dir}` first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMBER_COLUMNS:
            row[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
        row["seed"] = int(row["seed"])
        for key in ("best_iter", "final_iter"):
            row[key] = int(row[key]) if row.get(key) not in (None, "") else None
        row["label"] = row_label(row["mode"], row.get("overrides", ""))
    return rows


def write_results_csv(path: "str | Path", rows: Sequence[Mapping]) -> Path:
    """``results.csv`` with :data:`RESULT_COLUMNS`, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in RESULT_COLUMNS})
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def labels_in_order(rows: Sequence[Mapping]) -> list[str]:
    """supervised, semi, full first, then the ablations in the order they appear."""
    seen = list(dict.fromkeys(r["label"] for r in rows))
    return [l for l in ROW_ORDER if l in seen] + [l for l in seen if l not in ROW_ORDER]


def by_seed(rows: Sequence[Mapping], label: str, column: str = "test_miou") -> dict[int, float]:
    """``{seed: value}`` of the finished runs of one row (failed or unfinished runs are left out)."""
    return {r["seed"]: r[column] for r in rows
            if r["label"] == label and r["status"] == "ok" and math.isfinite(r[column])}


def row_summary(rows: Sequence[Mapping], level: float = LEVEL) -> dict[str, dict[str, Interval]]:
    """``{label: {"test": Interval, "test_final": Interval, "val": Interval}}`` over the seeds of each row."""
    return {label: {name: mean_interval(by_seed(rows, label, column).values(), level)
                    for name, column in (("test", "test_miou"), ("test_final", "test_miou_final"),
                                         ("val", "val_miou"))}
            for label in labels_in_order(rows)}


def comparisons(rows: Sequence[Mapping], column: str = "test_miou",
                level: float = LEVEL) -> list[tuple[str, Interval, dict[int, float]]]:
    """Paired differences ``(name, interval, per-seed)``: semi − supervised, full − semi, full − supervised, and
    each ablation − semi (full CAC)."""
    labels = labels_in_order(rows)
    pairs = [(a, b) for a, b in (("semi", "supervised"), ("full", "semi"), ("full", "supervised"))
             if a in labels and b in labels]
    if "semi" in labels:
        pairs += [(l, "semi") for l in labels if l not in ROW_ORDER]
    out = []
    for a, b in pairs:
        interval, diffs = paired_difference(by_seed(rows, a, column), by_seed(rows, b, column), level)
        out.append((f"{a} − {b}", interval, diffs))
    return out


def per_class_iou(sweep_dir: "str | Path", rows: Sequence[Mapping], which: str = "best"
                  ) -> tuple[list[str], dict[str, list[float]]]:
    """Class names and ``{label: per-class test IoU averaged over seeds}`` (``which``: "best" or "final").

    A class absent from a run's test images (NaN there) is averaged over the runs where it is present.
    """
    names: list[str] = []
    sums: dict[str, list[list[float]]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        path = Path(sweep_dir) / row["run"] / "test.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())[which]
        if result is None:
            continue
        names = names or list(result.get("class_names") or range(len(result["iou"])))
        sums.setdefault(row["label"], []).append([math.nan if v is None else float(v) for v in result["iou"]])
    means = {}
    for label in labels_in_order([r for r in rows if r["label"] in sums]):
        columns = list(zip(*sums[label]))
        means[label] = [_nanmean(c) for c in columns]
    return [str(n) for n in names], means


def _nanmean(values: Iterable[float]) -> float:
    xs = [v for v in values if math.isfinite(v)]
    return sum(xs) / len(xs) if xs else math.nan


# ---------------------------------------------------------------------------------------------------------------
# the table, the figure


def _digits(unit: str) -> int:
    return 2 if unit == "%" else 3


def _ci(interval: Interval, signed: bool = False, digits: int = 2) -> str:
    if interval.n < 2:
        return "n/a (1 seed)" if interval.n == 1 else "n/a"
    return f"[{fmt(interval.low, signed, digits)}, {fmt(interval.high, signed, digits)}]"


def _mean_std(interval: Interval, digits: int = 2) -> str:
    if interval.n == 0:
        return "n/a"
    return fmt(interval.mean, digits=digits) + ("" if interval.n < 2 else f" ± {interval.std:.{digits}f}")


def _boot(second, digits: int) -> str:
    if not math.isfinite(second.boot_low):
        return "n/a"
    return f"[{fmt(second.boot_low, True, digits)}, {fmt(second.boot_high, True, digits)}]"


def best_is_last(rows: Sequence[Mapping]) -> tuple[int, int]:
    """(runs whose best val checkpoint is their last iteration, finished runs that know both iterations)."""
    known = [r for r in rows if r["status"] == "ok" and r.get("best_iter") is not None
             and r.get("final_iter") is not None]
    return sum(r["best_iter"] == r["final_iter"] for r in known), len(known)


def summary_table_markdown(rows: Sequence[Mapping], level: float = LEVEL) -> str:
    """Markdown table: one line per row of the study (test mIoU of best.pt, its interval, last.pt, val)."""
    pct = int(round(100 * level))
    lines = [f"| row | seeds | test mIoU (%) mean ± std | {pct} % CI | final test mIoU (%) | val mIoU (%) |",
             "|---|---|---|---|---|---|"]
    for label, s in row_summary(rows, level).items():
        lines.append(f"| {label} | {s['test'].n} | {_mean_std(s['test'])} | {_ci(s['test'])} | "
                     f"{_mean_std(s['test_final'])} | {_mean_std(s['val'])} |")
    return "\n".join(lines)


def comparison_table_markdown(rows: Sequence[Mapping], level: float = LEVEL, column: str = "test_miou",
                              unit: str = "%") -> str:
    """Markdown table of the paired differences of ``column`` (points, or cosine), with the t interval, the
    bootstrap interval, the Wilcoxon p and the per-seed values."""
    pct, digits = int(round(100 * level)), _digits(unit)
    lines = [f"| comparison (paired on seed) | pairs | mean difference | {pct} % t CI | {pct} % bootstrap CI | "
             f"Wilcoxon p | per seed |", "|---|---|---|---|---|---|---|"]
    for name, interval, diffs in comparisons(rows, column, level):
        second = second_opinion(diffs.values(), level)
        per_seed = ", ".join(f"s{s}: {d:+.{digits}f}" for s, d in diffs.items()) or "n/a"
        lines.append(f"| {name} | {interval.n} | {fmt(interval.mean, True, digits)} | "
                     f"{_ci(interval, True, digits)} | {_boot(second, digits)} | "
                     f"{fmt(second.wilcoxon_p, digits=3)} | {per_seed} |")
    return "\n".join(lines)


def consistency_table_markdown(rows: Sequence[Mapping], level: float = LEVEL) -> str:
    """Markdown table: per row, mean ± std over seeds of every consistency metric (test, best.pt)."""
    metrics = METRICS[1:]
    lines = ["| row | seeds | " + " | ".join(f"{name} ({unit})" for _, name, unit in metrics) + " |",
             "|---" * (len(metrics) + 2) + "|"]
    for label in labels_in_order(rows):
        cells = [mean_interval(by_seed(rows, label, column).values(), level) for column, _, _ in metrics]
        lines.append(f"| {label} | {max(c.n for c in cells)} | "
                     + " | ".join(_mean_std(c, _digits(unit)) for c, (_, _, unit) in zip(cells, metrics)) + " |")
    return "\n".join(lines)


def metric_differences_markdown(rows: Sequence[Mapping], level: float = LEVEL, a: str = "semi",
                                b: str = "supervised") -> str:
    """Markdown table: the paired difference ``a − b`` of every metric, with its t and bootstrap intervals."""
    pct = int(round(100 * level))
    lines = [f"| metric ({a} − {b}, paired on seed) | pairs | mean difference | {pct} % t CI | "
             f"{pct} % bootstrap CI | Wilcoxon p |", "|---|---|---|---|---|---|"]
    for column, name, unit in METRICS:
        interval, diffs = paired_difference(by_seed(rows, a, column), by_seed(rows, b, column), level)
        second, digits = second_opinion(diffs.values(), level), _digits(unit)
        lines.append(f"| {name} ({unit}) | {interval.n} | {fmt(interval.mean, True, digits)} | "
                     f"{_ci(interval, True, digits)} | {_boot(second, digits)} | {fmt(second.wilcoxon_p, digits=3)} |")
    return "\n".join(lines)


def ablation_differences_markdown(rows: Sequence[Mapping], level: float = LEVEL) -> str:
    """Markdown table: each ablation − semi (full CAC), paired on seed, every metric as ``mean [t interval]``;
    empty when the study has no ablation row."""
    labels = labels_in_order(rows)
    ablations = [label for label in labels if label not in ROW_ORDER] if "semi" in labels else []
    lines = ["| comparison (paired on seed) | pairs | " + " | ".join(f"{name} ({unit})" for _, name, unit in METRICS)
             + " |", "|---" * (len(METRICS) + 2) + "|"]
    for label in ablations:
        cells = [paired_difference(by_seed(rows, label, column), by_seed(rows, "semi", column), level)[0]
                 for column, _, _ in METRICS]
        lines.append(f"| {label} − semi | {max(c.n for c in cells)} | " + " | ".join(
            f"{fmt(c.mean, True, _digits(unit))} {_ci(c, True, _digits(unit))}" if c.n else "n/a"
            for c, (_, _, unit) in zip(cells, METRICS)) + " |")
    return "\n".join(lines) if ablations else ""


def per_class_table_markdown(sweep_dir: "str | Path", rows: Sequence[Mapping]) -> str:
    names, means = per_class_iou(sweep_dir, rows)
    if not means:
        return "(no finished run with a test.json)"
    labels = list(means)
    lines = ["| class | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(fmt(100 * means[l][i]) for l in labels) + " |")
    return "\n".join(lines)


def plot_seeds(rows: Sequence[Mapping], column: str = "test_miou", level: float = LEVEL, ax=None):
    """Each seed as a point per row, and the mean with its t interval as an error bar. Returns the figure."""
    import matplotlib.pyplot as plt  # lazy: the sweep CLI and the README paste need no plotting backend

    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 + 1.3 * max(1, len(labels_in_order(rows))), 3.6))
    for x, label in enumerate(labels_in_order(rows)):
        values = by_seed(rows, label, column)
        offsets = [0.12 * (k - (len(values) - 1) / 2) / max(1, len(values)) for k in range(len(values))]
        ax.scatter([x - 0.15 + o for o in offsets], list(values.values()), s=18, color="0.45", zorder=2,
                   label="one seed" if x == 0 else None)
        interval = mean_interval(values.values(), level)
        if interval.n:
            err = [[interval.mean - interval.low], [interval.high - interval.mean]] if interval.n > 1 else None
            ax.errorbar([x + 0.1], [interval.mean], yerr=err, fmt="o", color="C0", capsize=4, zorder=3,
                        label=f"mean, {int(round(100 * level))} % t interval" if x == 0 else None)
    ax.set_xticks(range(len(labels_in_order(rows))), labels_in_order(rows), rotation=15, ha="right")
    ax.set_ylabel("test mIoU (%)" if column.startswith("test") else "val mIoU (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


# ---------------------------------------------------------------------------------------------------------------
# results.md and the README


def read_sweep_info(sweep_dir: "str | Path") -> dict:
    path = Path(sweep_dir) / "sweep.json"
    return json.loads(path.read_text()) if path.is_file() else {}


CONSISTENCY_NOTE = (
    "For every test image, 2 overlapping crop pairs from the training pair sampler (two windows, photometric "
    "augmentation off, seeded per image; every row on the pairs of the study's base config): **agreement** is the "
    "share of labeled overlap pixels where the two crops' predictions agree, **overlap mIoU** the mIoU of those "
    "predictions on the overlap; at the stride-8 overlap cells, **positive similarity** is the cosine of the two "
    "crops' L2-normalised decoder features (the projector's input) at the same cell, **other-class similarity** the"
    " mean cosine to the other crop's cells of another ground-truth class, and **margin** their difference "
    "(`cacnb.consistency`).")


def results_markdown(sweep_dir: "str | Path", level: float = LEVEL) -> str:
    """The whole ``results.md``: how it was made, the table, the paired differences, per-class IoU."""
    sweep_dir = Path(sweep_dir)
    rows = read_results(sweep_dir)
    info = read_sweep_info(sweep_dir)
    seeds = sorted({r["seed"] for r in rows})
    machine = info.get("machine", {})
    failed = [r["run"] for r in rows if r["status"] != "ok"]
    wall = info.get("wall_seconds")
    pct = int(round(100 * level))
    last, known = best_is_last(rows)
    ablations = ablation_differences_markdown(rows, level)
    head = [
        f"**Study** `{info.get('config', '?')}`: {len(seeds)} seed(s) planned per row "
        f"({', '.join(map(str, seeds))}; the table's seeds column counts the finished ones); "
        f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} runs finished"
        + (f" (not finished: {', '.join(failed)})" if failed else "") + ".",
        "",
        f"- Command: `{info.get('command', '?')}`",
        f"- Date: {info.get('finished') or info.get('started', '?')}; wall time "
        + (f"{wall / 60:.1f} min" if wall is not None else "?") + " (all invocations of this sweep)",
        f"- Machine: {machine.get('platform', '?')}, {machine.get('cpu_count', '?')} CPU cores, torch "
        f"{machine.get('torch', '?')}, device {machine.get('device', '?')}",
        f"- Interval: {pct} % Student-t over seeds (mean ± t·s/√n); differences are paired on the seed, with a "
        f"BCa bootstrap interval and an exact Wilcoxon signed-rank p beside them (scipy.stats"
        + (f"; with {len(seeds)} pairs the smallest possible two-sided Wilcoxon p is {2.0 ** (1 - len(seeds)):.4g}"
           if len(seeds) > 1 else "") + "). Every metric is measured on the test split with the "
        "best-on-val checkpoint (`best.pt`); \"final\" is the last checkpoint (`last.pt`). Val only selects; "
        "nothing is chosen on test.",
        f"- Convergence: the best val checkpoint is the last iteration in {last} of {known} runs.",
    ]
    return "\n".join([
        "# Sweep results", "", "<!-- written by `python -m cacnb.results`; do not edit by hand -->", "",
        *head, "", "## Test mIoU per row", "", summary_table_markdown(rows, level), "",
        "## Paired differences (test mIoU, points)", "", comparison_table_markdown(rows, level), "",
        "## What CAC does to context: consistency on test (best.pt)", "", CONSISTENCY_NOTE, "",
        consistency_table_markdown(rows, level), "",
        "## Every metric, semi − supervised", "", metric_differences_markdown(rows, level), "",
        *(["## Every metric, each ablation − semi", "", ablations, ""] if ablations else []),
        "## Per-class test IoU (%), mean over seeds (best.pt)", "", per_class_table_markdown(sweep_dir, rows), "",
    ])


def write_results_md(sweep_dir: "str | Path", level: float = LEVEL) -> Path:
    path = Path(sweep_dir) / "results.md"
    atomic_write_text(path, results_markdown(sweep_dir, level))
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cacnb.results",
                                description="Rewrite a sweep's results.md (and optionally paste it into a README).")
    p.add_argument("sweep_dir", help="the --out folder of `python -m cacnb.sweep`")
    p.add_argument("--readme", default=None, help="also paste the table into this README between its markers")
    p.add_argument("--block", default=None, help="paste into the named block (<!-- cacnb-results:NAME:begin -->) "
                                                 "instead of the study's, e.g. --block demo")
    args = p.parse_args(argv)
    try:
        path = write_results_md(args.sweep_dir)
        print(f"wrote {path}")
        if args.readme:
            print(f"pasted into {paste_into_readme(path, args.readme, args.block)}")
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"cacnb.results: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
