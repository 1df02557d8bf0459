"""Infinite, reshuffling, rank-sharded sampling (replaces the official ``itertools.cycle``).

``itertools.cycle`` over a DataLoader caches every batch of the first pass and replays the very same augmented
crops forever. Here every pass draws a fresh permutation and every item a fresh sample seed, so augmentation is
new each time, yet the whole stream is a pure function of ``(seed, rank, world_size)``: resuming at item ``start``
reproduces exactly what an uninterrupted run would have drawn, whatever the number of DataLoader workers.
"""
from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import signal
import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; distinct tuples give unrelated seeds."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class InfiniteSampler(Sampler):
    """Yields ``(index, sample_seed)`` forever for this rank.

    Pass ``p`` permutes ``range(n)`` with a generator seeded by ``(seed, p)`` (the same on every rank), pads it by
    wrapping to a multiple of ``world_size`` and gives rank ``r`` the items ``r, r + world, ...``: the
    DistributedSampler split, so ranks are disjoint within a pass except for the padding. The item at position
    ``t`` of this rank's stream gets ``sample_seed = mix(seed, rank, t)``. ``start`` skips the first ``start``
    items of the stream (already consumed before a resume) without touching the dataset.
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 start: int = 0):
        if n < 1:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n, self.seed, self.rank, self.world_size = n, int(seed), rank, world_size
        self.shuffle, self.start = shuffle, int(start)
        self.per_rank = math.ceil(n / world_size)

    def shard(self, pass_index: int) -> list[int]:
        """This rank's indices in pass ``pass_index``."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, pass_index))
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.n))[:total]  # pad by wrapping, as DistributedSampler does
        return order[self.rank:total:self.world_size]

    def sample_seed(self, position: int) -> int:
        return mix_seed(self.seed, self.rank, position)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pass_index, skip = divmod(self.start, self.per_rank)
        position = self.start
        while True:
            for index in self.shard(pass_index)[skip:]:
                yield index, self.sample_seed(position)
                position += 1
            pass_index, skip = pass_index + 1, 0


# Set (in shared memory, inherited by forked loader workers) once the trainer has been asked to stop.
_STOPPING = multiprocessing.RawValue("b", 0)
_STOP_WAIT_S = 0.5  # a SIGTERM sent to a whole process group may reach a worker before its trainer


def mark_stopping(stopping: bool = True) -> None:
    """Set by the trainer's signal handler (cacnb.interrupts), so loader workers outlive a SIGTERM; cleared when
    its handlers are removed."""
    _STOPPING.value = int(stopping)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn``: a Ctrl-C or a SIGTERM sent to the whole process group (``kill -TERM -pgid``, a job
    scheduler) must not kill the loader workers while the trainer finishes its step and saves (see
    cacnb.interrupts); they exit when it does. SIGINT is ignored; SIGTERM is ignored only when the trainer is
    stopping too, so ``multiprocessing``'s own terminate() at shutdown still ends a worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def _worker_sigterm(signum, frame) -> None:
    deadline = time.monotonic() + _STOP_WAIT_S
    while not _STOPPING.value and time.monotonic() < deadline:
        time.sleep(0.01)
    if not _STOPPING.value:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def make_train_loader(dataset: Dataset, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 0, start: int = 0, pin_memory: bool | None = None,
                      prefetch_factor: int | None = None) -> DataLoader:
    """An endless DataLoader of training batches for this rank (use ``iter()``; the trainer counts iterations).

    ``start`` is the number of *items* this rank has already consumed (iterations x per-rank batch size).
    The DataLoader gets its own generator, so creating it never consumes torch's global random stream.
    """
    sampler = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, start=start)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {}
    if num_workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor or 2}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(mix_seed(seed, rank, -1)),
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None, **extra)


def loader_error_message(error: BaseException) -> str:
    """The message of an error a loader worker raised. The DataLoader re-raises it in the training process with
    the worker's traceback in front ("Caught X in DataLoader worker process N. Original Traceback ..."); the
    worker's own message, which names the broken file, is what follows the traceback's last ``X: ``."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    if text.startswith(f"Caught {type(error).__name__} in DataLoader worker") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text
