"""Everything a run does before its first step: the start-up checks, the dataset, the run-dir lock, the model and
optimiser, the resume, the run files.

:class:`TrainerSetup` is the first half of :class:`cacnb.train.loop.Trainer` (never used alone). Validate first,
write after: every check runs before ``config.json``, the split lists and ``env.json`` are written, so a refused
start leaves the run dir as it found it.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from .. import dist
from ..config import PRESETS, Config, ConfigError, absolute_paths, per_rank_batch, save_config
from ..data import build_labeled_dataset, build_pair_dataset, build_val_dataset
from ..data.errors import DatasetError, with_readme
from ..data.splits import record_splits, split_lists
from ..data.synthetic import make_command, make_synthetic_for
from ..data.validate import check_split_lists, run_split_lists
from ..engine import build_optimizer, set_rng_state
from ..interrupts import GracefulStop
from ..loss import FeatureBank, negatives_note, negatives_per_crop
from ..model import build_model, maybe_sync_bn
from ..paths import RunDirLock, atomic_write_text, remove_stale_temporaries
from ..pretrain import ensure_pretrained
from ..runlog import MetricsLog, ScalarWriter, environment
from .errors import USER_ERRORS, PeerFailed
from .resume import read_resume_state
from .step_metrics import TrainMetrics


class TrainerSetup:
    """A run's state up to its first step: the constructor checks the config, locks the run dir, builds the data,
    the model and the optimiser, resumes, and writes the run files; ``close()`` releases the lock.

    ``model`` is the bare model here; the loop wraps it for training (DDP, ``torch.compile``).
    """

    def __init__(self, cfg: Config, device: torch.device, *, force: bool = False, make_synthetic: bool = False,
                 stop: Optional[GracefulStop] = None):
        self.cfg = absolute_paths(cfg)
        self.force, self.make_synthetic = force, make_synthetic
        self.stop = stop or GracefulStop()
        self.lock: Optional[RunDirLock] = None
        self.device = device
        self.amp = cfg.train.amp and device.type == "cuda"  # bf16 autocast: no gradient scaler needed
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = dist.is_main()
        self.batch_l = per_rank_batch(cfg.train.batch_size, self.world, "train.batch_size")
        self.batch_u = per_rank_batch(cfg.train.batch_size_unsup, self.world, "train.batch_size_unsup")
        check_batchnorm_batch(cfg, min(self.batch_l, self.batch_u), self.world, device)
        self.semi = cfg.train.mode == "semi"
        if self.semi:
            check_negatives(cfg, self.world)
        self.run_dir = Path(self.cfg.run_dir)
        self.iteration, self.best_miou, self.history = 0, -1.0, []
        self.total = cfg.train.epochs * cfg.train.iters_per_epoch
        self.end = min(self.total, cfg.train.max_iters) if cfg.train.max_iters else self.total
        # CAC's loss joins after loss.epoch_start_unsup supervised warm-up epochs (never in the baseline)
        self.cac_start = cfg.loss.epoch_start_unsup * cfg.train.iters_per_epoch if self.semi else None
        self.pending_val = False  # resumed from an epoch end whose validation had not run yet
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.is_main)
        self.metrics = TrainMetrics(device)  # the steps since the last train log line
        try:
            self._lock_run_dir()
            self._build_data()
            self._build_model()
            self._maybe_resume()
            self._write_run_files()  # only once every check passed: a refused start changes nothing
        except BaseException:
            self.close()
            raise
        # after the resume, so steps logged past the checkpoint by a crashed run are purged, not duplicated
        self.tb = ScalarWriter(self.run_dir, enabled=self.is_main and cfg.train.tensorboard, start=self.iteration)

    def close(self) -> None:
        """Release the run dir lock (the kernel also drops it if the process dies)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- the run dir -----------------------------------------------------------------------------------------

    def _lock_run_dir(self) -> None:
        """Rank 0 takes the run dir's lock and removes temporaries a killed run left; every rank learns the
        outcome, so a refusal stops them all instead of leaving them waiting in a collective."""
        def take():
            self.lock = RunDirLock(self.run_dir).acquire()
            for tmp in remove_stale_temporaries(self.run_dir):
                print(f"[cacnb] removed {tmp.name}, left half-written by an earlier run that was killed", flush=True)

        rank0_decides(take)

    def _write_run_files(self) -> None:
        if self.is_main:
            save_config(self.cfg, self.run_dir / "config.json")
            record_splits(self.splits, self.run_dir)
            atomic_write_text(self.run_dir / "env.json", json.dumps(environment(self.world), indent=2) + "\n")
        dist.barrier()

    # -- data and model --------------------------------------------------------------------------------------

    def _build_data(self) -> None:
        data = self.cfg.data
        # rank 0 writes a missing synthetic set; the others wait for its verdict
        rank0_decides(lambda: ensure_dataset(self.cfg, self.make_synthetic))
        lists = split_lists(data)  # in memory, the same on every rank; recorded in the run dir with config.json
        check_split_lists(run_split_lists(lists))
        self.splits = lists
        self.labeled = build_labeled_dataset(data, all_train=self.cfg.train.mode == "full", lists=lists)
        self.pairs = build_pair_dataset(data, lists=lists) if self.semi else None
        self.val = build_val_dataset(data, lists=lists) if self.cfg.train.val_every else None
        self._read_first_samples()

    def _read_first_samples(self) -> None:
        """Fail in seconds, not at the end of epoch 1: read one labeled, one unlabeled and the first val sample
        (image, label, size and class ids: the checks every later read makes)."""
        for dataset in (self.labeled, self.pairs, self.val):
            if dataset is not None:
                dataset.files.read(0)

    def _build_model(self) -> None:
        cfg = self.cfg
        # the synthetic benchmark's pretrained backbone is built on first use, like its dataset (rank 0; a real
        # ImageNet file is only read)
        rank0_decides(lambda: ensure_pretrained(cfg.model.pretrained))
        torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
        model = build_model(cfg).to(self.device)
        if not self.semi:  # the projector is unused by the baseline: keep it out of DDP and the optimiser
            for p in model.projector.parameters():
                p.requires_grad_(False)
        self.model = maybe_sync_bn(model, cfg, self.world, self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.bank = FeatureBank(cfg.loss.step_save).to(self.device)
        torch.manual_seed(cfg.train.seed + 1 + self.rank)  # distinct dropout streams per rank
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 7919 * self.rank + 17)

    # -- resume ----------------------------------------------------------------------------------------------

    def _maybe_resume(self) -> None:
        found = read_resume_state(self.cfg, self.run_dir, force=self.force)
        if found is None:
            return
        path, state = found
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("bank") is not None:
            self.bank.load_state_dict(state["bank"])
        self.iteration = int(state["iteration"])
        self.best_miou = float(state.get("best_miou", -1.0))
        self.history = list(state.get("history", []))
        rngs = state.get("rng") or []
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank], self.generator)
        else:
            warnings.warn(f"{path} was written by {len(rngs)} rank(s), this run has {self.world}: RNG streams "
                          f"restart, so the continuation is valid but not bit-identical")
        # last.pt is written before an epoch's validation: if the run stopped before (or during) it, validate
        # first; a val line it may have logged goes, so metrics.jsonl gets exactly one
        validated = any(h.get("iter") == self.iteration for h in self.history)
        at_epoch_end = self.iteration % self.cfg.train.iters_per_epoch == 0
        self.pending_val = at_epoch_end and self._val_due() and not validated
        if self.iteration < self.end or self.pending_val:  # a complete run's log (and final line) stays as is
            self.log.truncate_after(self.iteration, drop_val_at_end=self.pending_val)
        if self.is_main:
            print(f"[cacnb] resumed from {path} at iteration {self.iteration}/{self.end}", flush=True)

    # -- the schedule ----------------------------------------------------------------------------------------

    def _cac_on(self) -> bool:
        return self.semi and self.iteration >= self.cac_start

    def _epoch(self) -> int:
        return (self.iteration - 1) // self.cfg.train.iters_per_epoch

    def _val_due(self) -> bool:
        """Validation runs at the end of every ``val_every``-th epoch and of the schedule."""
        every = self.cfg.train.val_every
        epoch = self._epoch() + 1
        return bool(every) and self.val is not None and (epoch % every == 0 or self.iteration == self.total)


