"""Traversal orders are permutations and pure functions of (seed, epoch)."""

from __future__ import annotations

import numpy as np
import pytest

from cachetrain.orders import ORDERS, QuasiRandom, Sequential


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_every_order_is_a_permutation(name):
    order = ORDERS[name](1000, 64, 3, seed=1)
    for epoch in range(3):
        idx = order.indices(epoch)
        assert idx.dtype == np.int64 and np.array_equal(np.sort(idx), np.arange(1000))


@pytest.mark.parametrize("name", ["random", "quasi_random"])
def test_shuffled_orders_differ_across_epochs_and_repeat_for_same_seed(name):
    a, b = ORDERS[name](1000, 64, 3, seed=1), ORDERS[name](1000, 64, 3, seed=1)
    assert np.array_equal(a.indices(4), b.indices(4))
    assert not np.array_equal(a.indices(4), a.indices(5))
    assert not np.array_equal(a.indices(4), ORDERS[name](1000, 64, 3, seed=2).indices(4))


def test_sequential_ranks_by_hand():
    """10 samples in chunks of 4 (0-3, 4-7, 8-9) over 2 ranks: rank 0 reads chunks 0 and 2, rank 1 chunk 1."""
    assert Sequential(10, 4).indices(0).tolist() == list(range(10))
    assert Sequential(10, 4, rank=0, world=2).indices(3).tolist() == [0, 1, 2, 3, 8, 9]
    assert Sequential(10, 4, rank=1, world=2).indices(3).tolist() == [4, 5, 6, 7]


def test_quasi_random_windows_hold_whole_chunks():
    order = QuasiRandom(960, chunk_samples=64, window_chunks=3, seed=0)
    idx = order.indices(0)
    window = 64 * 3
    for start in range(0, 960, window):
        chunks = sorted(set((idx[start:start + window] // 64).tolist()))
        assert len(chunks) == 3  # a window draws from 3 chunks...
        members = np.concatenate([np.arange(c * 64, c * 64 + 64) for c in chunks])
        assert np.array_equal(np.sort(idx[start:start + window]), members)  # ...and holds them whole
        assert not np.array_equal(idx[start:start + window], members)  # shuffled inside the window


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_ranks_read_disjoint_whole_chunks_that_cover_the_epoch(name):
    world, n, cs = 3, 1000, 64
    parts = [ORDERS[name](n, cs, 2, seed=5, rank=r, world=world).indices(7) for r in range(world)]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    chunk_sets = [set((p // cs).tolist()) for p in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(chunk_sets) for b in chunk_sets[i + 1:])
    with pytest.raises(ValueError, match="rank 3 is not in"):
        ORDERS[name](n, cs, 2, seed=5, rank=3, world=3)


@pytest.mark.parametrize("name", sorted(ORDERS))
@pytest.mark.parametrize("n, cs, world", [(203, 8, 2), (203, 8, 3), (200, 8, 3), (20, 8, 3), (10, 8, 3), (203, 16, 4)])
def test_every_rank_computes_every_ranks_share_and_the_smallest_any_epoch_can_give(name, n, cs, world):
    """What the loss weights and the batch-size check under torchrun rest on: every rank's share size, as any
    rank computes it, is what that rank reads; and the smallest share is the worst over epochs, not better."""
    orders = [ORDERS[name](n, cs, 2, seed=5, rank=r, world=world) for r in range(world)]
    seen = []
    for epoch in range(60):
        sizes = [o.share_sizes(epoch) for o in orders]
        assert all(s == sizes[0] for s in sizes)  # the same on every rank, with no message
        assert sizes[0] == [len(o.indices(epoch)) for o in orders]
        seen.append(min(sizes[0]))
    assert {o.smallest_share() for o in orders} == {min(seen)}  # 60 epochs put the short chunk everywhere
