"""The plan of a sweep: its runs (one per row and seed), each run's config, checked before anything is written,
and the data every run needs, prepared once before the runs race to it."""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

from ..config import MODES, PRESETS, Config, ConfigError, load_config, parse_overrides
from ..data.errors import DatasetError
from ..data.splits import split_lists
from ..data.validate import check_split_lists, run_split_lists
from ..paths import resolve
from ..pretrain import ensure_pretrained
from ..train import ensure_dataset

OWNED_KEYS = ("train.mode", "train.seed", "train.run_name", "train.out_dir", "train.resume")


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

    def instrument_config(self, spec: RunSpec) -> Config:
        """The config whose data section builds ``spec``'s consistency pairs: the run's own without its ablation,
        so that every row of the study is measured on the same pairs."""
        return self.run_config(replace(spec, ablation={}))


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