# ---------------------------------------------------------------------------------------------------------------
# start-up checks and decisions


def check_batchnorm_batch(cfg: Config, per_rank: int, world: int, device: torch.device) -> None:
    """BatchNorm after ASPP's image pooling sees one value per channel and sample: one sample cannot train it."""
    synced = cfg.model.sync_bn and world > 1 and device.type == "cuda"
    if per_rank < 2 and not synced:
        raise ConfigError(f"each rank gets {per_rank} image(s) per batch (train.batch_size="
                          f"{cfg.train.batch_size}, train.batch_size_unsup={cfg.train.batch_size_unsup}, "
                          f"{world} rank(s)); BatchNorm needs at least 2 per rank without SyncBatchNorm. Use a "
                          f"global batch of at least {2 * world}, or GPUs with model.sync_bn=true")


def check_negatives(cfg: Config, world: int) -> None:
    """Fail at start-up, not when CAC switches on epochs later, if ``loss.neg_total`` cannot be split."""
    try:
        negatives_per_crop(cfg.loss, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    note = negatives_note(cfg.loss, world)
    if note and dist.is_main():
        print(note, flush=True)


def ensure_dataset(cfg: Config, make_synthetic: bool = False) -> None:
    """The synthetic set is written on first use at its preset's default ``data.data_dir`` (or anywhere with
    ``make_synthetic``); elsewhere a missing set is an error, so a mistyped path never trains on fresh data."""
    if cfg.data.dataset != "synthetic":
        return
    root = Path(cfg.data.data_dir)
    if (root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").exists():
        return
    default = default_synthetic_dir(cfg)
    if not make_synthetic and root.resolve() != default.resolve():
        raise DatasetError(with_readme(
            f"data.data_dir={str(root)!r} holds no synthetic dataset. It is generated automatically only at the "
            f"default {default}. Check the path for a typo; to make one there run `{make_command(cfg.data, root)}` "
            f"(or notebook 00), or pass --make-synthetic to cacnb.train"))
    print(f"[cacnb] writing the synthetic dataset to {root}", flush=True)
    make_synthetic_for(cfg.data, root)


def default_synthetic_dir(cfg: Config) -> Path:
    """Where the config's preset (the ``synthetic`` one for a custom config) keeps its synthetic set."""
    preset = PRESETS.get(cfg.name)
    base = preset() if preset is not None else None
    if base is None or base.data.dataset != "synthetic":
        base = PRESETS["synthetic"]()
    return Path(absolute_paths(base).data.data_dir)


def rank0_decides(action) -> None:
    """Run ``action`` on rank 0 and let every rank know whether it worked: rank 0 re-raises its error, the other
    ranks raise :class:`PeerFailed` (instead of waiting in the next collective until the timeout)."""
    failure = None
    if dist.is_main():
        try:
            action()
        except USER_ERRORS as e:
            failure = e
    verdict = dist.broadcast_object(None if failure is None else type(failure).__name__)
    if failure is not None:
        raise failure
    if verdict is not None:
        raise PeerFailed(f"rank 0 stopped with {verdict} (its message is above)")
