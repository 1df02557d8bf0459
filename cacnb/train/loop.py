"""The training loop: :func:`train` and :class:`Trainer`, from the first step to the last.

Each iteration sets the poly learning rate, runs :func:`cacnb.engine.train_step` (cross-entropy on the labeled
crops; once CAC starts, the directional contrastive loss of the pairs' overlap too) and an SGD step. A step never
waits for the device: its loss terms and statistics stay there and are read, with the NaN/Inf check, once per
``train.log_every`` steps (and before every checkpoint). A NaN/Inf stops the run at that read, naming the first
bad iteration and loss term; no checkpoint is written from a diverged state.

``last.pt`` is written at every epoch end (before its validation), every ``train.ckpt_every`` iterations and at
the end; ``best.pt`` after a validation that improved the best mIoU. SIGTERM / SIGINT finish the current step
(under torchrun: the steps up to the next log line, where the ranks agree to stop after the same one), save
``last.pt`` and stop. A :class:`DatasetError` from a training loader (a broken file) stops every rank before the
step it was for, saves ``last.pt`` the same way and is re-raised naming the file. What runs before the first
step (checks, lock, data, model, resume) is :class:`cacnb.train.bootstrap.TrainerSetup`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import dist
from .. import evaluate as evaluation  # looked up at call time, so a test can stand in for it
from ..checkpoint_io import first_nonfinite
from ..config import Config, load_config
from ..data import make_train_loader
from ..data.errors import DatasetError
from ..data.sampling import loader_error_message
from ..engine import make_checkpoint, rng_state, save_checkpoint, set_lr, train_step, weights_checkpoint
from ..interrupts import GracefulStop, Interrupted
from ..model import TrainingForward, unwrap
from .bootstrap import TrainerSetup
from .errors import PeerFailed, TrainingDiverged
from .step_metrics import TrainMetrics


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
            tic = time.perf_counter()
            trainer = Trainer(cfg, device, force=force, make_synthetic=make_synthetic, stop=stop)
            trainer.seconds["setup"] = time.perf_counter() - tic
            try:
                return trainer.run()
            finally:
                trainer.close()
    finally:
        dist.cleanup()


class Trainer(TrainerSetup):
    """One run's state. ``run()`` trains from the current iteration to the end (or ``train.max_iters``).

    ``model`` is the module being trained: the bare model while the run is set up and resumed, wrapped for
    training once ``run()`` starts (DDP over several ranks, ``torch.compile`` if configured); ``unwrap(model)``
    is always the bare one.
    """

    def __init__(self, *args, **kwargs):
        # host seconds of this invocation by phase (setup, data, compute, validation, checkpoint <name>), in the
        # final log line for benchmarks/bench_run.py; on a GPU "compute" is the time to queue the steps
        self.seconds: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def _timed(self, phase: str):
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - tic

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
        started, lr = self.iteration, None  # lr: the last step's, for the log line of a stop on a data error
        while self.iteration < self.end:
            self.metrics.clock.start()
            cac_on = self._cac_on()
            if cac_on and pair_batches is None:
                if self.world > 1 and self.iteration == self.cac_start > 0:  # the projector joins DDP's work
                    self.model = self._wrapped_for_training(cac_on=True)
                pair_batches = self._loader(self.pairs, self.batch_u, self.cfg.train.seed + 1,
                                            self.iteration - self.cac_start)
            with self._timed("data"):
                batch_l, batch_u, data_error = self._next_batches(labeled_batches, pair_batches if cac_on else None)
            # Ranks must agree before the step: one that enters it alone waits in DDP's collectives forever, and
            # its forward already changes BatchNorm statistics. See _any_rank_lacks_data for the cost.
            if self._any_rank_lacks_data(data_error is not None):
                labeled_batches = pair_batches = None  # their loader workers exit now instead of being killed
                self._stop_on_data_error(data_error, lr, bar, saved=self.iteration > started)
            lr = set_lr(self.optimizer, self.iteration, self.total, self.cfg.optim.poly_power)  # poly schedule
            with self._timed("compute"):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    # cross-entropy on the labeled crops; with CAC on, both crops of every pair are encoded too
                    # and the directional contrastive loss of their overlap joins
                    result = train_step(self.model, batch_l, batch_u, self.cfg, bank=self.bank,
                                        generator=self.generator)
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

    @staticmethod
    def _next_batches(labeled, pairs) -> tuple[Optional[dict], Optional[dict], Optional[str]]:
        """The step's labeled batch and pair batch (None without CAC), or instead the message of the
        :class:`DatasetError` a loader met (a broken file, named in it)."""
        try:
            return next(labeled), (next(pairs) if pairs is not None else None), None
        except DatasetError as e:  # only the message is kept: the error's traceback holds the loader alive
            return None, None, loader_error_message(e)

    def _any_rank_lacks_data(self, lacking: bool) -> bool:
        """Whether this or any other rank could not load this step's data. Under several ranks this is one
        all-reduce per step of a CPU integer over a gloo group (:func:`cacnb.dist.any_rank`): no device sync
        and nothing queued on the GPU, only a round trip between the hosts, made while the GPU still works
        through the previous step. A lighter agreement does not exist: the broken file is known only to the
        rank that read it, and only at the moment it reads it."""
        return dist.any_rank(lacking) if self.world > 1 else lacking

    def _stop_on_data_error(self, message: Optional[str], lr: Optional[float], bar, *, saved: bool) -> None:
        """Every rank stops before this step, as a signal stop does: the interval's log line, ``last.pt`` of the
        last completed step (rank 0 writes; ``saved`` False: no step ran since the start, so the checkpoint
        on disk, if any, already holds this state), then :class:`DatasetError` on the rank that met the file
        (``message``) and :class:`PeerFailed` on the others."""
        if len(self.metrics):
            self._log_train(lr, bar)  # raises instead if a loss went NaN/Inf: no checkpoint from that state
        bar.close()
        if saved:
            self._save("last.pt")
        dist.barrier()  # no rank leaves (and has torchrun stop the others) before rank 0 has written
        if message is None:
            raise PeerFailed("another rank met a broken training file (its message is above)")
        last = self.run_dir / "last.pt"
        if saved:
            kept = f"Training stopped after iteration {self.iteration}/{self.end} and saved it in {last}"
        elif last.exists():
            kept = f"Training stopped before its first step since the start; {last} holds the run"
        else:
            kept = "Training stopped before its first step; nothing was lost"
        raise DatasetError(f"{message}\n{kept}: fix or replace the file, then run the same command again to "
                           f"resume from there.")

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

    def _maybe_validate(self) -> None:
        epoch = self._epoch() + 1
        if not self._val_due():
            return
        bare = unwrap(self.model)
        dist.broadcast_buffers(bare)
        with self._timed("validation"):
            result = evaluation.evaluate(bare, self.val, self.cfg.data.num_classes,
                                         mode=self.cfg.train.eval_mode, crop_size=self.cfg.data.crop_size,
                                         ignore_index=self.cfg.data.ignore_index,
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
        with self._timed(f"checkpoint {name}"):
            self._write_checkpoint(name)

    def _write_checkpoint(self, name: str) -> None:
        """Checkpoint (rank 0 writes), never a diverged state: the losses since the last log line and the weights
        are checked first (a host sync, as the write is anyway). ``best.pt`` keeps the weights, config and
        history only (:func:`cacnb.engine.weights_checkpoint`): resuming is from ``last.pt``."""
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
        save_checkpoint(weights_checkpoint(state) if name == "best.pt" else state, self.run_dir / name)

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
                        "param_digests": sums, "ranks_in_sync": len(set(sums)) == 1, "seconds": dict(self.seconds)})
        self.tb.close()
        if self.is_main:
            print(f"[cacnb] done: {self.run_dir} (best val mIoU "
                  f"{100 * max(self.best_miou, 0):.2f}%)", flush=True)


def parameter_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, to check that DDP ranks ended identical."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
