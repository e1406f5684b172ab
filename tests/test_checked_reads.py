"""Checked reads: a chunk whose bytes are wrong never reaches a batch, whichever path reads it; stores carry a
checksum manifest and a content digest; a store that lost its metadata or a chunk file says so."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
import zarr

import cachetrain.cache.reader as reader_module
from cachetrain.cache import CacheError, CacheReader, CacheState, StoreInfo, plan_layout, store_state, write_store
from cachetrain.cache.manifest import chunk_file, content_digest, digest_of, file_checksums
from cachetrain.cache.verify import MANIFEST_DIFFERS, verify_store
from cachetrain.cli import main
from cachetrain.errors import Fix
from cachetrain.config import Config
from cachetrain.cache.loader import CacheLoader
from cachetrain.models import stage_seed
from cachetrain.orders import ORDERS
from tests.conftest import STORE_N as N
from tests.conftest import cli, cli_in_process, flip_bytes, make_store, synthetic_raw, write_config


def flip_payload_byte(file: Path) -> None:
    """Flip bytes in the middle of a chunk file: its data, not its trailing crc32c."""
    flip_bytes(file)


def replace_file(file: Path, data: bytes) -> None:
    """What zarr does when it writes a chunk: a new file renamed into place (a new inode)."""
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, file)


def epoch_ids(loader: CacheLoader, order: np.ndarray, batch: int = 40) -> list[np.ndarray]:
    return [x[:, 0, 0, 0].long().numpy().copy() for x, _ in loader.host_batches(order, batch)]


# -- checked reads ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("background", [False, True])
def test_flipped_bytes_in_a_mapped_chunk_stop_the_loader_before_the_batch_holding_it(tmp_path, background):
    reader = make_store(tmp_path / "train.zarr", codec="none")  # chunks of 32 samples, memory-mapped
    flip_payload_byte(reader.chunk_path(4))
    loader = CacheLoader(reader, torch.device("cpu"), workers=0, background=background)
    order = np.random.default_rng(0).permutation(N)
    yielded = []
    with pytest.raises(CacheError) as e:
        for x, _ in loader.host_batches(order, 40):
            yielded.append(x[:, 0, 0, 0].long().numpy().copy())
    message = str(e.value)
    assert message == (f"{reader.path}: chunk 4 (samples 128-159) is corrupt: its crc32c does not match its bytes "
                       f"({reader.chunk_path(4)}); run: cachetrain cache --j 0 --repair")
    assert not any(((ids >= 128) & (ids < 160)).any() for ids in yielded)  # none of its samples got out


def test_each_chunk_is_hashed_once_per_process_and_again_once_its_file_is_replaced(tmp_path, monkeypatch,
                                                                                   mappings):
    reader = make_store(tmp_path / "train.zarr", codec="none", chunk=4)  # 75 chunks
    chunks, payload = reader.info.num_chunks, reader.info.raw_chunk_file_bytes - 4
    hashed = []
    crc = google_crc32c.value
    monkeypatch.setattr(google_crc32c, "value", lambda data: (hashed.append(1) if len(data) == payload else None)
                        or crc(data))  # counts the hashes of whole chunks (zarr hashes the labels too)
    loader = CacheLoader(reader, torch.device("cpu"), workers=0)
    order = np.random.default_rng(1).permutation(N)
    for _ in range(2):  # two epochs
        assert np.array_equal(np.sort(np.concatenate(epoch_ids(loader, order))), np.arange(N))
    assert len(hashed) == chunks

    # mapped by another reader of the store, which keeps at most 16 mappings, so evicts and maps again:
    # the same files, not hashed again
    monkeypatch.setattr(reader_module, "MAX_MAPS", 16)
    again = CacheReader(reader.path, "fp")
    before = len(mappings.chunks(again))
    for _ in range(2):
        epoch_ids(CacheLoader(again, torch.device("cpu"), workers=0), order)
    assert len(mappings.chunks(again)) - before > chunks  # chunks were mapped again after eviction...
    assert len(hashed) == chunks  # ...and not hashed again

    # a chunk file replaced (same bytes, new file) is hashed again, even by a loader that keeps it mapped
    replace_file(reader.chunk_path(3), reader.chunk_path(3).read_bytes())
    epoch_ids(loader, order)
    assert len(hashed) == chunks + 1
    epoch_ids(loader, order)
    assert len(hashed) == chunks + 1

    # ... and a file rewritten with other bytes is refused by the loader that had the old one mapped
    flip_payload_byte(reader.chunk_path(6))
    with pytest.raises(CacheError, match=r"chunk 6 \(samples 24-27\) is corrupt"):
        epoch_ids(loader, order)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_a_chunk_file_swapped_for_another_chunks_file_is_refused(tmp_path, codec):
    """A whole, valid chunk file in the wrong place: its own crc32c matches, the store's manifest does not."""
    reader = make_store(tmp_path / "train.zarr", codec=codec)
    shutil.copyfile(reader.chunk_path(2), reader.chunk_path(5))
    with pytest.raises(CacheError, match=r"chunk 5 \(samples 160-191\) is corrupt: it differs from the store's "
                                         r"checksum manifest .*; run: cachetrain cache --j 0 --repair"):
        reader.chunk_view(5)
    problems = verify_store(reader.path)
    assert [(p.chunk, p.problem) for p in problems] == [(5, MANIFEST_DIFFERS)]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_zstd_chunk_is_one_line_from_a_worker_process_too(tmp_path, workers, damage):
    reader = make_store(tmp_path / "train.zarr", codec="zstd")
    file = reader.chunk_path(7)
    if damage == "flip":
        flip_payload_byte(file)
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    loader = CacheLoader(reader, torch.device("cpu"), workers=workers, prefetch_chunks=2)
    with pytest.raises(CacheError) as e:
        epoch_ids(loader, np.arange(N))
    assert str(e.value) == (f"{reader.path}: chunk 7 (samples 224-255) is corrupt: its crc32c does not match its "
                            f"bytes ({file}); run: cachetrain cache --j 0 --repair")


