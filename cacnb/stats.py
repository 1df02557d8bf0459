"""Intervals over seeds, with scipy.stats: the Student-t interval, and a bootstrap interval and a Wilcoxon
signed-rank test as second opinions on a paired difference.

* a row's metric over its ``n`` seeds: mean ``x̄``, sample std ``s`` (``n - 1`` in the denominator) and the
  interval ``x̄ ± t_{(1+level)/2, n-1} · s / √n``;
* a comparison ``A − B`` is paired on the seed: ``d_k = A_k − B_k`` for every seed both rows finished, then the
  same interval on the ``d_k``. Pairing removes what a seed shares between rows (split, init, data order);
* second opinions on the ``d_k``, which assume less than normality: the BCa bootstrap interval of their mean
  (``scipy.stats.bootstrap``, 9,999 resamples, a fixed seed so the table is reproducible) and the exact two-sided
  Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``). With few seeds both are coarse: with 5 pairs the
  smallest Wilcoxon p is 0.0625, so it can never fall below 0.05, and a bootstrap over 5 values is too narrow
  rather than too wide. The t interval stays the headline; the others are shown beside it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. ``t_quantile(0.975, 2) = 4.303``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    return float(sps.t.ppf(p, df))


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
    mean = float(np.mean(xs))
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan, level)
    std = float(np.std(xs, ddof=1))
    half = t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half, level)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      level: float = LEVEL) -> tuple[Interval, dict[int, float]]:
    """The interval of ``a[s] − b[s]`` over the seeds ``s`` both have, and those per-seed differences."""
    diffs = {s: a[s] - b[s] for s in sorted(set(a) & set(b))}
    return mean_interval(diffs.values(), level), diffs


@dataclass(frozen=True)
class SecondOpinion:
    """The bootstrap interval of the mean difference and the Wilcoxon signed-rank p (NaN where undefined)."""
    boot_low: float
    boot_high: float
    wilcoxon_p: float


def second_opinion(diffs: Iterable[float], level: float = LEVEL) -> SecondOpinion:
    """:class:`SecondOpinion` of paired differences (needs at least 3 non-identical values for the bootstrap and
    one non-zero value for Wilcoxon; else NaN)."""
    d = np.asarray([float(v) for v in diffs], dtype=np.float64)
    low = high = p = math.nan
    if len(d) >= 3 and np.ptp(d) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # BCa's jackknife warns on tiny samples
            res = sps.bootstrap((d,), np.mean, confidence_level=level, n_resamples=BOOTSTRAP_RESAMPLES,
                                method="BCa", random_state=np.random.default_rng(BOOTSTRAP_SEED))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if len(d) and np.any(d != 0):
        p = float(sps.wilcoxon(d, alternative="two-sided", method="exact" if len(d) <= 25 else "auto").pvalue)
    return SecondOpinion(low, high, p)


def fmt(value: Optional[float], signed: bool = False, digits: int = 2) -> str:
    """A number for a table (``n/a`` for None or NaN)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
