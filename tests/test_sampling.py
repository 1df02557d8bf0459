"""InfiniteSampler sharding / reshuffling / resume, and the endless train loader's determinism."""
from __future__ import annotations

from itertools import islice

import pytest
import torch
from torch.utils.data import Dataset

from cacnb.data.sampling import InfiniteSampler, make_train_loader
from cacnb.data.transforms import seeded, split_key


def _take(sampler, count):
    return list(islice(iter(sampler), count))


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (12, 4), (5, 8)])
def test_shards_partition_each_pass_and_reshuffle(n, world):
    per_rank = -(-n // world)
    streams = [_take(InfiniteSampler(n, seed=3, rank=r, world_size=world), 3 * per_rank) for r in range(world)]
    orders = []
    for p in range(3):
        chunk = [idx for s in streams for idx, _ in s[p * per_rank:(p + 1) * per_rank]]
        assert len(chunk) == per_rank * world
        assert set(chunk) == set(range(n))  # every image once per pass; the rest is wrap-around padding
        if n % world == 0:
            assert sorted(chunk) == list(range(n))  # no duplicates when it divides
        orders.append([idx for idx, _ in streams[0][p * per_rank:(p + 1) * per_rank]])
    if per_rank > 2:
        assert orders[0] != orders[1] or orders[1] != orders[2]  # a new order each pass


def test_sample_seeds_unique_across_ranks_and_positions():
    seeds = [s for r in range(2) for _, s in _take(InfiniteSampler(7, seed=0, rank=r, world_size=2), 40)]
    assert len(set(seeds)) == len(seeds)


def test_same_seed_same_stream_other_seed_other_stream():
    a = _take(InfiniteSampler(20, seed=1), 50)
    assert a == _take(InfiniteSampler(20, seed=1), 50)
    assert a != _take(InfiniteSampler(20, seed=2), 50)


@pytest.mark.parametrize("start", [0, 1, 6, 7, 13, 40])
def test_start_resumes_the_same_stream(start):
    full = _take(InfiniteSampler(7, seed=5, rank=1, world_size=2), start + 20)
    assert _take(InfiniteSampler(7, seed=5, rank=1, world_size=2, start=start), 20) == full[start:]


def test_no_shuffle_is_in_order():
    assert [i for i, _ in _take(InfiniteSampler(4, seed=0, shuffle=False), 8)] == [0, 1, 2, 3, 0, 1, 2, 3]


class RandomItems(Dataset):
    """Each item: its index and a random draw that depends only on the item's sample seed."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, sample_seed = split_key(key)
        with seeded(sample_seed):
            return {"index": index, "draw": torch.rand(2)}


def _batches(loader, count):
    it = iter(loader)
    return [next(it) for _ in range(count)]


def _same(a, b):
    return all(torch.equal(x["index"], y["index"]) and torch.equal(x["draw"], y["draw"]) for x, y in zip(a, b))


def test_loader_is_independent_of_workers_and_resumes_exactly():
    ds = RandomItems(9)
    ref = _batches(make_train_loader(ds, 4, seed=0, num_workers=0), 6)
    with_workers = make_train_loader(ds, 4, seed=0, num_workers=2)
    assert with_workers.persistent_workers
    assert _same(ref, _batches(with_workers, 6))
    resumed = make_train_loader(ds, 4, seed=0, num_workers=0, start=2 * 4)
    assert _same(ref[2:], _batches(resumed, 4))
    # every batch holds fresh draws: a replayed (cycled) batch would repeat them
    draws = torch.cat([b["draw"] for b in ref])
    assert len({tuple(d.tolist()) for d in draws}) == len(draws)


def test_ranks_draw_different_items_and_randomness():
    ds = RandomItems(1)  # one image: every rank gets index 0, but never the same augmentation
    r0 = _batches(make_train_loader(ds, 2, seed=0, rank=0, world_size=2), 3)
    r1 = _batches(make_train_loader(ds, 2, seed=0, rank=1, world_size=2), 3)
    d0, d1 = torch.cat([b["draw"] for b in r0]), torch.cat([b["draw"] for b in r1])
    assert not any(torch.equal(a, b) for a in d0 for b in d1)


def test_loader_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    _batches(make_train_loader(RandomItems(5), 2, seed=0), 2)
    assert torch.equal(torch.rand(2), expected)
