"""The cache loader: every sample once per epoch, reproducible order, exact resume, labels aligned."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

import cachetrain.cache.loader as loader_module
from cachetrain.cache import CacheError
from cachetrain.config import LoaderConfig
from cachetrain.cache.feeds import MemmapFeed
from cachetrain.cache.loader import PARALLEL_BYTES, CacheLoader, batch_plan, gather
from cachetrain.cache.source import CacheSource
from tests.conftest import STORE_N as N, child_pids, cut_short, make_store, sample_ids

# `N` and `make_store` stay importable from here for tests/test_dali.py until it imports them from conftest


@pytest.fixture(scope="module", params=["zstd", "none"])
def readers(tmp_path_factory, request):
    """Both read paths: zstd chunks decoded (WorkerFeed), uncompressed chunk files memory-mapped (MemmapFeed)."""
    d = tmp_path_factory.mktemp("stores")
    return (make_store(d / "train.zarr", codec=request.param), make_store(d / "test.zarr", n=70, codec=request.param))


def source(readers, workers=0, order="quasi_random", seed=3, **augment):
    cfg = LoaderConfig(order=order, window_chunks=3, workers=workers, prefetch_chunks=2)
    return CacheSource(*readers, cfg, seed=seed, device=torch.device("cpu"), **augment)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("order", ["quasi_random", "random", "sequential"])
def test_every_sample_exactly_once_per_epoch(readers, workers, order):
    ids = sample_ids(source(readers, workers, order).train_batches(epoch=0, batch_size=64))
    assert np.array_equal(np.sort(ids), np.arange(N))


def test_order_is_a_pure_function_of_seed_and_epoch(readers):
    a = sample_ids(source(readers, workers=0).train_batches(1, 50))
    b = sample_ids(source(readers, workers=2).train_batches(1, 50))
    c = sample_ids(source(readers).train_batches(2, 50))
    d = sample_ids(source(readers, seed=4).train_batches(1, 50))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert not np.array_equal(a, np.arange(N))


def test_sequential_batches_by_hand(readers):
    """The sequential order with no augmentation is the identity: batch b holds samples 64b..64b+63."""
    got = [x[:, 0, 0, 0].long().tolist() for x, _ in source(readers, order="sequential").train_batches(0, 64)]
    assert got == [list(range(0, 64)), list(range(64, 128)), list(range(128, 192)), list(range(192, 256)),
                   list(range(256, 300))]


def test_resume_mid_epoch_yields_the_rest_of_the_same_epoch(readers):
    full = sample_ids(source(readers).train_batches(5, 40))
    rest = sample_ids(source(readers).train_batches(5, 40, start_batch=3))
    assert np.array_equal(rest, full[120:])


def test_resume_mid_epoch_draws_the_same_augmentation(readers):
    """A resumed epoch's batches are bit-identical to the uninterrupted epoch's, crops and flips included."""
    full = [x.clone() for x, _ in source(readers, crop_padding=1, flip=True).train_batches(5, 40)]
    rest = [x.clone() for x, _ in source(readers, crop_padding=1, flip=True).train_batches(5, 40, start_batch=3)]
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3:], rest))


def test_eval_batches_are_in_sample_order_from_any_start(readers):
    src = source(readers, workers=1)
    assert np.array_equal(sample_ids(src.eval_batches("test", 16)), np.arange(70))
    assert np.array_equal(sample_ids(src.eval_batches("train", 64, start=250)), np.arange(250, N))


def test_feature_augmentation_changes_batches_reproducibly(readers):
    aug = lambda: source(readers, crop_padding=1, flip=True)  # noqa: E731
    plain = next(source(readers).train_batches(0, 64))[0]
    a, b = next(aug().train_batches(0, 64))[0], next(aug().train_batches(0, 64))[0]
    assert torch.equal(a, b) and a.shape == plain.shape
    ids = plain[:, 0, 0, 0]
    nonzero = ids > 0  # sample 0 is all zeros anyway
    assert not (plain[nonzero] == 0).any()
    assert (a[nonzero] == 0).any(dim=(1, 2, 3)).float().mean() > 0.5  # most samples got a zero-padded border
    assert torch.equal(a.amax(dim=(1, 2, 3))[nonzero], ids[nonzero])  # and kept their own values


def _close_in_a_thread(batches) -> threading.Event:
    """Close the generator (what a `break` or an exception in the loop body does) from a thread of its own,
    so a close that blocks fails the test instead of hanging it; the event is set once close() returned."""
    closed = threading.Event()
    threading.Thread(target=lambda: (batches.close(), closed.set()), daemon=True).start()
    return closed


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("left", [1, 2, 3, 5])
def test_abandoning_an_epoch_midway_returns_and_stops_its_thread(readers, left, background, monkeypatch):
    """A consumer that stops early (a caching run ending mid-split, an exception in a training step) must not
    leave the assembling thread blocked on a full queue, nor running."""
    threaded = []
    run = loader_module.in_background
    monkeypatch.setattr(loader_module, "in_background", lambda items, depth: threaded.append(1) or run(items, depth))
    src = source(readers)
    src.loaders["train"].background = background
    batches = src.train_batches(0, 25)
    for _ in range(-(-N // 25) - left):
        next(batches)
    assert bool(threaded) == background  # the path under test
    assert _close_in_a_thread(batches).wait(timeout=60), "closing an abandoned epoch blocked"
    assert not [t for t in threading.enumerate() if t.name == "cache-loader"]  # its thread has ended


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_a_cpu_step_gets_its_batches_from_its_own_thread_with_chunks_read_ahead(tmp_path, monkeypatch, order):
    """On a CPU host the gather runs in the consumer's thread (a thread beside the step stalled its OpenMP
    team), and before batch b is gathered the kernel is asked for the chunks batch b+1 reads, at most two
    batches' worth at a time (a random order touches every chunk in its first batch)."""
    reader = make_store(tmp_path / "train.zarr", codec="none")  # chunks of 32 samples
    events = []
    will_need = MemmapFeed.will_need
    monkeypatch.setattr(MemmapFeed, "will_need", lambda self, c: will_need(self, c) and not events.append(("ahead", c)))
    get = MemmapFeed.get
    monkeypatch.setattr(MemmapFeed, "get", lambda self, c: events.append(("get", c, threading.get_ident())) or
                        get(self, c))
    loader = CacheLoader(reader, torch.device("cpu"), workers=0)
    indices = np.arange(N) if order == "sequential" else np.random.default_rng(0).permutation(N)
    plan = batch_plan(indices, 40)
    for b, (x, _) in enumerate(loader.batches(indices, 40)):
        assert torch.equal(x[:, 0, 0, 0].long(), torch.from_numpy(plan[b]))
        events.append(("yield", b))
    assert {e[2] for e in events if e[0] == "get"} == {threading.get_ident()}  # gathered in this thread
    asked = [e[1] for e in events if e[0] == "ahead"]
    assert sorted(asked) == list(range(reader.info.num_chunks))  # every chunk, once
    budget = -(-2 * 40 // 32)  # 3 chunks: two batches' bytes
    between = np.split(np.array([e[0] == "ahead" for e in events]), np.flatnonzero([e[0] == "yield" for e in events]))
    assert between[0].sum() <= 2 * budget  # before batch 0: batch 0's chunks and batch 1's
    assert max(part.sum() for part in between[1:]) <= budget
    if order == "sequential":  # each chunk asked for a batch before the one that first reads it
        first_get = {c: i for i, e in reversed(list(enumerate(events))) if e[0] == "get" for c in [e[1]]}
        yields = [i for i, e in enumerate(events) if e[0] == "yield"]
        for c, i in first_get.items():
            b = next(k for k, y in enumerate(yields) if y > i)  # the batch that first reads c
            assert events.index(("ahead", c)) < (yields[b - 1] if b > 0 else i)


def test_a_chunk_is_mapped_and_read_ahead_once(tmp_path, mappings):
    """Asking the kernel to read a chunk ahead maps it (once) and issues one MADV_WILLNEED; asking again, or
    reading the chunk, neither maps it again nor asks again. Compressed stores map nothing."""
    reader = make_store(tmp_path / "train.zarr", codec="none")
    assert reader.will_need(1)  # the real madvise
    assert mappings.chunks(reader) == [1] and mappings.chunks(reader, "advised") == [1]
    view = reader.chunk_view(1)
    assert not reader.will_need(1)
    assert reader.chunk_view(1) is view
    assert mappings.chunks(reader) == [1] and mappings.chunks(reader, "advised") == [1]
    assert torch.equal(view[:, 0, 0, 0].long(), torch.arange(32, 64))
    zstd = make_store(tmp_path / "z.zarr", codec="zstd")
    assert not zstd.will_need(0)  # nothing to map: decoded stores are read ahead by their worker processes
    assert mappings.chunks(zstd) == [] and mappings.chunks(zstd, "advised") == []


def test_a_truncated_chunk_file_is_an_error_naming_it(tmp_path):
    reader = make_store(tmp_path / "train.zarr", codec="none")
    cut_short(reader.chunk_path(2), keep=100)  # what a power cut can leave of a file renamed into place
    with pytest.raises(CacheError, match=r"chunk 2 \(samples 64-95\) is 100 bytes, expected"):
        reader.chunk_view(2)


@pytest.mark.parametrize("background", [True, False])
def test_an_error_while_assembling_reaches_the_consumer(readers, monkeypatch, background):
    src = source(readers)
    src.loaders["train"].background = background
    reader = src.readers["train"]
    monkeypatch.setattr(type(reader), "chunk_view", lambda self, c: (_ for _ in ()).throw(CacheError("boom")))
    monkeypatch.setattr(type(reader), "read_chunk", lambda self, c: (_ for _ in ()).throw(CacheError("boom")))
    with pytest.raises(CacheError, match="boom"):
        list(src.train_batches(0, 64))


class _CountingPool:
    """A ThreadPoolExecutor that counts the parts it was handed."""

    def __init__(self, threads):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.parts = ThreadPoolExecutor(threads), 0

    def map(self, fn, parts):
        parts = list(parts)
        self.parts += len(parts)
        return self.pool.map(fn, parts)


def test_parallel_gather_copies_the_same_samples_as_the_serial_one():
    class Feed:  # chunks of 7 samples over one tensor
        def get(self, c):
            return data[c * 7:(c + 1) * 7]

    data = torch.randn(600, 32, 32, 32)
    idx = np.sort(np.random.default_rng(0).choice(len(data), 300, replace=False))
    serial, parallel = torch.empty(300, 32, 32, 32), torch.full((300, 32, 32, 32), float("nan"))
    assert parallel.nbytes > PARALLEL_BYTES  # a batch big enough to be split
    used = gather(Feed(), idx, 7, serial)
    pool = _CountingPool(3)
    assert gather(Feed(), idx, 7, parallel, pool, 3) == used
    assert pool.parts == 3  # the threaded path copied it, in three parts
    assert torch.equal(parallel, serial) and torch.equal(serial, data[torch.from_numpy(idx)])
    pool.pool.shutdown()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.uint8])
