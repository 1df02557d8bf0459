"""Train CAC (or the supervised baseline): ``python -m cacnb.train --config <preset|json> [--set key=value ...]``.

The same command runs as one process (CPU or one GPU) and unchanged under torchrun::

    torchrun --standalone --nproc_per_node=4 -m cacnb.train --config voc_r50_1323 --set data.data_dir=/data/voc
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
             -m cacnb.train --config voc_r101_1323

Batch sizes in the config are global; each rank takes ``batch / world_size``. Rank 0 writes the run dir, under
an exclusive lock (a second run started into the same dir exits with code 2 naming the holder).
A run dir that already holds ``last.pt`` resumes from it, so re-running a notebook continues the run; a changed
model, data or split setting is refused unless ``--force``. SIGTERM / SIGINT (SLURM preemption, Ctrl-C) finish the
current step (under torchrun: the steps up to the next log line, where the ranks agree to stop after the same one),
save ``last.pt`` and exit with code 128 + signal; a second Ctrl-C exits at once.

A step never waits for the device: its loss terms and statistics stay there and are read, with the NaN/Inf check,
once per ``train.log_every`` steps (and before every checkpoint). A NaN/Inf stops the run at that read, naming the
first bad iteration and loss term; no checkpoint is written from a diverged state.

Exit codes: 0 done, 2 bad input (config, data, checkpoint, run dir in use, storage), 3 diverged (NaN/Inf),
130 / 143 stopped by SIGINT / SIGTERM after saving.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import dist
from .config import (PRESETS, Config, ConfigError, absolute_paths, load_config, per_rank_batch,
                     save_config, valid_keys)
from .checkpoint_io import CheckpointError, first_nonfinite
from .data import build_labeled_dataset, build_pair_dataset, build_val_dataset, make_train_loader
from .data.errors import DatasetError, with_readme
from .data.splits import record_splits, split_lists
from .data.synthetic import make_command, make_synthetic_for
from .data.validate import check_split_lists, run_split_lists
from .engine import build_optimizer, make_checkpoint, rng_state, save_checkpoint, set_lr, set_rng_state, train_step
from . import evaluate as evaluation  # looked up at call time, so a test can stand in for it
from .interrupts import GracefulStop, Interrupted
from .loss import RATIO_STATS, FeatureBank, negatives_note, negatives_per_crop
from .model import TrainingForward, build_model, maybe_sync_bn, unwrap
from .paths import RunDirLock, RunDirLocked, StorageError, atomic_write_text, remove_stale_temporaries
from .runlog import MetricsLog, ScalarWriter, environment
from .runs import config_diff, describe_diff, training_state


class TrainingDiverged(FloatingPointError):
    """A loss term became NaN or Inf; the last good checkpoint is kept."""


PEER_EXIT_DELAY_S = 3.0  # how long the other ranks wait for rank 0 to exit first after it refused to start


class PeerFailed(RuntimeError):
    """Rank 0 refused to start (its own error says why); the other ranks stop quietly with the same exit code."""


def train(cfg: "Config | str", overrides=None, *, force: bool = False, make_synthetic: bool = False) -> Path:
    """Run training for ``cfg`` (a Config, preset name or JSON path) and return the run dir.

    ``force`` resumes even though a run-defining key (model, data, split) changed since the checkpoint;
    ``make_synthetic`` writes the synthetic dataset at a ``data.data_dir`` other than the preset's default.
    """
    cfg = load_config(cfg, overrides)
    device = dist.init_from_env(timeout_s=float(os.environ.get("CACNB_DIST_TIMEOUT", 600)))
    if not dist.is_main():  # every rank would repeat rank 0's warnings (same config, same data)
        warnings.simplefilter("ignore")
    try:
        with GracefulStop() as stop:
            trainer = Trainer(cfg, device, force=force, make_synthetic=make_synthetic, stop=stop)
            try:
                return trainer.run()
            finally:
                trainer.close()
    finally:
        dist.cleanup()


class Trainer:
    """One run's state. ``run()`` trains from the current iteration to the end (or ``train.max_iters``).

    ``model`` is the module being trained: the bare model while the run is set up and resumed, wrapped for
    training once ``run()`` starts (DDP over several ranks, ``torch.compile`` if configured); ``unwrap(model)``
    is always the bare one.
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
        _check_batchnorm_batch(cfg, min(self.batch_l, self.batch_u), self.world, device)
        self.semi = cfg.train.mode == "semi"
        if self.semi:
            _check_negatives(cfg, self.world)
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

    # -- setup ---------------------------------------------------------------------------------------------------

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

    def _cac_on(self) -> bool:
        return self.semi and self.iteration >= self.cac_start

    def _wrapped_for_training(self, cac_on: bool) -> torch.nn.Module:
        """The bare model, wrapped in DDP (several ranks) and ``torch.compile`` (if configured).

        The projector idles until CAC starts: DDP must look for unused parameters only while it does (searching
        once all are used costs a graph traversal per step and a warning), so ``run()`` rewraps when CAC starts.
        """
        model = TrainingForward(unwrap(self.model))   # one forward call returns every training output
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                              find_unused_parameters=self.semi and not cac_on)
        if self.cfg.train.compile:
            model = torch.compile(model)
        return model

    def _maybe_resume(self) -> None:
        path = self.cfg.train.resume or (self.run_dir / "last.pt")
        if self.cfg.train.resume and not Path(path).exists():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        # rank 0 decides: ranks that disagree (a node without the shared run dir) would desync and hang
        found = dist.broadcast_object(Path(path).exists() if self.is_main else None)
        if not found:
            return
        if not Path(path).exists():
            raise FileNotFoundError(f"rank {self.rank} cannot see {path}, which rank 0 resumes from: the run dir "
                                    f"must be on a file system that every node shares")
        state = training_state(path)
        _check_same_run(state.get("config") or {}, self.cfg, path, force=self.force)
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

    # -- loop ----------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        if self.pending_val and self.iteration >= self.end:  # stopped between the last save and validation
            self._maybe_validate()
            self._save("last.pt")
            self._finish()
            return self.run_dir
        if self.iteration >= self.end:
            if self.is_main:
                print(f"[cacnb] {self.run_dir} is already complete ({self.iteration} iterations)", flush=True)
            return self.run_dir
        labeled_batches = self._loader(self.labeled, self.batch_l, self.cfg.train.seed, self.iteration)
        pair_batches = None  # opened when CAC starts
        bar = tqdm(total=self.end, initial=self.iteration, disable=not self.is_main, desc=self.run_dir.name,
                   dynamic_ncols=True, mininterval=float(os.environ.get("CACNB_TQDM_INTERVAL", 1.0)))
        if self.pending_val:
            self._maybe_validate()
        self.model = self._wrapped_for_training(cac_on=self._cac_on())
        self.model.train()
        while self.iteration < self.end:
            self.metrics.clock.start()
            cac_on = self._cac_on()
            if cac_on and pair_batches is None:
                if self.world > 1 and self.iteration == self.cac_start > 0:  # the projector joins DDP's work
                    self.model = self._wrapped_for_training(cac_on=True)
                pair_batches = self._loader(self.pairs, self.batch_u, self.cfg.train.seed + 1,
                                            self.iteration - self.cac_start)
            batch_l = next(labeled_batches)
            batch_u = next(pair_batches) if cac_on else None
            lr = set_lr(self.optimizer, self.iteration, self.total, self.cfg.optim.poly_power)  # poly schedule
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                # cross-entropy on the labeled crops; with CAC on, both crops of every pair are encoded too and
                # the directional contrastive loss of their overlap joins
                result = train_step(self.model, batch_l, batch_u, self.cfg, bank=self.bank, generator=self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            self.optimizer.step()  # SGD
            self.metrics.add(self.iteration, result, images=self.batch_l + (2 * self.batch_u if cac_on else 0))
            self.iteration += 1
            bar.update(1)
            # One process reads its own stop flag after every step (no device involved). Ranks must stop after
            # the same step, so they agree on it at log lines, in the all-reduce that carries the metrics.
            stop = self.world == 1 and self.stop.requested
            if stop or self.iteration % self.cfg.train.log_every == 0 or self.iteration == self.end:
                stop = self._log_train(lr, bar)  # the interval's one host sync; raises on a NaN/Inf loss
            self.metrics.clock.stop()  # checkpoints and validation below do not count towards images/s
            if stop and self.iteration < self.end:
                bar.close()
                self._stop_on_signal()
            self._checkpoint_and_validate()
        bar.close()
        self._finish()
        return self.run_dir

    def _loader(self, dataset, batch: int, seed: int, iteration: int):
        return iter(make_train_loader(dataset, batch, seed=seed, rank=self.rank, world_size=self.world,
                                      num_workers=self.cfg.data.num_workers, start=iteration * batch))

    def _log_train(self, lr: float, bar) -> bool:
        """Write the train line of the steps since the last one, start the next interval, and return whether any
        rank asked to stop. A NaN/Inf loss term in the interval stops the run instead (:class:`TrainingDiverged`,
        naming the first bad iteration and term)."""
        means, first_bad, stop = self.metrics.read(stop_requested=self.stop.requested)
        self.metrics.clock.stop()
        if first_bad is not None:
            self._diverged(*first_bad)
        seconds = max(self.metrics.clock.seconds, 1e-9)
        record = {"kind": "train", "iter": self.iteration, "epoch": self._epoch(), "lr": lr, **means,
                  "images_per_s": self.metrics.images * self.world / seconds}
        self.log.write(record)
        self.tb.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
        self.metrics = TrainMetrics(self.device)
        return stop

    def _diverged(self, iteration: int, term: Optional[str]) -> None:
        where = f"loss term {term!r}" if term else "another rank's loss"
        last = self.run_dir / "last.pt"
        kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
        raise TrainingDiverged(f"iteration {iteration}: {where} is not finite (NaN/Inf); training stopped and "
                               f"{kept}. Lower optim.lr or check the data.")

    def _stop_on_signal(self) -> None:
        """Every rank agreed to stop after this step: save (rank 0 writes) and leave with the signal's code."""
        self._save("last.pt")
        signum = self.stop.signum or 15  # a rank that got no signal itself stops with SIGTERM's code
        raise Interrupted(f"stopped by a signal at iteration {self.iteration}/{self.end}; saved "
                          f"{self.run_dir / 'last.pt'}. Run the same command again to resume.", signum)

    def _epoch(self) -> int:
        return (self.iteration - 1) // self.cfg.train.iters_per_epoch

    def _checkpoint_and_validate(self) -> None:
        """Checkpoint every epoch (and every ``ckpt_every`` iterations), validate when due."""
        ipe, every = self.cfg.train.iters_per_epoch, self.cfg.train.ckpt_every
        if self.iteration % ipe == 0:
            self._save("last.pt")  # first: a crash in validation must not cost the epoch (resume validates)
            self._maybe_validate()
            if self.iteration == self.end and self._val_due():
                self._save("last.pt")  # the finished run's checkpoint carries its last validation
        elif self.iteration == self.end or (every and self.iteration % every == 0):
            self._save("last.pt")  # a train.max_iters stop mid-epoch: checkpoint, validate at epoch ends only

    def _val_due(self) -> bool:
        """Validation runs at the end of every ``val_every``-th epoch and of the schedule."""
        every = self.cfg.train.val_every
        epoch = self._epoch() + 1
        return bool(every) and self.val is not None and (epoch % every == 0 or self.iteration == self.total)

    def _maybe_validate(self) -> None:
        epoch = self._epoch() + 1
        if not self._val_due():
            return
        bare = unwrap(self.model)
        dist.broadcast_buffers(bare)
        result = evaluation.evaluate(bare, self.val, self.cfg.data.num_classes, mode=self.cfg.train.eval_mode,
                          crop_size=self.cfg.data.crop_size, ignore_index=self.cfg.data.ignore_index,
                          max_images=self.cfg.data.val_max_images, progress=False)
        self.model.train()
        record = {"kind": "val", "iter": self.iteration, "epoch": epoch - 1, "miou": result["miou"],
                  "iou": result["iou"], "pixel_acc": result["pixel_acc"]}
        self.log.write(record)
        self.tb.write({k: v for k, v in record.items() if k != "iou"})
        self.history.append({k: record[k] for k in ("iter", "epoch", "miou", "pixel_acc")})
        if self.is_main:
            print(f"[cacnb] iteration {self.iteration}: val mIoU {100 * result['miou']:.2f}%", flush=True)
        if result["miou"] > self.best_miou:
            self.best_miou = result["miou"]
            self._save("best.pt")

    def _save(self, name: str) -> None:
        """Checkpoint (rank 0 writes), never a diverged state: the losses since the last log line and the weights
        are checked first (a host sync, as the write is anyway)."""
        if len(self.metrics):
            first_bad = self.metrics.first_nonfinite()
            if first_bad is not None:
                self._diverged(*first_bad)
        self._check_finite_weights()
        rngs = dist.all_gather_object(rng_state(self.generator))
        if not self.is_main:
            return
        state = make_checkpoint(self.model, self.optimizer, self.cfg, bank=self.bank, epoch=self._epoch(),
                                iteration=self.iteration, rngs=rngs, history=self.history, best_miou=self.best_miou)
        save_checkpoint(state, self.run_dir / name)

    def _check_finite_weights(self) -> None:
        """A finite loss can still produce inf gradients or BatchNorm statistics; never let such weights or
        buffers overwrite the last checkpoint."""
        bad = first_nonfinite(unwrap(self.model).state_dict())
        if dist.all_reduce_sum(torch.tensor([float(bad is not None)], device=self.device)).item() > 0:
            what = f"tensor {bad!r}" if bad else "another rank's weights"
            raise TrainingDiverged(f"iteration {self.iteration}: {what} is no longer finite (NaN/Inf); "
                                   f"training stopped before saving, so {self.run_dir / 'last.pt'} still holds "
                                   f"the last good state. Lower optim.lr or check the data.")

    def _finish(self) -> None:
        bare = unwrap(self.model)
        dist.broadcast_buffers(bare)
        sums = dist.all_gather_object(parameter_digest(bare))
        self.log.write({"kind": "final", "iter": self.iteration, "best_miou": self.best_miou,
                        "param_digests": sums, "ranks_in_sync": len(set(sums)) == 1})
        self.tb.close()
        if self.is_main:
            print(f"[cacnb] done: {self.run_dir} (best val mIoU "
                  f"{100 * max(self.best_miou, 0):.2f}%)", flush=True)


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


def parameter_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, to check that DDP ranks ended identical."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_batchnorm_batch(cfg: Config, per_rank: int, world: int, device: torch.device) -> None:
    """BatchNorm after ASPP's image pooling sees one value per channel and sample: one sample cannot train it."""
    synced = cfg.model.sync_bn and world > 1 and device.type == "cuda"
    if per_rank < 2 and not synced:
        raise ConfigError(f"each rank gets {per_rank} image(s) per batch (train.batch_size="
                          f"{cfg.train.batch_size}, train.batch_size_unsup={cfg.train.batch_size_unsup}, "
                          f"{world} rank(s)); BatchNorm needs at least 2 per rank without SyncBatchNorm. Use a "
                          f"global batch of at least {2 * world}, or GPUs with model.sync_bn=true")


# keys whose change makes the checkpoint another run's: its weights or its meaning do not carry over
DIFFERENT_RUN_KEYS = ("train.mode", "model.backbone", "model.output_stride", "model.proj_dim", "data.num_classes",
                      "data.dataset")
# keys whose change breaks the continuation (other data, another split, other crops or data order): refused
# unless --force
RUN_DEFINING_KEYS = ("data.data_dir", "data.n_labeled", "data.split_seed", "data.split_dir", "data.ignore_index",
                     "data.crop_size", "data.base_size", "data.scale_range", "data.pair_scale_range",
                     "data.iou_bound", "data.stride", "train.iters_per_epoch", "train.batch_size",
                     "train.batch_size_unsup", "train.seed", "loss.epoch_start_unsup")
# keys that may change on resume without comment
RESUME_FREE_KEYS = ("train.resume", "train.max_iters", "data.num_workers", "data.val_max_images", "train.compile",
                    "train.log_every", "model.pretrained")


def _check_same_run(saved: dict, cfg: Config, path, *, force: bool = False) -> None:
    """Refuse to resume a checkpoint of a different run (another mode, backbone, ...) in the same run dir, or
    one whose data, split or schedule changed (unless ``force``); report every other changed key."""
    changes = config_diff(saved, cfg, skip=RESUME_FREE_KEYS)
    different = [k for k in DIFFERENT_RUN_KEYS if k in changes]
    if different:
        raise CheckpointError(f"{path} belongs to a different run ({describe_diff(changes, different)}). Choose "
                              f"another train.run_name or train.out_dir, or move that run away")
    defining = [k for k in RUN_DEFINING_KEYS if k in changes]
    if defining and not force:
        raise CheckpointError(f"{path}: resuming would change the run's data or split "
                              f"({describe_diff(changes, defining)}), so the continuation would not be the run it "
                              f"claims to be. Restore the saved "
                              f"values (its config.json), start a new run (another train.run_name), or pass "
                              f"--force to resume anyway")
    rest = [k for k in changes if k not in defining]
    if (rest or defining) and dist.is_main():
        forced = f" (--force: {describe_diff(changes, defining)})" if defining else ""
        print(f"[cacnb] resuming {path} with changed settings: {describe_diff(changes, rest) or 'none other'}"
              f"{forced}", flush=True)


def _check_negatives(cfg: Config, world: int) -> None:
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



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cacnb.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="synthetic",
                   help=f"a preset ({', '.join(PRESETS)}), our config.json, or an official CAC JSON file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="typed override, repeatable, e.g. --set train.epochs=2 --set data.data_dir=/data/voc")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (default: <run dir>/last.pt)")
    p.add_argument("--force", action="store_true",
                   help="resume even though the data, split or schedule settings changed since the checkpoint")
    p.add_argument("--make-synthetic", action="store_true",
                   help="write the synthetic dataset at data.data_dir if it is missing there (by default only "
                        "at the preset's own data dir)")
    p.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    return p.parse_args(argv)


