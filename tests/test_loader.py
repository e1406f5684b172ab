"""The cache loader: every sample once per epoch, reproducible order, exact resume, labels aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachetrain.cache import CacheReader, StoreInfo, plan_layout, write_store
from cachetrain.config import LoaderConfig
from cachetrain.loader import CacheSource

N, SHAPE = 300, (2, 3, 3)


def make_store(path, n=N, chunk=32, codec="zstd"):
    """Sample i's features are all equal to i (exact in fp16 below 2048), so a batch names its samples."""
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, *SHAPE).contiguous()
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


@pytest.mark.parametrize("left", [1, 2, 3, 5])
def test_abandoning_an_epoch_midway_returns_promptly(readers, left):
    """A consumer that stops early (a caching run ending mid-split, an exception in a training step) must not
    leave the assembling thread blocked on a full queue."""
    import threading
    import time

    src = source(readers)
    batches = src.train_batches(0, 25)
    n_batches = -(-N // 25)
    for _ in range(n_batches - left):
        next(batches)
    t0 = time.perf_counter()
    batches.close()  # what a `break` or an exception in the loop body does to the generator
    assert time.perf_counter() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name == "cache-loader"]


def test_an_error_while_assembling_reaches_the_consumer(readers, monkeypatch):
    from cachetrain.cache import CacheError

    src = source(readers)
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