def test_gather_copies_every_storage_dtype_exactly(dtype):
    data = (torch.randn(50, 3, 4, 4) * 100).to(dtype)

    class Feed:  # chunks of 8 samples
        def get(self, c):
            return data[c * 8:(c + 1) * 8]

    idx = np.array([0, 3, 7, 8, 9, 30, 41, 49])
    out = torch.empty(len(idx), 3, 4, 4, dtype=dtype)
    assert gather(Feed(), idx, 8, out) == [0, 1, 3, 5, 6]
    assert torch.equal(out, data[torch.from_numpy(idx)])


def test_batch_buffers_outlive_an_epoch_but_are_never_shared(readers):
    """The ring of batch buffers is allocated once (pinning it anew each epoch cost more than a short
    epoch on a GPU host), yet two epochs iterated at the same time each get their own. Seen from outside:
    the address of the buffer each batch comes in (batches of one epoch are kept alive meanwhile, so a
    new allocation could not land on an old address)."""
    loader = source(readers).loaders["train"]
    order = np.arange(N)
    first = [x for x, _ in loader.host_batches(order, 64)]  # 5 batches
    buffers = {x.data_ptr() for x in first}
    assert len(buffers) < len(first)  # the ring is reused within an epoch...
    for _ in range(2):
        again = [(x.data_ptr(), x[:, 0, 0, 0].long().clone()) for x, _ in loader.host_batches(order, 64)]
        assert {p for p, _ in again} <= buffers  # ...and across epochs: no buffer was allocated since
        assert np.array_equal(torch.cat([ids for _, ids in again]).numpy(), np.arange(N))  # still correct
    a, b = loader.host_batches(order, 64), loader.host_batches(order, 64)
    xa, _ = next(a)
    xb, _ = next(b)
    assert xa.data_ptr() != xb.data_ptr()
    assert torch.equal(xa[:, 0, 0, 0].long(), torch.arange(64)) and torch.equal(xb[:, 0, 0, 0].long(), torch.arange(64))
    a.close()
    b.close()


