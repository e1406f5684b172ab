"""Cache stores: write then read is exact, layouts are whole chunks, incomplete or stale stores are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from cachetrain.cache import (CacheError, CacheReader, CacheState, StoreInfo, plan_layout, store_state,
                              write_store)
from cachetrain.cache.manifest import chunk_file
from cachetrain.cache.writer import missing_chunks

SHAPE = (4, 6, 6)


class Doubler(torch.nn.Module):
    """A 'stage' whose output is known exactly, counting its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return 2 * x


def make_info(n=100, chunk=16, dtype="float16", codec="zstd", fp="abc") -> StoreInfo:
    return StoreInfo(stage=0, k=2, split="train", fingerprint=fp, weights_hash="w", input_fingerprint="i",
                     dtype=dtype, codec=codec, level=3, num_samples=n, sample_shape=SHAPE, chunk_samples=chunk)


def inputs(n=100):
    return torch.from_numpy(np.random.default_rng(0).random((n, *SHAPE), dtype=np.float32))


def batches_of(x):
    def batches(start, size):
        for i in range(start, len(x), size):
            yield x[i:i + size], torch.zeros(len(x[i:i + size]), dtype=torch.long)
    return batches


@pytest.mark.parametrize("dtype, codec", [("float16", "zstd"), ("float32", "none"), ("bfloat16", "zstd")])
def test_write_then_read_is_exact(tmp_path, dtype, codec):
    x, info = inputs(), make_info(dtype=dtype, codec=codec)
    labels = np.arange(100) % 7
    layout = plan_layout(info.sample_bytes, 16 * info.sample_bytes / 2**20, 100, 32)
    info = make_info(dtype=dtype, codec=codec, chunk=layout.chunk_samples)
    n = write_store(tmp_path / "s.zarr", info, labels, Doubler(), batches_of(x), layout, torch.device("cpu"))
    assert n == 100
    reader = CacheReader(tmp_path / "s.zarr", "abc")
    got = torch.cat([reader.read_chunk(c) for c in range(info.num_chunks)])
    assert got.dtype == {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    assert torch.equal(got, (2 * x).to(got.dtype))
    assert np.array_equal(reader.labels, labels)
    meta = json.loads((tmp_path / "s.zarr" / "features" / "zarr.json").read_text())
    names = [c["name"] for c in meta["codecs"]]
    assert names[-1] == "crc32c" and ("zstd" in names) == (codec == "zstd")
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [info.chunk_samples, *SHAPE]


def test_layout_chunks_hold_whole_samples_in_range():
    big = plan_layout(sample_bytes=3_210_000, chunk_mib=4, num_samples=1_281_167, batch_size=256)
    assert big.chunk_samples == 1 and big.forward_batch == 256 and big.group_chunks == 256
    small = plan_layout(sample_bytes=1568, chunk_mib=4, num_samples=60000, batch_size=256)
    assert small.chunk_samples % 256 == 0 and 1 <= small.chunk_samples * 1568 / 2**20 <= 8
    assert small.forward_batch == 256 and small.group_chunks == 1
    mid = plan_layout(sample_bytes=50176, chunk_mib=4, num_samples=60000, batch_size=256)
    assert mid.chunk_samples == 84 and mid.group_chunks == 3 and mid.forward_batch == 252


def test_incomplete_store_is_never_read_and_resumes_missing_chunks_only(tmp_path):
    x, info, layout = inputs(), make_info(), plan_layout(4 * 36 * 2, 16 * 288 / 2**20, 100, 16)
    path = tmp_path / "s.zarr"
    stage = Doubler()
    write_store(path, info, np.zeros(100), stage, batches_of(x), layout, torch.device("cpu"))
    # simulate a crash: the flag never got set and two chunk files never got written
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["complete"] = False
    array = group["features"]
    for c in (2, 5):
        (path / "features" / array.metadata.encode_chunk_key((c, 0, 0, 0))).unlink()
    assert store_state(path, "abc")[0] is CacheState.WRITING
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(path, "abc")
    assert missing_chunks(path, info) == [2, 5]
    before = {p: p.stat().st_mtime_ns for p in (path / "features" / "c").rglob("*") if p.is_file()}
    stage.calls = 0
    n = write_store(path, info, np.zeros(100), stage, batches_of(x), layout, torch.device("cpu"))
    assert n == 32 and stage.calls == 2  # only the two missing groups were recomputed
    after = {p: p.stat().st_mtime_ns for p in (path / "features" / "c").rglob("*") if p.is_file()}
    assert all(after[p] == t for p, t in before.items())  # no other chunk file was rewritten
    got = torch.cat([CacheReader(path, "abc").read_chunk(c) for c in range(info.num_chunks)])
    assert torch.equal(got, (2 * x).half())


def test_stale_store_is_refused_with_both_fingerprints(tmp_path):
    x, info, layout = inputs(), make_info(), plan_layout(288, 16 * 288 / 2**20, 100, 16)
    write_store(tmp_path / "s.zarr", info, np.zeros(100), Doubler(), batches_of(x), layout, torch.device("cpu"))
    with pytest.raises(CacheError, match="stale cache: fingerprint abc does not match the current checkpoint \\(xyz\\)"):
        CacheReader(tmp_path / "s.zarr", "xyz", rebuild_hint="run: cachetrain cache --j 0")


def test_rewriting_with_new_fingerprint_replaces_the_store(tmp_path):
    x, layout = inputs(), plan_layout(288, 16 * 288 / 2**20, 100, 16)
    write_store(tmp_path / "s.zarr", make_info(fp="old"), np.zeros(100), Doubler(), batches_of(x), layout,
                torch.device("cpu"))
    n = write_store(tmp_path / "s.zarr", make_info(fp="new"), np.zeros(100), torch.nn.Identity(), batches_of(x),
                    layout, torch.device("cpu"))
    assert n == 100
    reader = CacheReader(tmp_path / "s.zarr", "new")
    assert torch.equal(reader.read_chunk(0), x[:16].half())


def test_writer_thread_errors_surface_in_the_caller(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)  # wrong shape: the background writer's zarr write fails

    x, info, layout = inputs(), make_info(), plan_layout(288, 16 * 288 / 2**20, 100, 16)
    with pytest.raises(IndexError):  # zarr rejects the shape in the writer thread; re-raised here
        write_store(tmp_path / "s.zarr", info, np.zeros(100), Bad(), batches_of(x), layout, torch.device("cpu"))
    assert store_state(tmp_path / "s.zarr", "abc")[0] is CacheState.WRITING


def test_a_missing_chunk_is_an_error_not_zeros(tmp_path):
    x, info, layout = inputs(), make_info(), plan_layout(288, 16 * 288 / 2**20, 100, 16)
    write_store(tmp_path / "s.zarr", info, np.zeros(100), Doubler(), batches_of(x), layout, torch.device("cpu"))
    reader = CacheReader(tmp_path / "s.zarr", "abc")
    reader.chunk_path(3).unlink()
    with pytest.raises(CacheError, match=r"chunk 3 \(samples 48-63\) is missing; run: cachetrain verify"):
        reader.read_chunk(3)


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_all_zero_chunks_are_written_and_read_back(tmp_path, codec):
    """A ReLU stage can output a chunk of zeros. zarr skips writing such chunks unless told otherwise,
    and that setting is not stored with the array: the writer must pass it again, or a finished store
    lacks those chunk files (and reads as unfinished forever)."""
    x, info = inputs(), make_info(codec=codec)
    x[:48] = 0  # chunks 0-2 (16 samples each) all zeros
    layout = plan_layout(info.sample_bytes, 16 * info.sample_bytes / 2**20, 100, 32)
    write_store(tmp_path / "s.zarr", info, np.zeros(100), Doubler(), batches_of(x), layout, torch.device("cpu"))
    assert missing_chunks(tmp_path / "s.zarr", info) == []
    assert store_state(tmp_path / "s.zarr", "abc")[0] is CacheState.COMPLETE
    reader = CacheReader(tmp_path / "s.zarr", "abc")
    got = torch.cat([reader.read_chunk(c) for c in range(info.num_chunks)])
    assert torch.equal(got, (2 * x).half())


def _spy_fsync(monkeypatch) -> list:
    import cachetrain.cache.writer as writer

    synced = []
    fsync = writer._fsync
    monkeypatch.setattr(writer, "_fsync", lambda p: synced.append(p) or fsync(p))
    return synced


def _layout(info):
    return plan_layout(info.sample_bytes, 16 * info.sample_bytes / 2**20, 100, 32)


def test_complete_is_set_only_once_everything_it_vouches_for_is_on_disk(tmp_path, monkeypatch):
    """A store marked COMPLETE must survive a power cut: every chunk file, the labels, every folder holding
    them and the metadata are fsynced before the `complete` flag is, and the flag itself after."""
    synced = _spy_fsync(monkeypatch)
    path = tmp_path / "s.zarr"
    info = make_info(codec="none")
    write_store(path, info, np.zeros(100, dtype=np.int64), Doubler(), batches_of(inputs()), _layout(info),
                torch.device("cpu"))
    flag = synced.index(path / "zarr.json")
    assert set(synced[:flag]) >= {p for p in path.rglob("*") if p != path / "zarr.json"} | {path, tmp_path}
    assert synced[flag:] == [path / "zarr.json", path]
    chunks = [p for p in (path / "features").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(chunks) == info.num_chunks
    assert all(synced.index(p) < synced.index(p.parent) for p in chunks)  # a file before the folder naming it


def test_a_resumed_pass_makes_the_interrupted_passes_chunks_durable_too(tmp_path, monkeypatch):
    """The pass that died may have written chunk files it never fsynced; the pass that completes the store
    fsyncs them before setting the flag, though it does not rewrite them."""
    path, info = tmp_path / "s.zarr", make_info(codec="none")
    write_store(path, info, np.zeros(100, dtype=np.int64), Doubler(), batches_of(inputs()), _layout(info),
                torch.device("cpu"))
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False  # as if it died before the flag
    array = zarr.open_array(str(path / "features"), mode="r")
    chunk_path = [chunk_file(path, array, c) for c in range(info.num_chunks)]
    chunk_path[1].unlink()
    synced = _spy_fsync(monkeypatch)
    assert write_store(path, info, np.zeros(100, dtype=np.int64), Doubler(), batches_of(inputs()), _layout(info),
                       torch.device("cpu")) == 32  # one forward group of 2 chunks (16 samples each)
    flag = synced.index(path / "zarr.json")
    assert set(chunk_path) <= set(synced[:flag])


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_a_chunk_file_cut_short_counts_as_missing(tmp_path, codec):
    """What a power cut can leave of a file zarr renamed into place before its data reached the disk."""
    path, info = tmp_path / "s.zarr", make_info(codec=codec)
    write_store(path, info, np.zeros(100, dtype=np.int64), Doubler(), batches_of(inputs()), _layout(info),
                torch.device("cpu"))
    file = chunk_file(path, zarr.open_array(str(path / "features"), mode="r"), 3)
    file.write_bytes(b"" if codec == "zstd" else file.read_bytes()[:-1])
    assert missing_chunks(path, info) == [3]
