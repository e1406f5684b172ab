"""The cache loader: every sample once per epoch, reproducible order, exact resume, labels aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachetrain.cache import CacheReader, StoreInfo, plan_layout, write_store
from cachetrain.config import LoaderConfig
from cachetrain.loader import CacheSource

N, SHAPE = 300, (2, 3, 3)


def make_store(path, n=N, chunk=32, codec="zstd", offset=0):
    """Sample i's features are all equal to i + offset (exact in fp16 below 2048), so a batch names its samples."""
    x = offset + torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, *SHAPE).contiguous()
    info = StoreInfo(stage=0, k=1, split=path.stem, fingerprint="fp", weights_hash="w", input_fingerprint="i",
                     dtype="float16", codec=codec, level=1, num_samples=n, sample_shape=SHAPE, chunk_samples=chunk)
    layout = plan_layout(info.sample_bytes, chunk * info.sample_bytes / 2**20, n, chunk)

    def batches(start, size):
        for i in range(start, n, size):
            yield x[i:i + size], None

    write_store(path, info, np.arange(n) % 10, torch.nn.Identity(), batches, layout, torch.device("cpu"))
    return CacheReader(path, "fp")


@pytest.fixture(scope="module", params=["zstd", "none"])
def readers(tmp_path_factory, request):
    """Both read paths: zstd chunks decoded (WorkerFeed), uncompressed chunk files memory-mapped (MemmapFeed)."""
    d = tmp_path_factory.mktemp("stores")
    return (make_store(d / "train.zarr", codec=request.param), make_store(d / "test.zarr", n=70, codec=request.param))


def source(readers, workers=0, order="quasi_random", seed=3):
    cfg = LoaderConfig(order=order, window_chunks=3, workers=workers, prefetch_chunks=2)
    return CacheSource(*readers, cfg, seed=seed, device=torch.device("cpu"))


def sample_ids(batches):
    out = []
    for x, y in batches:
        ids = x[:, 0, 0, 0].long()
        assert torch.equal(x, ids[:, None, None, None].float().expand_as(x))  # whole samples, not mixed
        assert torch.equal(y, ids % 10)  # labels travel with their samples
        out.append(ids)
    return torch.cat(out).numpy()


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


def test_resume_mid_epoch_yields_the_rest_of_the_same_epoch(readers):
    full = sample_ids(source(readers).train_batches(5, 40))
    rest = sample_ids(source(readers).train_batches(5, 40, start_batch=3))
    assert np.array_equal(rest, full[120:])


def test_eval_batches_are_in_sample_order_from_any_start(readers):
    src = source(readers, workers=1)
    assert np.array_equal(sample_ids(src.eval_batches("test", 16)), np.arange(70))
    assert np.array_equal(sample_ids(src.eval_batches("train", 64, start=250)), np.arange(250, N))


