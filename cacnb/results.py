"""Reading a sweep: intervals over seeds, paired differences, the results table, the figure, the README paste.

A sweep dir (written by :mod:`cacnb.sweep`) holds ``results.csv`` (one row per run), ``sweep.json`` (command,
date, machine, wall time) and one run dir per run with its ``test.json`` (per-class IoU on the test split of the
best-on-val checkpoint ``best.pt`` and of the final one ``last.pt``).

Statistics (the interval is a Student-t interval over seeds; no bootstrap):

* a row's test mIoU over its ``n`` seeds: mean ``x̄``, sample std ``s`` (``n - 1`` in the denominator) and the
  95 % interval ``x̄ ± t_{0.975, n-1} · s / √n``;
* a comparison ``A − B`` is paired on the seed: ``d_k = A_k − B_k`` for every seed both rows finished, then the
  same interval on the ``d_k``. Pairing removes what a seed shares between rows (split, init, data order).

``t_quantile`` is computed here (scipy is not a dependency): the t CDF through the regularised incomplete beta
function ``F(t) = 1 − I_{ν/(ν+t²)}(ν/2, 1/2) / 2`` for ``t > 0``, evaluated by its continued fraction, and
inverted by bisection.

``python -m cacnb.results SWEEP_DIR`` rewrites ``SWEEP_DIR/results.md``; ``--readme README.md`` also pastes it
between the README's ``<!-- cacnb-results:begin -->`` and ``<!-- cacnb-results:end -->`` markers, so the
README's table is always written by this tool, never typed.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from .paths import atomic_write_text

RESULT_COLUMNS = ("run", "mode", "seed", "overrides", "val_miou", "test_miou", "test_miou_final", "best_iter",
                  "train_seconds", "status", "log")
ROW_ORDER = ("supervised", "semi", "full")
README_BEGIN = "<!-- cacnb-results:begin -->"
README_END = "<!-- cacnb-results:end -->"


def readme_markers(block: Optional[str] = None) -> tuple[str, str]:
    """The marker lines of a README block: the study's (``block=None``) or a named one, e.g. ``demo``."""
    if block is None:
        return README_BEGIN, README_END
    return f"<!-- cacnb-results:{block}:begin -->", f"<!-- cacnb-results:{block}:end -->"
LEVEL = 0.95