USER_ERRORS = (ConfigError, FileNotFoundError, DatasetError, CheckpointError, RunDirLocked, StorageError)


def report(kind: str, message: str) -> None:
    """One error block on stderr; every line carries the rank so :mod:`cacnb.launch` can show the failing rank's
    own message first, even among other ranks' output."""
    rank, world = _launch_rank()
    tag = f"cacnb.train[rank {rank}]" if world > 1 else "cacnb.train"
    lines = str(message).rstrip().splitlines() or [""]
    print("\n".join([f"{tag}: {kind}: {lines[0]}"] + [f"{tag}:   {line}" for line in lines[1:]]),
          file=sys.stderr, flush=True)


def _launch_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun set them: still known after the process group is gone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        print("\n".join(valid_keys()))
        return 0
    try:
        overrides = list(args.set) + ([f"train.resume={args.resume}"] if args.resume else [])
        train(args.config, overrides, force=args.force, make_synthetic=args.make_synthetic)
    except PeerFailed:
        # Rank 0 prints the reason and exits 2. Leave after it, or torchrun sees this rank end first, stops rank 0
        # with SIGTERM and reports its exit code as -15 instead of its own.
        time.sleep(PEER_EXIT_DELAY_S)
        return 2
    except USER_ERRORS as e:
        report("error", e)
        return 2
    except TrainingDiverged as e:
        report("stopped", e)
        return 3
    except Interrupted as e:
        if _launch_rank()[0] == 0:
            report("interrupted", e)
        return e.exit_code
    except BaseException as e:  # an unexpected failure: its traceback, tagged with the rank
        if isinstance(e, KeyboardInterrupt):
            report("interrupted", "KeyboardInterrupt before training started; nothing was saved")
            return 130
        report(f"failed with {type(e).__name__}", "".join(traceback.format_exception(e)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
