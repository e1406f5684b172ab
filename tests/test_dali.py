"""DALI backends, run CPU-only (device_id=None) as they can be without a GPU: same samples per batch as
the numpy loader, augmentation within bounds, image folders through DALI decoding, a clear error
when DALI is missing. (GPU placement, `mixed` decoding and the CUDA copy path need a GPU.)"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from cachetrain.cache import plan_layout
from cachetrain.config import LoaderConfig
from cachetrain.cache.source import CacheSource
from tests.conftest import STORE_N as N, make_store

import nvidia.dali  # noqa: F401  - a test dependency: missing, this module fails rather than skips


@pytest.fixture(scope="module")
def readers(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return make_store(d / "train.zarr"), make_store(d / "test.zarr", n=70)


def source(readers, backend, **kw):
    cfg = LoaderConfig(backend=backend, window_chunks=3, workers=2 if backend == "dali" else 0)
    return CacheSource(*readers, cfg, seed=11, device=torch.device("cpu"), **kw)


def batches_of_ids(batches):
    return [x[:, 0, 0, 0].long().tolist() for x, _ in batches]


@pytest.mark.slow
def test_dali_yields_the_same_batches_as_numpy_for_each_epoch(readers):
    numpy_src, dali_src = source(readers, "numpy"), source(readers, "dali")
    for epoch in (0, 1):  # consecutive epochs reuse one DALI pipeline
        a = batches_of_ids(numpy_src.train_batches(epoch, 64))
        b = batches_of_ids(dali_src.train_batches(epoch, 64))
        assert a == b
        assert sorted(sum(b, [])) == list(range(N)) and len(b[-1]) == N % 64  # short last batch, none dropped
    assert batches_of_ids(dali_src.train_batches(3, 64, start_batch=2)) == \
        batches_of_ids(numpy_src.train_batches(3, 64, start_batch=2))


def test_dali_labels_travel_with_samples(readers):
    for x, y in source(readers, "dali").train_batches(0, 50):
        assert torch.equal(y, x[:, 0, 0, 0].long() % 10) and y.dtype == torch.int64 and x.dtype == torch.float32


def test_dali_feature_augmentation_is_a_padded_crop_and_flip(tmp_path):
    # every sample holds the same position pattern, so every crop/flip is recognisable (written by the
    # caching pass: a store rewritten behind its back no longer matches its checksum manifest, and is refused)
    from cachetrain.cache import CacheReader, write_store

    class Pattern(torch.nn.Module):
        def forward(self, x):
            return (torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3) + 1).expand(len(x), 2, 3, 3)

    def pattern_store(path, n):
        reader = make_store(path, n=n)  # for its layout
        info = dataclasses.replace(reader.info, fingerprint="pattern")
        layout = plan_layout(info.sample_bytes, info.chunk_samples * info.sample_bytes / 2**20, n, info.chunk_samples)
        write_store(path, info, reader.labels, Pattern(), lambda start, size: ((torch.zeros(min(size, n - i), 2, 3, 3),
                    None) for i in range(start, n, size)), layout, torch.device("cpu"))
        return CacheReader(path, "pattern")

    reader_pair = (pattern_store(tmp_path / "train.zarr", N), pattern_store(tmp_path / "test.zarr", 70))
    src = source(reader_pair, "dali", crop_padding=1, flip=True)
    base = torch.arange(9, dtype=torch.float32).reshape(3, 3) + 1
    padded = F.pad(base, (1, 1, 1, 1))
    candidates = [v for dy in range(3) for dx in range(3) for f in (False, True)
                  for v in [padded[dy:dy + 3, dx:dx + 3].flip(-1) if f else padded[dy:dy + 3, dx:dx + 3]]]
    seen = set()
    for x, _ in src.train_batches(0, 100):
        for sample in x[:, 0]:
            match = [i for i, c in enumerate(candidates) if torch.equal(sample, c)]
            assert match, sample
            seen.add(match[0])
    assert len(seen) > 6  # many different offsets and flips were drawn


def test_missing_dali_is_one_line_naming_the_extra(readers, monkeypatch):
    from cachetrain.errors import DaliMissing
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now raises ImportError
    with pytest.raises(DaliMissing, match=r"install it with: pip install 'cachetrain\[dali\]'"):
        source(readers, "dali")