def test_decoding_workers_persist_across_epochs_and_drop_what_an_abandoned_epoch_left(tmp_path):
    """Compressed stores are decoded by worker processes that serve every epoch (restarting them stalled
    each epoch's start); an epoch abandoned midway leaves decoded chunks queued, which the next must drop.
    Two views whose features differ by 1000 tell an epoch's chunks from a stale one's. The workers are
    seen from outside, as this process's children."""
    views = [make_store(tmp_path / "a.zarr"), make_store(tmp_path / "b.zarr", offset=1000)]
    before = child_pids()
    loader = CacheLoader(views, torch.device("cpu"), workers=2, prefetch_chunks=2)
    rng = np.random.default_rng(0)
    chunks = views[0].info.num_chunks

    def epoch_values(order, view, stop=None):
        out = []
        for b, (x, _) in enumerate(loader.host_batches(order, 25, np.full(chunks, view))):
            out.append(x[:, 0, 0, 0].long().clone())
            if b == stop:
                break
        return torch.cat(out).numpy()

    assert np.array_equal(np.sort(epoch_values(rng.permutation(N), view=1)), np.arange(N) + 1000)
    workers = child_pids() - before
    assert len(workers) == 2  # still alive after their epoch ended
    epoch_values(rng.permutation(N), view=1, stop=1)  # abandoned after two batches, chunks still queued
    order = rng.permutation(N)
    values = epoch_values(order, view=0)
    assert np.array_equal(values, np.concatenate([np.sort(order[i:i + 25]) for i in range(0, N, 25)]))
    assert child_pids() - before == workers  # the same processes, and no others


