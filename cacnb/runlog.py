"""What a run leaves in its run dir, and how notebooks read it back.

- ``config.json``: the full config.
- ``env.json``: versions, git commit, devices, world size.
- ``metrics.jsonl``: one JSON object per line, ``{"kind": "train", ...}`` every log step and
  ``{"kind": "val", ...}`` after every validation. Only rank 0 writes. This file is the source of truth.
- ``tb/``: with ``train.tensorboard=true`` (``pip install cacnb[tensorboard]``) the same scalars as TensorBoard
  events, for users who watch runs there (:class:`ScalarWriter`).
"""
from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch
import torchvision

from . import __version__, style
from .config import ConfigError
from .paths import atomic_write_text, storage_error


def environment(world_size: int) -> dict:
    """Versions, git commit, devices and world size, for ``env.json``."""
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if torch.cuda.is_available() else [f"cpu ({os.cpu_count()} cores)"])
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cacnb": __version__,
        "git_commit": git_commit(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "devices": devices,
        "world_size": world_size,
        "argv": sys.argv,
    }


def git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _clean(value):
    """JSON-safe: tensors to Python numbers, NaN to None (strict JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsLog:
    """Append-only ``metrics.jsonl`` writer; each line is flushed so a crash loses at most the line in flight."""

    def __init__(self, path: "str | os.PathLike", enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(_clean(record)) + "\n")
                f.flush()
        except OSError as e:  # a full disk or a file system gone read-only: one line naming the file
            raise storage_error(self.path, e) from e

    def truncate_after(self, iteration: int, drop_val_at_end: bool = False) -> None:
        """On resume, drop lines logged after the checkpoint so the log matches the restored state, and any
        repeated (kind, iter) line. ``drop_val_at_end``: the val line at ``iteration`` goes too (that validation
        runs again after the resume)."""
        if not self.enabled or not self.path.exists():
            return
        keep, seen = [], set()
        for r in read_metrics(self.path):
            key = (r.get("kind"), r.get("iter", 0))
            late = r.get("iter", 0) > iteration or (drop_val_at_end and key == ("val", iteration))
            if late or key[0] == "final" or key in seen:
                continue
            seen.add(key)
            keep.append(r)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


class ScalarWriter:
    """TensorBoard copy of the numeric fields of every ``metrics.jsonl`` record (``train/<key>``, ``val/<key>``).

    Off (a no-op) unless ``enabled``; enabled without TensorBoard installed, it raises a ConfigError that says
    how to install it. ``start`` (the resumed iteration) purges events a crashed run logged past its checkpoint,
    as :meth:`MetricsLog.truncate_after` does for the JSON lines."""

    def __init__(self, run_dir: "str | os.PathLike", enabled: bool = False, start: int = 0):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # lazy: the optional extra may be absent
        except ImportError:
            raise ConfigError("train.tensorboard=true needs TensorBoard: pip install 'cacnb[tensorboard]' "
                              "(or set train.tensorboard=false; metrics.jsonl is written either way)") from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start + 1 if start else None)

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        kind = record.get("kind", "train")
        for key, value in record.items():
            if key not in ("iter", "kind", "epoch") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, record.get("iter", 0))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: "str | os.PathLike") -> list[dict]:
    """All records of a ``metrics.jsonl`` (or of the one in a run dir); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: has the run started? Run notebook 03 or "
                                f"`python -m cacnb.train` first")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def split_kinds(records: Iterable[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r.get("kind", "train"), []).append(r)
    return out


def best_of(records: Iterable[dict]) -> Optional[dict]:
    """The validation record with the highest mIoU among ``records``, or None."""
    vals = [v for v in split_kinds(records).get("val", []) if v.get("miou") is not None]
    return max(vals, key=lambda v: v["miou"]) if vals else None


def last_iteration(records: Iterable[dict]) -> Optional[int]:
    """The last iteration a run's records reach (its ``final`` line, else its last train line), or None."""
    iters = [r["iter"] for r in records if r.get("kind", "train") in ("train", "final") and "iter" in r]
    return max(iters) if iters else None


def best_val(run_dir: "str | os.PathLike") -> Optional[dict]:
    """The validation record of a run dir's ``metrics.jsonl`` with the highest mIoU, or None."""
    return best_of(read_metrics(run_dir))


def plot_curves(run_dirs: "dict[str, str | os.PathLike] | str | os.PathLike", figsize=(18, 3.8)):
    """Losses, lr, fraction of positives kept, validation mIoU and the pseudo-labels' accuracy against the hidden
    labels (CAC runs on a labeled set; a diagnostic only) of one or several runs, side by side, all on
    whole training iterations (each validation sits at the iteration that ended its epoch)."""
    import matplotlib.pyplot as plt  # lazy, as everywhere in cacnb: importing cacnb must not load matplotlib
    from matplotlib.ticker import MaxNLocator

    if not isinstance(run_dirs, dict):
        run_dirs = {Path(run_dirs).name: run_dirs}
    fig, axes = plt.subplots(1, 5, figsize=figsize, layout="constrained", sharex=True)
    for label, run_dir in run_dirs.items():
        kinds = split_kinds(read_metrics(run_dir))
        _plot_train(axes[:3], kinds.get("train", []), label)
        _plot_pseudo_labels(axes[4], kinds.get("train", []), label)
        vals = kinds.get("val", [])
        if vals:
            axes[3].plot([int(v["iter"]) for v in vals], [100 * (v["miou"] or 0) for v in vals], "o-", label=label)
    titles = ("loss terms", "learning rate (head)", "overlap positions pulled (%)", "val mIoU (%)",
              "pseudo-label accuracy (%)")
    axes[0].set_xlim(left=0)  # shared: every panel spans iteration 0 to the last one, so ticks stay whole numbers
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        style.legend(ax, fontsize=7)
    return style.finish(fig)


def _plot_pseudo_labels(ax, rows: list[dict], label: str) -> None:
    """The diagnostic of :func:`cacnb.loss.pseudo_label_stats` (hidden labels; never used for training): the
    pseudo-labels at the overlap, and at the positions the directional mask selects (the side pulled towards)."""
    for key, line, what in (("pl_acc_overlap", "-", "overlap"), ("pl_acc_selected", "--", "selected")):
        points = [(int(r["iter"]), 100 * r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), line, label=f"{label}: {what}")


def _plot_train(axes, rows: list[dict], label: str) -> None:
    if not rows:
        return
    it = [int(r["iter"]) for r in rows]
    for key, line in (("loss_sup", "-"), ("loss_unsup", "--")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            axes[0].plot(it, [float("nan") if y is None else y for y in ys], line, label=f"{label}: {key}")
    axes[1].plot(it, [r.get("lr", float("nan")) for r in rows], label=label)
    for k, key in enumerate(("frac_pos_a", "frac_pos_b")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            axes[2].plot(it, [float("nan") if y is None else 100 * y for y in ys], ("-", "--")[k],
                         label=f"{label}: {style.pull(k)}")