def test_feature_augmentation_changes_batches_reproducibly(readers):
    cfg = LoaderConfig(workers=0, window_chunks=3)
    aug = lambda: CacheSource(*readers, cfg, seed=3, device=torch.device("cpu"), crop_padding=1, flip=True)  # noqa
    plain = next(source(readers).train_batches(0, 64))[0]
    a, b = next(aug().train_batches(0, 64))[0], next(aug().train_batches(0, 64))[0]
    assert torch.equal(a, b) and a.shape == plain.shape
    ids = plain[:, 0, 0, 0]
    nonzero = ids > 0  # sample 0 is all zeros anyway
    assert not (plain[nonzero] == 0).any()
    assert (a[nonzero] == 0).any(dim=(1, 2, 3)).float().mean() > 0.5  # most samples got a zero-padded border
    assert torch.equal(a.amax(dim=(1, 2, 3))[nonzero], ids[nonzero])  # and kept their own values


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("left", [1, 2, 3, 5])
def test_abandoning_an_epoch_midway_returns_promptly(readers, left, background, monkeypatch):
    """A consumer that stops early (a caching run ending mid-split, an exception in a training step) must not
    leave the assembling thread blocked on a full queue."""
    import threading
    import time

    import cachetrain.loader as loader_module

    threaded = []
    run = loader_module.in_background
    monkeypatch.setattr(loader_module, "in_background", lambda items, depth: threaded.append(1) or run(items, depth))
    src = source(readers)
    src.loaders["train"].background = background
    batches = src.train_batches(0, 25)
    n_batches = -(-N // 25)
    for _ in range(n_batches - left):
        next(batches)
    assert bool(threaded) == background  # the path under test
    t0 = time.perf_counter()
    batches.close()  # what a `break` or an exception in the loop body does to the generator
    assert time.perf_counter() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name == "cache-loader"]


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_a_cpu_step_gets_its_batches_from_its_own_thread_with_chunks_read_ahead(tmp_path, monkeypatch, order):
    """On a CPU host the gather runs in the consumer's thread (a thread beside the step stalled its OpenMP
    team), and before batch b is gathered the kernel is asked for the chunks batch b+1 reads, at most two
    batches' worth at a time (a random order touches every chunk in its first batch)."""
    import threading

    from cachetrain.feeds import MemmapFeed
    from cachetrain.loader import CacheLoader, batch_plan

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
    budget = -(-2 * 40 // 32)
    between = np.split(np.array([e[0] == "ahead" for e in events]), np.flatnonzero([e[0] == "yield" for e in events]))
    assert between[0].sum() <= 2 * budget and max(part.sum() for part in between[1:]) <= budget  # batch 0 asks for 0 and 1
    if order == "sequential":  # each chunk asked for a batch before the one that first reads it
        first_get = {c: i for i, e in reversed(list(enumerate(events))) if e[0] == "get" for c in [e[1]]}
        yields = [i for i, e in enumerate(events) if e[0] == "yield"]
        for c, i in first_get.items():
            b = next(k for k, y in enumerate(yields) if y > i)  # the batch that first reads c
            assert events.index(("ahead", c)) < (yields[b - 1] if b > 0 else i)


def test_a_chunk_is_read_ahead_once_per_mapping(tmp_path):
    reader = make_store(tmp_path / "train.zarr", codec="none")
    assert reader.will_need(1)  # the real madvise
    assert reader._advised == {1} and list(reader._maps) == [1]
    view = reader.chunk_view(1)
    assert not reader.will_need(1)
    assert reader.chunk_view(1) is view  # not mapped again
    zstd = make_store(tmp_path / "z.zarr", codec="zstd")
    assert not zstd.will_need(0)  # nothing to map: decoded stores are read ahead by their worker processes
    assert not zstd._advised and not zstd._maps


def test_a_truncated_chunk_file_is_an_error_naming_it(tmp_path):
    from cachetrain.cache import CacheError

    reader = make_store(tmp_path / "train.zarr", codec="none")
    path = reader.chunk_path(2)
    path.write_bytes(path.read_bytes()[:100])  # what a power cut can leave of a file renamed into place
    with pytest.raises(CacheError, match=r"chunk 2 \(samples 64-95\) is 100 bytes, expected"):
        reader.chunk_view(2)


@pytest.mark.parametrize("background", [True, False])
def test_an_error_while_assembling_reaches_the_consumer(readers, monkeypatch, background):
    from cachetrain.cache import CacheError

    src = source(readers)
    src.loaders["train"].background = background
    reader = src.readers["train"]
    monkeypatch.setattr(type(reader), "chunk_view", lambda self, c: (_ for _ in ()).throw(CacheError("boom")))
    monkeypatch.setattr(type(reader), "read_chunk", lambda self, c: (_ for _ in ()).throw(CacheError("boom")))
    with pytest.raises(CacheError, match="boom"):
        list(src.train_batches(0, 64))


def test_parallel_gather_copies_the_same_samples_as_the_serial_one():
    from concurrent.futures import ThreadPoolExecutor

    from cachetrain.loader import PARALLEL_BYTES, gather

    class Feed:  # chunks of 7 samples over one tensor
        def get(self, c):
            return data[c * 7:(c + 1) * 7]

    data = torch.randn(600, 32, 32, 32)
    idx = np.sort(np.random.default_rng(0).choice(len(data), 300, replace=False))
    serial, parallel = torch.empty(300, 32, 32, 32), torch.full((300, 32, 32, 32), float("nan"))
    assert parallel.nbytes > PARALLEL_BYTES  # the threaded path is the one taken
    used = gather(Feed(), idx, 7, serial)
    with ThreadPoolExecutor(3) as pool:
        assert gather(Feed(), idx, 7, parallel, pool, 3) == used
    assert torch.equal(parallel, serial) and torch.equal(serial, data[torch.from_numpy(idx)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.uint8])
def test_gather_copies_every_storage_dtype_exactly(dtype):
    from cachetrain.loader import gather

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
    epoch on a GPU host), yet two epochs iterated at the same time each get their own."""
    loader = source(readers).loaders["train"]
    order = np.arange(N)
    list(loader.host_batches(order, 64))
    ring = loader._rings[64]
    again = {x.data_ptr() for x, _ in loader.host_batches(order, 64)}
    assert loader._rings[64] is ring and again <= {b.data_ptr() for b in ring}  # the same buffers, reused
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
    Two views whose features differ by 1000 tell an epoch's chunks from a stale one's."""
    from cachetrain.loader import CacheLoader

    views = [make_store(tmp_path / "a.zarr"), make_store(tmp_path / "b.zarr", offset=1000)]
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
    pids = [w.pid for w in loader._decoders[0]._iterator._workers]
    epoch_values(rng.permutation(N), view=1, stop=1)  # abandoned after two batches, chunks still queued
    order = rng.permutation(N)
    values = epoch_values(order, view=0)
    assert np.array_equal(values, np.concatenate([np.sort(order[i:i + 25]) for i in range(0, N, 25)]))
    assert [w.pid for w in loader._decoders[0]._iterator._workers] == pids  # the same processes