# ---------------------------------------------------------------------------------------------------------------
# Student t


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz evaluation)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),             # even step
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry on the other
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. ``t_quantile(0.975, 2) = 4.303``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # bisection: t_cdf is monotone
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """Mean, sample std and the two-sided t interval of ``n`` values (``low``/``high`` NaN when ``n < 2``)."""
    n: int
    mean: float
    std: float
    low: float
    high: float
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def mean_interval(values: Iterable[float], level: float = LEVEL) -> Interval:
    """``x̄ ± t_{(1+level)/2, n-1} · s / √n`` over ``values`` (non-finite values are an error)."""
    xs = [float(v) for v in values]
    if any(not math.isfinite(v) for v in xs):
        raise ValueError(f"the values must be finite, got {xs}")
    n = len(xs)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan, level)
    mean = sum(xs) / n
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan, level)
    std = math.sqrt(sum((v - mean) ** 2 for v in xs) / (n - 1))
    half = t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half, level)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      level: float = LEVEL) -> tuple[Interval, dict[int, float]]:
    """The interval of ``a[s] − b[s]`` over the seeds ``s`` both have, and those per-seed differences."""
    diffs = {s: a[s] - b[s] for s in sorted(set(a) & set(b))}
    return mean_interval(diffs.values(), level), diffs


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
        for key in ("val_miou", "test_miou", "test_miou_final", "train_seconds"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
        row["seed"] = int(row["seed"])
        row["best_iter"] = int(row["best_iter"]) if row.get("best_iter") not in (None, "") else None
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


def _pct(v: float, signed: bool = False) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _ci(interval: Interval, signed: bool = False) -> str:
    if interval.n < 2:
        return "n/a (1 seed)" if interval.n == 1 else "n/a"
    return f"[{_pct(interval.low, signed)}, {_pct(interval.high, signed)}]"


def _mean_std(interval: Interval) -> str:
    if interval.n == 0:
        return "n/a"
    return _pct(interval.mean) + ("" if interval.n < 2 else f" ± {interval.std:.2f}")


def summary_table_markdown(rows: Sequence[Mapping], level: float = LEVEL) -> str:
    """Markdown table: one line per row of the study (test mIoU of best.pt, its interval, last.pt, val)."""
    pct = int(round(100 * level))
    lines = [f"| row | seeds | test mIoU (%) mean ± std | {pct} % CI | final test mIoU (%) | val mIoU (%) |",
             "|---|---|---|---|---|---|"]
    for label, s in row_summary(rows, level).items():
        lines.append(f"| {label} | {s['test'].n} | {_mean_std(s['test'])} | {_ci(s['test'])} | "
                     f"{_mean_std(s['test_final'])} | {_mean_std(s['val'])} |")
    return "\n".join(lines)


def comparison_table_markdown(rows: Sequence[Mapping], level: float = LEVEL) -> str:
    """Markdown table of the paired differences (points of test mIoU), with per-seed values."""
    pct = int(round(100 * level))
    lines = [f"| comparison (paired on seed) | pairs | mean difference (points) | {pct} % CI | per seed |",
             "|---|---|---|---|---|"]
    for name, interval, diffs in comparisons(rows, level=level):
        per_seed = ", ".join(f"s{s}: {d:+.2f}" for s, d in diffs.items()) or "n/a"
        lines.append(f"| {name} | {interval.n} | {_pct(interval.mean, True)} | {_ci(interval, True)} | "
                     f"{per_seed} |")
    return "\n".join(lines)


def per_class_table_markdown(sweep_dir: "str | Path", rows: Sequence[Mapping]) -> str:
    names, means = per_class_iou(sweep_dir, rows)
    if not means:
        return "(no finished run with a test.json)"
    labels = list(means)
    lines = ["| class | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(_pct(100 * means[l][i]) for l in labels) + " |")
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
        f"- Interval: {pct} % Student-t over seeds (mean ± t·s/√n); differences are paired on the seed. "
        f"Test mIoU is measured on the test split with the best-on-val checkpoint (`best.pt`); \"final\" is "
        f"the last checkpoint (`last.pt`). Val only selects; nothing is chosen on test.",
    ]
    return "\n".join([
        "# Sweep results", "", "<!-- written by `python -m cacnb.results`; do not edit by hand -->", "",
        *head, "", "## Test mIoU per row", "", summary_table_markdown(rows, level), "",
        "## Paired differences", "", comparison_table_markdown(rows, level), "",
        "## Per-class test IoU (%), mean over seeds (best.pt)", "", per_class_table_markdown(sweep_dir, rows), "",
    ])


def write_results_md(sweep_dir: "str | Path", level: float = LEVEL) -> Path:
    path = Path(sweep_dir) / "results.md"
    atomic_write_text(path, results_markdown(sweep_dir, level))
    return path


def paste_into_readme(results_md: "str | Path", readme: "str | Path", block: Optional[str] = None) -> Path:
    """Replace what lies between the README's result markers (:func:`readme_markers` of ``block``) by
    ``results.md`` (its title dropped, its ``##`` headings made ``####`` to sit under the README's own section),
    atomically. A README without both markers is an error naming them."""
    readme = Path(readme)
    text = readme.read_text()
    first, last = readme_markers(block)
    begin, end = text.find(first), text.find(last)
    if begin < 0 or end < begin:
        raise ValueError(f"{readme} has no '{first}' ... '{last}' block; add both marker lines where "
                         f"the results table belongs")
    body = Path(results_md).read_text().splitlines()
    body = [("##" + line if line.startswith("## ") else line) for line in body if not line.startswith("# ")]
    block = first + "\n" + "\n".join(body).strip("\n") + "\n"
    atomic_write_text(readme, text[:begin] + block + text[end:])
    return readme


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
