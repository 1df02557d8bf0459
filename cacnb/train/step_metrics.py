"""The training log's bookkeeping between two log lines: device-side sums of every logged value, the per-step
NaN/Inf codes, and the time the steps took. A step never waits for the host; :meth:`TrainMetrics.read` fetches
the whole interval with one all-reduce and one host read."""
from __future__ import annotations

import time
from typing import Optional

import torch

from .. import dist
from ..loss import RATIO_STATS


class Stopwatch:
    """Seconds spent between ``start()`` and ``stop()``, summed over the calls (``stop()`` when stopped: no-op)."""

    def __init__(self):
        self.seconds = 0.0
        self._since: Optional[float] = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None


class TrainMetrics:
    """The steps since the last train log line, kept on the device so that a step never waits for the host: sums
    of every logged value, and per step which loss term was first NaN/Inf (if any). :meth:`read` fetches it all
    with one all-reduce and one host read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.clock = Stopwatch()  # time spent in these steps (their data loading included)
        self.first_iteration: Optional[int] = None
        self.bad_codes: list[torch.Tensor] = []     # per step: 1 + index of its first non-finite term, 0 if none
        self.term_names: list[tuple[str, ...]] = []  # per step: the names those indices refer to

    def __len__(self) -> int:
        return len(self.bad_codes)

    def _scalar(self, value: torch.Tensor) -> torch.Tensor:
        return value.detach().reshape(()).to(self.device, torch.float64, non_blocking=True)

    def _value(self, value: torch.Tensor) -> torch.Tensor:
        """A logged statistic: a scalar, or a vector such as a per-class count (kept as it is)."""
        return value.detach().to(self.device, torch.float64, non_blocking=True)

    def add(self, iteration: int, result, images: int) -> None:
        if self.first_iteration is None:
            self.first_iteration = iteration
        checked = result.checked_terms()
        bad = ~torch.isfinite(torch.stack([self._scalar(v) for v in checked.values()]))
        self.bad_codes.append(torch.where(bad.any(), bad.long().argmax() + 1, 0))  # argmax: the first True
        self.term_names.append(tuple(checked))
        for name, value in {**checked, **result.stats}.items():
            value = self._scalar(value) if name in checked else self._value(value)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.images += images

    def read(self, stop_requested: bool) -> tuple[dict[str, float], Optional[tuple[int, Optional[str]]], bool]:
        """``(means over steps and ranks, first non-finite (iteration, term) or None, whether any rank asked to
        stop)``. Every rank must call it; the term is None when only another rank's loss went bad."""
        keys = sorted(self.sums)
        parts = [(self.sums[key] / self.counts[key]).reshape(-1) for key in keys]    # scalars and vectors, flat
        means = torch.cat(parts)
        codes = torch.stack(self.bad_codes).to(torch.float64)
        shared = dist.all_reduce_sum(torch.cat([means, (codes > 0).to(torch.float64),
                                                means.new_full((1,), float(stop_requested))]))
        values = torch.cat([shared, codes]).tolist()  # the one read
        k, n = len(means), len(codes)
        world = dist.get_world_size()
        mean_values, start = {}, 0
        for key, part in zip(keys, parts):
            chunk = [v / world for v in values[start:start + len(part)]]
            mean_values[key] = chunk if self.sums[key].dim() else chunk[0]
            start += len(part)
        return with_ratios(mean_values), self._first_bad(values[k:k + n], values[k + n + 1:]), values[k + n] > 0

    def first_nonfinite(self) -> Optional[tuple[int, Optional[str]]]:
        """Only the NaN/Inf check of :meth:`read` (before a checkpoint). Every rank must call it."""
        codes = torch.stack(self.bad_codes).to(torch.float64)
        values = torch.cat([dist.all_reduce_sum((codes > 0).to(torch.float64)), codes]).tolist()
        return self._first_bad(values[:len(codes)], values[len(codes):])

    def _first_bad(self, any_rank: list, here: list) -> Optional[tuple[int, Optional[str]]]:
        for step, (flag, code) in enumerate(zip(any_rank, here)):
            if flag > 0:
                term = self.term_names[step][int(code) - 1] if code > 0 else None
                return self.first_iteration + step, term
        return None


def with_ratios(means: dict) -> dict:
    """``means`` with each :data:`cacnb.loss.RATIO_STATS` entry replaced by its ratio (None where nothing was
    counted; element-wise for per-class vectors). Means of sums over the same steps, so the ratio is the ratio of
    the interval's sums. The denominators stay (the mean count per step); the numerators go."""
    out = dict(means)
    for name, (num, den) in RATIO_STATS.items():
        if num not in out or den not in out:
            continue
        top, bottom = out.pop(num), out[den]
        if isinstance(top, list):
            out[name] = [a / b if b > 0 else None for a, b in zip(top, bottom)]
        else:
            out[name] = top / bottom if bottom > 0 else None
    return out