def test_a_decoding_error_retires_the_workers(tmp_path):
    from cachetrain.loader import CacheLoader

    reader = make_store(tmp_path / "a.zarr")
    loader = CacheLoader(reader, torch.device("cpu"), workers=1, prefetch_chunks=2)
    list(loader.host_batches(np.arange(N), 50))
    assert loader._decoders is not None
    reader.chunk_path(3).write_bytes(b"not zstd")  # reading fails in the worker process
    with pytest.raises(ValueError, match="checksum"):
        list(loader.host_batches(np.arange(N), 50))
    assert loader._decoders is None  # not handed to the next epoch


def test_two_epochs_at_once_with_decoding_workers(tmp_path):
    from cachetrain.loader import CacheLoader

    loader = CacheLoader(make_store(tmp_path / "train.zarr"), torch.device("cpu"), workers=1, prefetch_chunks=2)
    a, b = loader.host_batches(np.arange(N), 50), loader.host_batches(np.arange(N)[::-1].copy(), 50)
    ids_a, ids_b = [], []
    for (xa, _), (xb, _) in zip(a, b):  # interleaved: the second epoch cannot share the persistent workers
        ids_a.append(xa[:, 0, 0, 0].long().clone())
        ids_b.append(xb[:, 0, 0, 0].long().clone())
    assert np.array_equal(torch.cat(ids_a).numpy(), np.arange(N))
    assert np.array_equal(np.sort(torch.cat(ids_b).numpy()), np.arange(N))


@pytest.mark.parametrize("augment", [False, True])
def test_batches_come_channels_last_as_a_frozen_forward_gives_them(readers, augment):
    """The step after the cache must see the layout the recompute path hands it: NCHW-fed steps took
    up to 1.15x as long on the CPU (benchmarks/layout_bench.py)."""
    src = source(readers)
    src.padding, src.flip = (1, True) if augment else (0, False)
    for x, _ in src.train_batches(0, 64):
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(src.eval_batches("test", 32)))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_mappings_are_capped_by_the_open_file_limit_and_evicted_least_recently_used(tmp_path, monkeypatch):
    """Before Python 3.13 every mapping holds an open file: a store of more chunks than the soft limit on
    open files allows must still read, remapping what it evicted."""
    import sys

    import cachetrain.cache.reader as reader_module

    if sys.version_info < (3, 13):
        monkeypatch.setattr(reader_module.resource, "getrlimit", lambda which: (64, 64))
        monkeypatch.setattr(reader_module.resource, "setrlimit", lambda which, limits: pytest.fail("above hard"))
        assert reader_module._max_maps() == 16  # max(16, 64 // 8)
    reader = make_store(tmp_path / "train.zarr", codec="none", chunk=8)  # 38 chunks
    reader._max_maps = 4
    for c in (0, 1, 2, 3):
        reader.will_need(c)
    reader.chunk_view(0)  # used again: now the most recent
    reader.chunk_view(4)
    assert list(reader._maps) == [2, 3, 0, 4] and reader._advised == {0, 2, 3}  # 1 went, and its advice with it
    ids = torch.cat([reader.chunk_view(c)[:, 0, 0, 0] for c in range(reader.info.num_chunks)]).long()
    assert torch.equal(ids, torch.arange(N)) and len(reader._maps) == 4
