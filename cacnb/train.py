"""Train CAC (or the supervised baseline): ``python -m cacnb.train --config <preset|json> [--set key=value ...]``.

The same command runs as one process (CPU or one GPU) and unchanged under torchrun::

    torchrun --standalone --nproc_per_node=4 -m cacnb.train --config voc_r50_1323 --set data.data_dir=/data/voc
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
             -m cacnb.train --config voc_r101_1323

Batch sizes in the config are global; each rank takes ``batch / world_size``. Rank 0 writes the run dir, under
an exclusive lock (a second run started into the same dir exits with code 2 naming the holder).
A run dir that already holds ``last.pt`` resumes from it, so re-running a notebook continues the run; a changed
model, data or split setting is refused unless ``--force``. SIGTERM / SIGINT (SLURM preemption, Ctrl-C) finish the
current step, save ``last.pt`` and exit with code 128 + signal; a second Ctrl-C exits at once.

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

from . import dist
from .config import (PRESETS, Config, ConfigError, absolute_paths, load_config, per_rank_batch,
                     save_config, valid_keys)
from .checkpoint_io import first_nonfinite
from .data import build_labeled_dataset, build_pair_dataset, build_val_dataset
from .data.splits import record_splits, split_lists
from .data.validate import check_split_lists, run_split_lists
from .engine import (build_optimizer, first_bad_term, make_checkpoint, rng_state, save_checkpoint, set_lr,
                     set_rng_state, train_step)
from .model import TrainingForward, unwrap
from .interrupts import GracefulStop, Interrupted
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
    """Holds one run's state. ``run()`` trains from the current iteration to the end (or ``train.max_iters``)."""

    def __init__(self, cfg: Config, device: torch.device, *, force: bool = False, make_synthetic: bool = False,
                 stop: Optional[GracefulStop] = None):
        self.cfg = absolute_paths(cfg)
        self.force, self.make_synthetic = force, make_synthetic
        self.stop = stop or GracefulStop()
        self.lock: Optional[RunDirLock] = None
        self.device = device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = dist.is_main()
        self.batch_l = per_rank_batch(cfg.train.batch_size, self.world, "train.batch_size")
        self.batch_u = per_rank_batch(cfg.train.batch_size_unsup, self.world, "train.batch_size_unsup")
        _check_batchnorm_batch(cfg, min(self.batch_l, self.batch_u), self.world, device)
        if cfg.train.mode == "semi":
            _check_negatives(cfg, self.world)
        self.run_dir = Path(self.cfg.run_dir)
        self.iteration, self.best_miou, self.history = 0, -1.0, []
        self.total = cfg.train.epochs * cfg.train.iters_per_epoch
        self.end = min(self.total, cfg.train.max_iters) if cfg.train.max_iters else self.total
        self.semi = cfg.train.mode == "semi"
        self.unsup_start = cfg.loss.epoch_start_unsup * cfg.train.iters_per_epoch if self.semi else None
        self.pending_val = False  # resumed from an epoch end whose validation had not run yet
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.main)
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
        self.tb = ScalarWriter(self.run_dir, enabled=self.main and cfg.train.tensorboard, start=self.iteration)

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
        if self.main:
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
        from .loss import FeatureBank
        from .model import build_model, maybe_sync_bn

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
        model = build_model(cfg).to(self.device)
        if not self.semi:  # the projector is unused by the baseline: keep it out of DDP and the optimiser
            for p in model.projector.parameters():
                p.requires_grad_(False)
        model = maybe_sync_bn(model, cfg, self.world, self.device)
        self.model = model
        self.optimizer = build_optimizer(model, cfg)
        self.net = self._wrap(model, unsup_active=self.semi and self.unsup_start == 0)
        self.bank = FeatureBank(cfg.loss.step_save).to(self.device)
        torch.manual_seed(cfg.train.seed + 1 + self.rank)  # distinct dropout streams per rank
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 7919 * self.rank + 17)

    def _wrap(self, model, unsup_active: Optional[bool] = None):
        net = TrainingForward(model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            if unsup_active is None:
                unsup_active = self.semi and self.iteration >= self.unsup_start
            # The projector idles until epoch_start_unsup: DDP must look for unused parameters only while it does
            # (searching once all are used costs a graph traversal per step and a warning). run() rewraps.
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids,
                                                            find_unused_parameters=self.semi and not unsup_active)
        if self.cfg.train.compile:
            net = torch.compile(net)
        return net

    def _maybe_resume(self) -> None:
        path = self.cfg.train.resume or (self.run_dir / "last.pt")
        if self.cfg.train.resume and not Path(path).exists():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        # rank 0 decides: ranks that disagree (a node without the shared run dir) would desync and hang
        found = dist.broadcast_object(Path(path).exists() if self.main else None)
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
        if self.main:
            print(f"[cacnb] resumed from {path} at iteration {self.iteration}/{self.end}", flush=True)

    # -- loop ----------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        if self.pending_val and self.iteration >= self.end:  # stopped between the last save and validation
            self._maybe_validate()
            self._save("last.pt")
            self._finish()
            return self.run_dir
        if self.iteration >= self.end:
            if self.main:
                print(f"[cacnb] {self.run_dir} is already complete ({self.iteration} iterations)", flush=True)
            return self.run_dir
        from tqdm.auto import tqdm

        loader_l = self._loader(self.labeled, self.batch_l, self.cfg.train.seed, self.iteration)
        loader_u = None
        bar = tqdm(total=self.end, initial=self.iteration, disable=not self.main, desc=self.run_dir.name,
                   dynamic_ncols=True, mininterval=float(os.environ.get("CACNB_TQDM_INTERVAL", 1.0)))
        if self.pending_val:
            self._maybe_validate()
        window, tic = _Window(), time.perf_counter()
        self.net.train()
        while self.iteration < self.end:
            use_unsup = self.semi and self.iteration >= self.unsup_start
            if use_unsup and loader_u is None:
                if self.world > 1 and self.unsup_start > 0:
                    self.net = self._wrap(self.model, unsup_active=True)  # every parameter is used from now on
                loader_u = self._loader(self.pairs, self.batch_u, self.cfg.train.seed + 1,
                                        self.iteration - self.unsup_start)
            result, lr, stop = self._step(next(loader_l), next(loader_u) if use_unsup else None)
            window.add(result, self.batch_l + (2 * self.batch_u if use_unsup else 0))
            self.iteration += 1
            bar.update(1)
            if self.iteration % self.cfg.train.log_every == 0 or self.iteration == self.end:
                record = self._log_train(window, lr, time.perf_counter() - tic)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
                window, tic = _Window(), time.perf_counter()
            if stop and self.iteration < self.end:
                if window.counts:  # the steps since the last log line, so the log covers every saved step
                    self._log_train(window, lr, time.perf_counter() - tic)
                bar.close()
                self._stop_on_signal()
            tic += self._end_of_iteration()
        bar.close()
        self._finish()
        return self.run_dir

    def _loader(self, dataset, batch: int, seed: int, iteration: int):
        from .data import make_train_loader

        return iter(make_train_loader(dataset, batch, seed=seed, rank=self.rank, world_size=self.world,
                                      num_workers=self.cfg.data.num_workers, start=iteration * batch))

    def _step(self, batch_l: dict, batch_u: Optional[dict]):
        lr = set_lr(self.optimizer, self.iteration, self.total, self.cfg.optim.poly_power)
        amp = self.cfg.train.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            result = train_step(self.net, batch_l, batch_u, self.cfg, bank=self.bank, generator=self.generator)
        stop = self._check_finite(result)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        self.optimizer.step()
        return result, lr, stop

    def _check_finite(self, result) -> bool:
        """Raise when any rank's loss is not finite; return whether any rank was asked to stop (a signal).

        Both flags travel in one all-reduce: the step's only host sync besides logging."""
        bad = first_bad_term(result)
        flags = torch.tensor([1.0 if bad else 0.0, 1.0 if self.stop.requested else 0.0], device=self.device)
        flag, stop = dist.all_reduce_sum(flags).tolist()
        if flag > 0:
            where = f"loss term {bad!r}" if bad else "another rank's loss"
            last = self.run_dir / "last.pt"
            kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"iteration {self.iteration}: {where} is not finite (NaN/Inf); training "
                                   f"stopped and {kept}. Lower optim.lr or check the data.")
        return stop > 0

    def _stop_on_signal(self) -> None:
        """Every rank agreed to stop after this step: save (rank 0 writes) and leave with the signal's code."""
        self._save("last.pt")
        signum = self.stop.signum or 15  # a rank that got no signal itself stops with SIGTERM's code
        raise Interrupted(f"stopped by a signal at iteration {self.iteration}/{self.end}; saved "
                          f"{self.run_dir / 'last.pt'}. Run the same command again to resume.", signum)

    def _log_train(self, window: "_Window", lr: float, seconds: float) -> dict:
        record = {"kind": "train", "iter": self.iteration, "epoch": self._epoch(), "lr": lr}
        record.update(window.mean_over_ranks(self.device))
        record["images_per_s"] = window.images * self.world / max(seconds, 1e-9)
        self.log.write(record)
        self.tb.write(record)
        return record

    def _epoch(self) -> int:
        return (self.iteration - 1) // self.cfg.train.iters_per_epoch

    def _end_of_iteration(self) -> float:
        """Validate and checkpoint when due; return the seconds spent, which throughput must not count."""
        tic = time.perf_counter()
        ipe, every = self.cfg.train.iters_per_epoch, self.cfg.train.ckpt_every
        if self.iteration % ipe == 0:
            self._save("last.pt")  # first: a crash in validation must not cost the epoch (resume validates)
            self._maybe_validate()
            if self.iteration == self.end and self._val_due():
                self._save("last.pt")  # the finished run's checkpoint carries its last validation
        elif self.iteration == self.end or (every and self.iteration % every == 0):
            self._save("last.pt")  # a train.max_iters stop mid-epoch: checkpoint, validate at epoch ends only
        return time.perf_counter() - tic

    def _val_due(self) -> bool:
        """Validation runs at the end of every ``val_every``-th epoch and of the schedule."""
        every = self.cfg.train.val_every
        epoch = self._epoch() + 1
        return bool(every) and self.val is not None and (epoch % every == 0 or self.iteration == self.total)

    def _maybe_validate(self) -> None:
        epoch = self._epoch() + 1
        if not self._val_due():
            return
        from .evaluate import evaluate

        dist.broadcast_buffers(self.model)
        result = evaluate(unwrap(self.net), self.val, self.cfg.data.num_classes, mode=self.cfg.train.eval_mode,
                          crop_size=self.cfg.data.crop_size, ignore_index=self.cfg.data.ignore_index,
                          max_images=self.cfg.data.val_max_images, progress=False)
        self.net.train()
        record = {"kind": "val", "iter": self.iteration, "epoch": epoch - 1, "miou": result["miou"],
                  "iou": result["iou"], "pixel_acc": result["pixel_acc"]}
        self.log.write(record)
        self.tb.write({k: v for k, v in record.items() if k != "iou"})
        self.history.append({k: record[k] for k in ("iter", "epoch", "miou", "pixel_acc")})
        if self.main:
            print(f"[cacnb] iteration {self.iteration}: val mIoU {100 * result['miou']:.2f}%", flush=True)
        if result["miou"] > self.best_miou:
            self.best_miou = result["miou"]
            self._save("best.pt")

    def _save(self, name: str) -> None:
        self._check_finite_weights()
        rngs = dist.all_gather_object(rng_state(self.generator))
        if not self.main:
            return
        state = make_checkpoint(self.net, self.optimizer, self.cfg, bank=self.bank, scaler=None,
                                epoch=self._epoch(), iteration=self.iteration, rngs=rngs, history=self.history,
                                best_miou=self.best_miou)
        save_checkpoint(state, self.run_dir / name)

    def _check_finite_weights(self) -> None:
        """A finite loss can still produce inf gradients or BatchNorm statistics; never let such weights or
        buffers overwrite the last checkpoint."""
        bad = first_nonfinite(self.model.state_dict())
        if dist.all_reduce_sum(torch.tensor([float(bad is not None)], device=self.device)).item() > 0:
            what = f"tensor {bad!r}" if bad else "another rank's weights"
            raise TrainingDiverged(f"iteration {self.iteration}: {what} is no longer finite (NaN/Inf); "
                                   f"training stopped before saving, so {self.run_dir / 'last.pt'} still holds "
                                   f"the last good state. Lower optim.lr or check the data.")

    def _finish(self) -> None:
        dist.broadcast_buffers(self.model)
        sums = dist.all_gather_object(parameter_digest(self.model))
        self.log.write({"kind": "final", "iter": self.iteration, "best_miou": self.best_miou,
                        "param_digests": sums, "ranks_in_sync": len(set(sums)) == 1})
        self.tb.close()
        if self.main:
            print(f"[cacnb] done: {self.run_dir} (best val mIoU "
                  f"{100 * max(self.best_miou, 0):.2f}%)", flush=True)


class _Window:
    """Running sums of the loss terms and statistics between two log steps."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.images = 0

    def add(self, result, images: int) -> None:
        values = {"loss": float(result.loss.detach()), **{k: float(v) for k, v in result.terms.items()},
                  **{k: float(v) for k, v in result.stats.items()}}
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.images += images

    def mean_over_ranks(self, device) -> dict[str, float]:
        keys = sorted(self.sums)
        local = torch.tensor([self.sums[k] / self.counts[k] for k in keys], dtype=torch.float64, device=device)
        return dict(zip(keys, dist.all_reduce_mean(local).tolist()))


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
    from .checkpoint_io import CheckpointError

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
    from .loss import negatives_note, negatives_per_crop

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
    from .data.errors import DatasetError, with_readme
    from .data.synthetic import make_command, make_synthetic_for

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


def _user_errors() -> tuple:
    from .checkpoint_io import CheckpointError
    from .data.errors import DatasetError

    return ConfigError, FileNotFoundError, DatasetError, CheckpointError, RunDirLocked, StorageError


USER_ERRORS = _user_errors()


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