@pytest.mark.slow
def test_a_corrupt_chunk_read_by_a_dali_worker_process_is_one_line(tmp_path):
    """DALI's feature loader reads chunks in spawned worker processes and re-raises their errors as a plain
    Exception with the worker's traceback in its text: the loader gives the CacheError back, one line."""
    pytest.importorskip("nvidia.dali")
    from cachetrain.config import LoaderConfig
    from cachetrain.cache.source import CacheSource

    train = make_store(tmp_path / "train.zarr", codec="none")
    test = make_store(tmp_path / "test.zarr", n=70, codec="none")
    flip_payload_byte(train.chunk_path(4))
    cfg = LoaderConfig(backend="dali", window_chunks=3, workers=1)
    src = CacheSource(train, test, cfg, seed=11, device=torch.device("cpu"))
    yielded = []
    with pytest.raises(CacheError) as e:
        for x, _ in src.train_batches(0, 64):
            yielded.append(x[:, 0, 0, 0].long().numpy())
    assert str(e.value) == (f"{train.path}: chunk 4 (samples 128-159) is corrupt: its crc32c does not match its bytes "
                            f"({train.chunk_path(4)}); run: cachetrain cache --j 0 --repair")
    assert not any(((ids >= 128) & (ids < 160)).any() for ids in yielded)


# -- through the CLI ---------------------------------------------------------------------------------------------
def _run(tmp_path: Path, codec: str, workers: int) -> tuple[Path, Config]:
    raw = synthetic_raw(tmp_path / "run", model={"stages": 2}, cache={"codec": codec},
                        loader={"workers": workers}, train={"checkpoint_steps": 1})
    path = write_config(tmp_path / "c.yaml", raw)
    assert main(["stage", "--config", str(path)]) == 0  # stage 0, trained and cached
    return path, Config.from_dict(raw)