def test_after_a_decoding_error_the_next_epoch_gets_fresh_workers(tmp_path):
    """A worker whose epoch failed (a chunk that did not decode, a worker killed) is not handed to the next
    epoch: that one starts its own workers, and reads correctly once the chunk is repaired."""
    reader = make_store(tmp_path / "a.zarr")
    before = child_pids()
    loader = CacheLoader(reader, torch.device("cpu"), workers=1, prefetch_chunks=2)
    assert np.array_equal(sample_ids(loader.host_batches(np.arange(N), 50)), np.arange(N))
    first = child_pids() - before
    assert len(first) == 1
    good = reader.chunk_path(3).read_bytes()
    reader.chunk_path(3).write_bytes(b"not zstd")  # reading fails in the worker process
    with pytest.raises(CacheError, match=r"chunk 3 \(samples 96-127\)"):
        list(loader.host_batches(np.arange(N), 50))
    reader.chunk_path(3).write_bytes(good)  # repaired
    epoch = loader.host_batches(np.arange(N), 50)
    ids = [sample_ids([next(epoch)])]
    serving = child_pids() - before - first
    ids += [sample_ids(epoch)]
    assert len(serving) == 1  # a new worker serves this epoch
    assert np.array_equal(np.concatenate(ids), np.arange(N))


def test_two_epochs_at_once_with_decoding_workers(tmp_path):
    """Two epochs iterated at the same time, once the loader has persistent workers to hand out: the second
    cannot share them (each would drain the other's chunks), so it gets workers of its own."""
    loader = CacheLoader(make_store(tmp_path / "train.zarr"), torch.device("cpu"), workers=1, prefetch_chunks=2)
    assert np.array_equal(sample_ids(loader.host_batches(np.arange(N), 50)), np.arange(N))  # workers now persist
    a, b = loader.host_batches(np.arange(N), 50), loader.host_batches(np.arange(N)[::-1].copy(), 50)
    ids_a, ids_b = [], []
    for (xa, _), (xb, _) in zip(a, b):  # interleaved
        ids_a.append(xa[:, 0, 0, 0].long().clone())
        ids_b.append(xb[:, 0, 0, 0].long().clone())
    assert np.array_equal(torch.cat(ids_a).numpy(), np.arange(N))
    assert np.array_equal(torch.cat(ids_b).numpy(), np.concatenate([np.arange(N - 50 * (i + 1), N - 50 * i)
                                                                    for i in range(N // 50)]))


@pytest.mark.parametrize("augment", [False, True])
def test_batches_come_channels_last_as_a_frozen_forward_gives_them(readers, augment):
    """The step after the cache must see the layout the recompute path hands it: NCHW-fed steps took
    up to 1.15x as long on the CPU (benchmarks/layout_bench.py)."""
    src = source(readers, **({"crop_padding": 1, "flip": True} if augment else {}))
    for x, _ in src.train_batches(0, 64):
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(src.eval_batches("test", 32)))
    assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="from Python 3.13 a mapping holds no open file, and the "
                    "cap (8192 mappings) is beyond a unit test's store")
def test_mappings_are_capped_by_the_open_file_limit_and_evicted_least_recently_used(tmp_path, monkeypatch, mappings):
    """Before Python 3.13 every mapping holds an open file: a store of more chunks than the soft limit on
    open files allows must still read, holding at most an eighth of that limit (16 here) open, and
    remapping what it evicted, least recently used first."""
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (64, 64))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: pytest.fail("raised above the hard limit"))
    reader = make_store(tmp_path / "train.zarr", codec="none", chunk=4)  # 75 chunks
    for c in range(16):
        assert reader.will_need(c)
    assert mappings.open_files(reader) == 16
    reader.chunk_view(0)  # used again: now the most recent
    reader.chunk_view(16)  # one mapping too many: 1, the least recently used, goes
    assert mappings.open_files(reader) == 16
    assert reader.will_need(1) and not reader.will_need(0)  # 1's read-ahead went with its mapping; 0's stayed
    assert mappings.chunks(reader) == [*range(17), 1]  # 1 mapped again, nothing else
    for c in range(reader.info.num_chunks):  # every chunk reads, though the store has more than 64 of them
        assert torch.equal(reader.chunk_view(c)[:, 0, 0, 0].long(), torch.arange(4 * c, 4 * c + 4))
        assert mappings.open_files(reader) <= 16
