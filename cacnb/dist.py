"""Distributed helpers that degrade to no-ops without a process group.

Everything here works in a plain single process (a notebook kernel, a CPU test) exactly as under torchrun: the
rank is 0, the world size 1, gathers are identities and reductions return their input.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist


# host_group(): a gloo group beside a default group of another backend (NCCL), made on first use
_HOST = {"group": None, "timeout_s": 600.0}


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(backend: Optional[str] = None, timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes in the environment and return this rank's device.

    Without torchrun's variables this is a no-op returning ``cuda`` (if available) or ``cpu``. The backend is
    NCCL when CUDA is available and gloo otherwise. ``timeout_s`` bounds process-group setup and every
    collective, so a dead peer raises instead of hanging forever.
    """
    cuda = torch.cuda.is_available()
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1 and not is_dist():
        return torch.device("cuda", get_local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(get_local_rank())
    device = torch.device("cuda", get_local_rank()) if cuda else torch.device("cpu")
    if not is_dist():
        backend = backend or ("nccl" if cuda else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
        _HOST["timeout_s"] = timeout_s
    return device


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()  # every group, the host group too
    _HOST["group"] = None


def host_group():
    """The process group for agreements between the ranks' host code: the default group when it is gloo, else a
    gloo group made on the first call (every rank must make that call at the same point, as for a collective).
    Its collectives carry CPU tensors and never touch a GPU: no device sync, nothing queued behind the step."""
    if dist.get_backend() == "gloo":
        return None
    if _HOST["group"] is None:
        _HOST["group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_HOST["timeout_s"]))
    return _HOST["group"]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (``flag`` itself for world size 1): one all-reduce of a CPU integer
    over :func:`host_group`, so it costs a network round trip between the hosts and no device sync."""
    if get_world_size() == 1:
        return bool(flag)
    box = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=host_group())
    return bool(box.item())


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def all_gather_nograd(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradient (identity for world size 1).

    Ranks may hold different numbers of rows (e.g. fewer negatives where an image was small): sizes are
    exchanged first and rows padded, so the result is exactly the concatenation in rank order.
    """
    world = get_world_size()
    if world == 1:
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_list = [int(s.item()) for s in sizes]
    most = max(sizes_list)
    if tensor.shape[0] < most:
        pad = tensor.new_zeros((most - tensor.shape[0],) + tuple(tensor.shape[1:]))
        tensor = torch.cat([tensor, pad], 0)
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor)
    return torch.cat([o[:s] for o, s in zip(out, sizes_list)], 0)


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; identity for world size 1)."""
    out = tensor.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / get_world_size()


def broadcast_object(obj, src: int = 0):
    """Send a picklable Python object from ``src`` to every rank (identity for world size 1)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` for world size 1)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics) to every rank (no-op for world size 1).

    DDP broadcasts buffers at the start of each forward, so after the last training forward every rank holds
    statistics of its own shard. Validation and the final state must use one set.
    """
    if get_world_size() == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src)
