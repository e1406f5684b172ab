"""Cache stores: write then read is exact, layouts are whole chunks, incomplete or stale stores are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from cachetrain.cache import CacheError, CacheReader, CacheState, plan_layout, store_state, write_store
from cachetrain.cache.manifest import chunk_file
from cachetrain.cache.writer import missing_chunks
from cachetrain.errors import Fix
from tests.conftest import Doubler, batches_of, cut_short, store_info

SHAPE = (4, 6, 6)  # 144 values: 288 bytes a sample in fp16; chunks of 16 samples, 7 chunks for 100 samples
CPU = torch.device("cpu")


def make_info(n=100, chunk=16, dtype="float16", codec="zstd", fp="abc"):
    return store_info(n, SHAPE, chunk, dtype=dtype, codec=codec, fp=fp)


def inputs(n=100):
    return torch.from_numpy(np.random.default_rng(0).random((n, *SHAPE), dtype=np.float32))


def layout(info, batch_size=32):
    """Chunks of 16 samples, computed `batch_size` samples (one or two chunks) per forward."""
    return plan_layout(info.sample_bytes, 16 * info.sample_bytes / 2**20, info.num_samples, batch_size)


def write(path, info, x=None, stage=None, labels=None, batch_size=32) -> int:
    x = inputs() if x is None else x
    labels = np.zeros(info.num_samples, dtype=np.int64) if labels is None else labels
    return write_store(path, info, labels, stage or Doubler(), batches_of(x), layout(info, batch_size), CPU)


def read_all(path, fp="abc") -> torch.Tensor:
    reader = CacheReader(path, fp)
    return torch.cat([reader.read_chunk(c) for c in range(reader.info.num_chunks)])


@pytest.mark.parametrize("dtype, codec", [("float16", "zstd"), ("float32", "none"), ("bfloat16", "zstd")])
def test_write_then_read_is_exact(tmp_path, dtype, codec):
    x, info = inputs(), make_info(dtype=dtype, codec=codec)
    labels = np.arange(100) % 7
    assert write(tmp_path / "s.zarr", info, x, labels=labels) == 100
    reader = CacheReader(tmp_path / "s.zarr", "abc")
    got = torch.cat([reader.read_chunk(c) for c in range(7)])
    assert got.dtype == {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    assert torch.equal(got, (2 * x).to(got.dtype))
    assert np.array_equal(reader.labels, labels)
    meta = json.loads((tmp_path / "s.zarr" / "features" / "zarr.json").read_text())
    names = [c["name"] for c in meta["codecs"]]
    assert names[-1] == "crc32c" and ("zstd" in names) == (codec == "zstd")
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [16, *SHAPE]


def test_layout_chunks_hold_whole_samples_in_range():
    big = plan_layout(sample_bytes=3_210_000, chunk_mib=4, num_samples=1_281_167, batch_size=256)
    assert big.chunk_samples == 1 and big.forward_batch == 256 and big.group_chunks == 256
    small = plan_layout(sample_bytes=1568, chunk_mib=4, num_samples=60000, batch_size=256)
    assert small.chunk_samples % 256 == 0 and 1 <= small.chunk_samples * 1568 / 2**20 <= 8
    assert small.forward_batch == 256 and small.group_chunks == 1
    mid = plan_layout(sample_bytes=50176, chunk_mib=4, num_samples=60000, batch_size=256)
    assert mid.chunk_samples == 84 and mid.group_chunks == 3 and mid.forward_batch == 252


def _chunk_files(path, info):
    array = zarr.open_array(str(path / "features"), mode="r")
    return [chunk_file(path, array, c) for c in range(info.num_chunks)]


def test_incomplete_store_is_never_read_and_resumes_missing_chunks_only(tmp_path):
    x, info, path = inputs(), make_info(), tmp_path / "s.zarr"
    stage = Doubler()
    write(path, info, x, stage, batch_size=16)
    # simulate a crash: the flag never got set and two chunk files never got written
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    files = _chunk_files(path, info)
    for c in (2, 5):
        files[c].unlink()
    assert store_state(path, "abc")[0] is CacheState.WRITING
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(path, "abc")
    assert missing_chunks(path, info) == [2, 5]
    before = {p: p.stat().st_mtime_ns for p in files if p.exists()}
    stage.calls = 0
    assert write(path, info, x, stage, batch_size=16) == 32  # samples 32-47 and 80-95
    assert stage.calls == 2  # only the two missing chunks were recomputed, one forward each
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # no other chunk file was rewritten
    assert torch.equal(read_all(path), (2 * x).half())


def test_stale_store_is_refused_with_both_fingerprints(tmp_path):
    write(tmp_path / "s.zarr", make_info())
    with pytest.raises(CacheError, match=r"stale cache: fingerprint abc does not match the current checkpoint \(xyz\)"):
        CacheReader(tmp_path / "s.zarr", "xyz", rebuild=Fix.of("cache", j=0))


def test_rewriting_with_new_fingerprint_replaces_the_store(tmp_path):
    x = inputs()
    write(tmp_path / "s.zarr", make_info(fp="old"), x)  # doubled
    assert write(tmp_path / "s.zarr", make_info(fp="new"), x, torch.nn.Identity()) == 100
    assert torch.equal(read_all(tmp_path / "s.zarr", "new"), x.half())  # every chunk from the new stage
    with pytest.raises(CacheError, match="stale"):
        CacheReader(tmp_path / "s.zarr", "old")


def test_writer_thread_errors_surface_in_the_caller(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)  # wrong shape: the background writer's zarr write fails

    with pytest.raises(IndexError):  # zarr rejects the shape in the writer thread; re-raised here
        write(tmp_path / "s.zarr", make_info(), stage=Bad())
    assert store_state(tmp_path / "s.zarr", "abc")[0] is CacheState.WRITING


def test_a_missing_chunk_is_an_error_not_zeros(tmp_path):
    write(tmp_path / "s.zarr", make_info())
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
    write(tmp_path / "s.zarr", info, x)
    assert all(p.is_file() for p in _chunk_files(tmp_path / "s.zarr", info))
    assert store_state(tmp_path / "s.zarr", "abc")[0] is CacheState.COMPLETE
    got = read_all(tmp_path / "s.zarr")
    assert torch.equal(got[:48], torch.zeros(48, *SHAPE, dtype=torch.float16))
    assert torch.equal(got, (2 * x).half())


def test_complete_is_set_only_once_everything_it_vouches_for_is_on_disk(tmp_path, fsyncs):
    """A store marked COMPLETE must survive a power cut: every chunk file, the labels, every folder holding
    them and the metadata are fsynced (seen at os.fsync) before the `complete` flag is, and the flag itself
    after."""
    path, info = (tmp_path / "s.zarr").resolve(), make_info(codec="none")
    write(path, info)
    flag = fsyncs.index(path / "zarr.json")
    assert set(fsyncs[:flag]) >= {p for p in path.rglob("*") if p != path / "zarr.json"} | {path, path.parent}
    assert fsyncs[flag:] == [path / "zarr.json", path]
    chunks = _chunk_files(path, info)
    assert len(chunks) == 7
    assert all(fsyncs.index(p) < fsyncs.index(p.parent) for p in chunks)  # a file before the folder naming it


def test_a_resumed_pass_makes_the_interrupted_passes_chunks_durable_too(tmp_path, fsyncs):
    """The pass that died may have written chunk files it never fsynced; the pass that completes the store
    fsyncs them before setting the flag, though it does not rewrite them."""
    path, info = (tmp_path / "s.zarr").resolve(), make_info(codec="none")
    write(path, info)
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False  # as if it died before the flag
    files = _chunk_files(path, info)
    files[1].unlink()
    fsyncs.clear()  # only what the resumed pass syncs
    assert write(path, info) == 32  # one forward group of 2 chunks (16 samples each)
    flag = fsyncs.index(path / "zarr.json")
    assert set(files) <= set(fsyncs[:flag])


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_a_chunk_file_cut_short_counts_as_missing(tmp_path, codec):
    """What a power cut can leave of a file zarr renamed into place before its data reached the disk."""
    path, info = tmp_path / "s.zarr", make_info(codec=codec)
    write(path, info)
    cut_short(_chunk_files(path, info)[3], keep=0 if codec == "zstd" else -1)
    assert missing_chunks(path, info) == [3]


@pytest.mark.parametrize("dtype", ["float16", "uint16", "float32", "uint8"])  # uint16: bfloat16's bits
def test_uncompressed_chunk_files_written_directly_are_the_ones_zarr_writes(tmp_path, dtype):
    """The writer skips zarr for uncompressed local stores (cachetrain/cache/writer.py `_RawChunks`); its
    files must be zarr's own, byte for byte, the short last chunk's padding included, and read back."""
    from zarr.codecs import Crc32cCodec

    from cachetrain.cache.writer import BackgroundWriter

    rng = np.random.default_rng(0)
    data = (rng.random((45, 3, 2, 2)) * 200).astype(dtype)  # 45 = 4 chunks of 12, the last one 9 short
    files = {}
    for how in ("direct", "zarr"):
        with zarr.config.set({"array.write_empty_chunks": True}):
            array = zarr.create_array(str(tmp_path / how), shape=data.shape, chunks=(12, 3, 2, 2), dtype=dtype,
                                      fill_value=0, compressors=[Crc32cCodec()])
        path = lambda c, a=array, h=how: tmp_path / h / a.metadata.encode_chunk_key((c, 0, 0, 0))  # noqa: E731
        # no chunk_path: zarr's own encode and write (as for an object store), to compare against
        writer = BackgroundWriter(array, path if how == "direct" else None)
        assert writer.direct == (how == "direct")  # the direct path applies to this layout
        writer.put(0, data[:24])
        writer.put(24, data[24:])
        writer.close()
        files[how] = {p.relative_to(tmp_path / how): p.read_bytes() for p in (tmp_path / how).rglob("*")
                      if p.is_file() and p.name != "zarr.json"}
        assert np.array_equal(zarr.open_array(str(tmp_path / how), mode="r")[:], data)
    assert len(files["direct"]) == 4 and files["direct"] == files["zarr"]
