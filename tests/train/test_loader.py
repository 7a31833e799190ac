"""Data order: a pure function of (seed, epoch), sharded per global batch, resumable mid-epoch."""

from __future__ import annotations

import pytest
import torch

from tests.train.conftest import toy_dataset
from vitkit.train import BatchLoader, epoch_permutation


def test_permutation_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_permutation(50, 3, 2), epoch_permutation(50, 3, 2))
    assert not torch.equal(epoch_permutation(50, 3, 2), epoch_permutation(50, 3, 3))
    assert not torch.equal(epoch_permutation(50, 3, 2), epoch_permutation(50, 4, 2))
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(epoch_permutation(50, 3, 2), torch.randperm(50, generator=torch.Generator().manual_seed(3002)))


def test_iteration_does_not_touch_the_global_rng():
    ds = toy_dataset(40)
    state = torch.get_rng_state()
    list(BatchLoader(ds, 8, shuffle=True, seed=1))
    assert torch.equal(state, torch.get_rng_state())


def test_shards_of_each_global_batch_make_up_the_batch():
    ds = toy_dataset(64)
    full = BatchLoader(ds, 16, shuffle=True, seed=5, drop_last=True)
    shards = [BatchLoader(ds, 16, shuffle=True, seed=5, drop_last=True, rank=r, world_size=2) for r in range(2)]
    for loader in (full, *shards):
        loader.set_epoch(3)
    for (x, y), (x0, y0), (x1, y1) in zip(full, *shards):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
        assert len(x0) == len(x1) == 8


def test_iter_from_skips_consumed_batches():
    ds = toy_dataset(48)
    loader = BatchLoader(ds, 8, shuffle=True, seed=2, drop_last=True)
    loader.set_epoch(1)
    all_batches = [y for _, y in loader]
    assert [y.tolist() for _, y in loader.iter_from(4)] == [y.tolist() for y in all_batches[4:]]


def test_uneven_global_batch_is_refused_for_training():
    with pytest.raises(ValueError, match="batch_size 15 does not split evenly across 2 processes"):
        BatchLoader(toy_dataset(40), 15, drop_last=True, world_size=2)


def test_eval_loader_keeps_every_image_once():
    ds = toy_dataset(37)
    seen = torch.cat([y for r in range(3) for _, y in BatchLoader(ds, 8, rank=r, world_size=3)])
    assert len(seen) == 37
    assert sorted(torch.cat([torch.arange(37)]).tolist()) == sorted(
        torch.cat([idx for r in range(3) for idx in BatchLoader(ds, 8, rank=r, world_size=3).local_indices()]).tolist()
    )