def _first_chunk_stage_1_reads(cfg: Config, store: Path) -> int:
    """The chunk holding the first sample of stage 1's first batch: corrupt, no step of stage 1 may run."""
    info = CacheReader(store).info
    order = ORDERS[cfg.loader.order](info.num_samples, info.chunk_samples, cfg.loader.window_chunks,
                                     stage_seed(cfg.train.seed, 1))
    return int(np.sort(order.indices(0)[: cfg.train.batch_size])[0] // info.chunk_samples)


# the three ways a chunk reaches a batch: memory-mapped, decoded by this process, decoded by a DataLoader
# worker. The last runs the real command (exit status and stderr of the process a user starts); the others
# call the same entry point in this process (`cli_in_process`: a process importing torch costs seconds)
@pytest.mark.parametrize("codec,workers,damage,real", [pytest.param("none", 0, "flip", False, marks=pytest.mark.slow),
                                                       ("zstd", 0, "flip", False),
                                                       pytest.param("zstd", 1, "truncate", True, marks=pytest.mark.slow)])
def test_train_on_a_corrupt_input_cache_stops_with_one_line_before_any_step(tmp_path, codec, workers, damage, real):
    path, cfg = _run(tmp_path, codec, workers)
    store = cfg.run_path / "cache" / "stage_0" / "train.zarr"
    digest = content_digest(store)
    c = _first_chunk_stage_1_reads(cfg, store)
    file = store / "features" / "c" / str(c) / "0" / "0" / "0"
    original = file.read_bytes()
    if damage == "flip":
        flip_payload_byte(file)
    else:
        file.write_bytes(original[: len(original) // 2])

    proc = (cli if real else cli_in_process)(["train", "--config", str(path)])
    assert proc.returncode == 2, proc.stderr
    cs = CacheReader(store).info.chunk_samples
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr  # one line
    # (the CLI may name the user's --config or --run in the repair command)
    assert re.fullmatch(re.escape(f"error: {store}: chunk {c} (samples {c * cs}-{(c + 1) * cs - 1}) is corrupt: its "
                                  f"crc32c does not match its bytes ({file}); run: cachetrain cache") +
                        r"( --\S+ \S+)* --j 0 --repair\n", proc.stderr), proc.stderr
    assert not (cfg.run_path / "stages" / "stage_1").exists() or \
        not list((cfg.run_path / "stages" / "stage_1").glob("checkpoint*"))  # not one step was taken

    # the repair and the rerun in this process: what they check is the store, not the process boundary
    assert main(["cache", "--config", str(path), "--j", "0", "--repair"]) == 0
    assert file.read_bytes() == original and content_digest(store) == digest  # the exact bytes, the same digest
    assert main(["train", "--config", str(path)]) == 0


def test_a_complete_store_that_lost_a_chunk_file_is_damaged_and_train_rewrites_it(tmp_path, capsys):
    path, cfg = _run(tmp_path, "none", 0)
    store = cfg.run_path / "cache" / "stage_0" / "train.zarr"
    file = store / "features" / "c" / "2" / "0" / "0" / "0"
    original, digest = file.read_bytes(), content_digest(store)
    file.unlink()
    assert store_state(store, None)[0] is CacheState.DAMAGED
    capsys.readouterr()
    assert main(["status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "damaged (1 chunks lost)" in out and "next: train repairs the damaged cache of stage 0" in out
    assert main(["stage", "--config", str(path), "--j", "1"]) == 2  # the damaged store is not read
    assert f"{store}: cache store is damaged: chunk 2 (samples" in capsys.readouterr().err
    assert main(["train", "--config", str(path)]) == 0
    assert file.read_bytes() == original and content_digest(store) == digest
    assert store_state(store, None)[0] is CacheState.COMPLETE


# -- the checksum manifest and the content digest -------------------------------------------------------------------
class Scale(torch.nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return self.k * x


def _store(path: Path, stage: torch.nn.Module, codec: str = "none", fp: str = "fp") -> StoreInfo:
    x = torch.arange(100, dtype=torch.float32)[:, None, None, None].expand(100, 2, 3, 3).contiguous()
    info = StoreInfo(stage=0, k=1, split="train", fingerprint=fp, weights_hash="w", input_fingerprint="i",
                     dtype="float16", codec=codec, level=1, num_samples=100, sample_shape=(2, 3, 3), chunk_samples=16)
    layout = plan_layout(info.sample_bytes, 16 * info.sample_bytes / 2**20, 100, 16)
    write_store(path, info, np.arange(100) % 7, stage, lambda start, size: ((x[i:i + size], None)
                for i in range(start, 100, size)), layout, torch.device("cpu"))
    return info


def _drop(path: Path, c: int) -> Path:
    """What `cachetrain cache --repair` does to a corrupt chunk before the caching pass: the store is
    incomplete again and the chunk file is gone."""
    zarr.open_group(str(path), mode="r+").attrs["complete"] = False
    chunk = chunk_file(path, zarr.open_array(str(path / "features"), mode="r"), c)
    chunk.unlink()
    return chunk


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_the_digest_survives_a_repair_that_restores_the_bytes_and_changes_with_them(tmp_path, codec):
    path = tmp_path / "s.zarr"
    info = _store(path, Scale(2.0), codec)
    digest = content_digest(path)
    assert digest is not None and len(digest) == 16
    assert digest == digest_of(file_checksums(path, info))
    manifest = zarr.open_array(str(path / "chunk_crc32c"), mode="r")[:]
    assert manifest.dtype == np.uint32 and len(manifest) == info.num_chunks + 1  # every chunk, then the labels

    chunk = _drop(path, 3)
    assert content_digest(path) is None  # incomplete: no digest vouches for it
    _store(path, Scale(2.0), codec)  # the repair's caching pass: chunk 3 again, the same bytes
    assert content_digest(path) == digest

    _drop(path, 3)
    _store(path, Scale(3.0), codec)  # same store, other values in chunk 3 only
    other = content_digest(path)
    assert other != digest and chunk.exists()
    assert other == digest_of(file_checksums(path, info))
    assert content_digest(tmp_path / "nowhere.zarr") is None


def test_a_store_without_a_manifest_is_still_read_with_its_crcs_checked(tmp_path):
    """Stores written before manifests existed: no digest, and each chunk checked against its own crc32c."""
    path = tmp_path / "s.zarr"
    _store(path, Scale(2.0))
    shutil.rmtree(path / "chunk_crc32c")
    group = zarr.open_group(str(path), mode="r+")
    group.attrs.put({k: v for k, v in group.attrs.asdict().items() if k != "content_digest"})
    assert content_digest(path) is None
    reader = CacheReader(path, "fp")
    assert reader.manifest is None and torch.equal(reader.chunk_view(1)[:, 0, 0, 0], 2 * torch.arange(16, 32).half())
    flip_payload_byte(reader.chunk_path(2))
    with pytest.raises(CacheError, match=r"chunk 2 \(samples 32-47\) is corrupt: its crc32c does not match"):
        reader.chunk_view(2)


# -- store states ----------------------------------------------------------------------------------------------
def test_a_store_without_its_group_metadata_says_so(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path, Scale(2.0))
    (path / "zarr.json").unlink()
    problems = verify_store(path)
    assert [str(p) for p in problems] == [f"{path}: store: store metadata missing (zarr.json not found)"]
    assert problems[0].whole_store  # rebuilt by the caching pass, not repaired chunk by chunk
    with pytest.raises(CacheError, match=r"s.zarr: store metadata missing \(zarr.json not found\); run: cachetrain cache --j 0$"):
        CacheReader(path, "fp", rebuild=Fix.of("cache", j=0))
    (path / "zarr.json").write_text("{not json")
    assert "store metadata missing (zarr.json unreadable" in str(verify_store(path)[0])
    with pytest.raises(CacheError, match="store metadata missing"):
        CacheReader(path, "fp")


def test_a_complete_store_that_lost_a_chunk_file_is_damaged_until_rewritten(tmp_path):
    path = tmp_path / "s.zarr"
    info = _store(path, Scale(2.0))
    digest = content_digest(path)
    reader = CacheReader(path, "fp")
    before = {c: reader.chunk_path(c).stat().st_mtime_ns for c in range(info.num_chunks)}
    reader.chunk_path(4).unlink()
    assert store_state(path, "fp") == (CacheState.DAMAGED, info)
    assert store_state(path, "other")[0] is CacheState.STALE
    with pytest.raises(CacheError, match=r"cache store is damaged: chunk 4 \(samples 64-79\) is missing or cut short; "
                                         r"run: cachetrain cache --j 0 --repair"):
        CacheReader(path, "fp")
    _store(path, Scale(2.0))  # a caching pass: DAMAGED -> WRITING -> COMPLETE, only the lost chunk written
    assert store_state(path, "fp")[0] is CacheState.COMPLETE and content_digest(path) == digest
    changed = [c for c in range(info.num_chunks) if reader.chunk_path(c).stat().st_mtime_ns != before[c]]
    assert changed == [4]
