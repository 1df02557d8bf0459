"""Train CAC (or the supervised baseline): ``python -m cacnb.train --config <preset|json> [--set key=value ...]``.

The same command runs as one process (CPU or one GPU) and unchanged under torchrun::

    torchrun --standalone --nproc_per_node=4 -m cacnb.train --config voc_r50_1323 --set data.data_dir=/data/voc
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
             -m cacnb.train --config voc_r101_1323

Batch sizes in the config are global; each rank takes ``batch / world_size``. Rank 0 writes the run dir.
A run dir that already holds ``last.pt`` resumes from it, so re-running a notebook continues the run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import dist
from .config import (PRESETS, Config, ConfigError, absolute_paths, atomic_write_text, load_config, per_rank_batch,
                     save_config, valid_keys)
from .engine import (build_optimizer, first_bad_term, load_training_checkpoint, make_checkpoint, rng_state,
                     save_checkpoint, set_lr, set_rng_state, train_step, unwrap)
from .runlog import MetricsLog, ScalarWriter, environment


class TrainingDiverged(FloatingPointError):
    """A loss term became NaN or Inf; the last good checkpoint is kept."""


def train(cfg: "Config | str", overrides=None) -> Path:
    """Run training for ``cfg`` (a Config, preset name or JSON path) and return the run dir."""
    cfg = load_config(cfg, overrides)
    device = dist.init_from_env(timeout_s=float(os.environ.get("CACNB_DIST_TIMEOUT", 600)))
    if not dist.is_main():  # every rank would repeat rank 0's warnings (same config, same data)
        warnings.simplefilter("ignore")
    try:
        return Trainer(cfg, device).run()
    finally:
        dist.cleanup()


class Trainer:
    """Holds one run's state. ``run()`` trains from the current iteration to the end (or ``train.max_iters``)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = absolute_paths(cfg)
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
        self._prepare_run_dir()
        self._build_data()
        self._build_model()
        self._maybe_resume()
        # after the resume, so steps logged past the checkpoint by a crashed run are purged, not duplicated
        self.tb = ScalarWriter(self.run_dir, enabled=self.main and cfg.train.tensorboard, start=self.iteration)

    # -- setup ---------------------------------------------------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.json")
            atomic_write_text(self.run_dir / "env.json", json.dumps(environment(self.world), indent=2) + "\n")
        dist.barrier()
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.main)

    def _build_data(self) -> None:
        from .data import build_labeled_dataset, build_pair_dataset, build_val_dataset
        from .data.splits import resolve_splits

        data = self.cfg.data
        if self.main:  # rank 0 writes what is missing (synthetic set, generated splits); the others wait
            ensure_dataset(self.cfg)
            resolve_splits(data)
        dist.barrier()
        self.labeled = build_labeled_dataset(data, all_train=self.cfg.train.mode == "full")
        self.pairs = build_pair_dataset(data) if self.semi else None
        self.val = build_val_dataset(data) if self.cfg.train.val_every else None

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
        net = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            if unsup_active is None:
                unsup_active = self.semi and self.iteration >= self.unsup_start
            # The projector idles until epoch_start_unsup: DDP must look for unused parameters only while it does
            # (searching once all are used costs a graph traversal per step and a warning). run() rewraps.
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
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
        state = load_training_checkpoint(path)
        _check_same_run(state.get("config") or {}, self.cfg, path)
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
        self.log.truncate_after(self.iteration)
        if self.main:
            print(f"[cacnb] resumed from {path} at iteration {self.iteration}/{self.end}", flush=True)

    # -- loop ----------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        if self.iteration >= self.end:
            if self.main:
                print(f"[cacnb] {self.run_dir} is already complete ({self.iteration} iterations)", flush=True)
            return self.run_dir
        from tqdm.auto import tqdm

        loader_l = self._loader(self.labeled, self.batch_l, self.cfg.train.seed, self.iteration)
        loader_u = None
        bar = tqdm(total=self.end, initial=self.iteration, disable=not self.main, desc=self.run_dir.name,
                   dynamic_ncols=True, mininterval=float(os.environ.get("CACNB_TQDM_INTERVAL", 1.0)))
        window, tic = _Window(), time.perf_counter()
        self.net.train()
        while self.iteration < self.end:
            use_unsup = self.semi and self.iteration >= self.unsup_start
            if use_unsup and loader_u is None:
                if self.world > 1 and self.unsup_start > 0:
                    self.net = self._wrap(self.model, unsup_active=True)  # every parameter is used from now on
                loader_u = self._loader(self.pairs, self.batch_u, self.cfg.train.seed + 1,
                                        self.iteration - self.unsup_start)
            result, lr = self._step(next(loader_l), next(loader_u) if use_unsup else None)
            window.add(result, self.batch_l + (2 * self.batch_u if use_unsup else 0))
            self.iteration += 1
            bar.update(1)
            if self.iteration % self.cfg.train.log_every == 0 or self.iteration == self.end:
                record = self._log_train(window, lr, time.perf_counter() - tic)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
                window, tic = _Window(), time.perf_counter()
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
        self._check_finite(result)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        self.optimizer.step()
        return result, lr

    def _check_finite(self, result) -> None:
        bad = first_bad_term(result)
        flag = dist.all_reduce_sum(torch.tensor([1.0 if bad else 0.0], device=self.device))
        if flag.item() > 0:
            where = f"loss term {bad!r}" if bad else "another rank's loss"
            last = self.run_dir / "last.pt"
            kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"iteration {self.iteration}: {where} is not finite (NaN/Inf); training "
                                   f"stopped and {kept}. Lower optim.lr or check the data.")

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
            self._maybe_validate()
            self._save("last.pt")
        elif self.iteration == self.end or (every and self.iteration % every == 0):
            self._save("last.pt")  # a train.max_iters stop mid-epoch: checkpoint, validate at epoch ends only
        return time.perf_counter() - tic

    def _maybe_validate(self) -> None:
        every = self.cfg.train.val_every
        epoch = self._epoch() + 1
        if not every or self.val is None or (epoch % every and self.iteration != self.total):
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
        """A finite loss can still produce inf gradients; never let such weights overwrite the last checkpoint."""
        bad = any(not torch.isfinite(p).all() for p in self.model.parameters())
        if dist.all_reduce_sum(torch.tensor([float(bad)], device=self.device)).item() > 0:
            raise TrainingDiverged(f"iteration {self.iteration}: the weights are no longer finite (NaN/Inf); "
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


RUN_DEFINING_KEYS = ("train.mode", "model.backbone", "model.output_stride", "model.proj_dim", "data.num_classes",
                     "data.dataset")


def _check_same_run(saved: dict, cfg: Config, path) -> None:
    """Refuse to resume a checkpoint of a different run (another mode, backbone, ...) in the same run dir."""
    from .checkpoint_io import CheckpointError

    diffs = []
    for key in RUN_DEFINING_KEYS:
        section, name = key.split(".")
        theirs, ours = saved.get(section, {}).get(name), getattr(getattr(cfg, section), name)
        if theirs is not None and theirs != ours:
            diffs.append(f"{key} is {theirs!r} there but {ours!r} here")
    if diffs:
        raise CheckpointError(f"{path} belongs to a different run ({'; '.join(diffs)}). Choose another "
                              f"train.run_name or train.out_dir, or move that run away")


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


def ensure_dataset(cfg: Config) -> None:
    """The synthetic set is written on first use; real datasets must already be in place."""
    if cfg.data.dataset != "synthetic":
        return
    from .data.synthetic import make_synthetic_for

    root = Path(cfg.data.data_dir)
    if not (root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").exists():
        print(f"[cacnb] writing the synthetic dataset to {root}", flush=True)
        make_synthetic_for(cfg.data)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cacnb.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="synthetic",
                   help=f"a preset ({', '.join(PRESETS)}), our config.json, or an official CAC JSON file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="typed override, repeatable, e.g. --set train.epochs=2 --set data.data_dir=/data/voc")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (default: <run dir>/last.pt)")
    p.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        print("\n".join(valid_keys()))
        return 0
    from .checkpoint_io import CheckpointError
    from .data.errors import DatasetError

    try:
        overrides = list(args.set) + ([f"train.resume={args.resume}"] if args.resume else [])
        train(args.config, overrides)
    except (ConfigError, FileNotFoundError, DatasetError, CheckpointError) as e:
        print(f"cacnb.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as e:
        print(f"cacnb.train: stopped: {e}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
