"""Caches bigger than RAM: the cold read paths return the bytes the memory map returns and still refuse a
corrupt chunk; the loader asks the disk for chunk files ahead in the order it uses them; the planner reads
a cache that does not fit in free RAM at the disk's rate; `plan --measure` measures and saves rates that
a later `plan` uses; benchmarks/disk_bench.py runs end to end at a toy size."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

import cachetrain.cache.feeds as feeds
import cachetrain.cache.writer as writer
import cachetrain.plan.rates as machine
from cachetrain.cache import CacheError, CacheReader
from cachetrain.cache.loader import CacheLoader, batch_plan, chunk_schedule
from cachetrain.cache.reader import forget_checks
from cachetrain.cli import main
from cachetrain.config import Config
from cachetrain.orders import ORDERS
from cachetrain.plan.planner import Rates, StageCost, Workload, evaluate, plan
from tests.conftest import STORE_N, flip_bytes, make_store, sample_ids, synthetic_raw, write_config

ROOT = Path(__file__).resolve().parent.parent


# -- the cold read paths -----------------------------------------------------------------------------------

def test_a_whole_file_read_returns_the_mapped_bytes_and_refuses_a_flipped_byte(tmp_path):
    reader = make_store(tmp_path / "train.zarr", codec="none")  # 300 samples in chunks of 32: the last is short
    for c in range(reader.info.num_chunks):
        read = reader.read_chunk_file(c)
        assert read.dtype == reader.chunk_view(c).dtype and torch.equal(read, reader.chunk_view(c))
    forget_checks()  # a process that has checked nothing yet
    flip_bytes(reader.chunk_path(3))
    fresh = CacheReader(tmp_path / "train.zarr", "fp")
    with pytest.raises(CacheError, match=r"chunk 3 \(samples 96-127\) is corrupt: its crc32c does not match"):
        fresh.read_chunk_file(3)
    assert torch.equal(fresh.read_chunk_file(2), reader.chunk_view(2))  # the others still read


def test_a_whole_file_read_refuses_a_chunk_file_swapped_for_another(tmp_path):
    """A whole, self-consistent chunk file that is not the one the store recorded (its checksum manifest)."""
    reader = make_store(tmp_path / "train.zarr", codec="none")
    reader.chunk_path(4).write_bytes(reader.chunk_path(5).read_bytes())
    forget_checks()
    with pytest.raises(CacheError, match="chunk 4 .* differs from the store's checksum manifest"):
        CacheReader(tmp_path / "train.zarr", "fp").read_chunk_file(4)


@pytest.mark.parametrize("file_reads", ["mmap", "read"])
def test_the_loader_delivers_the_same_batches_by_either_file_path(tmp_path, monkeypatch, file_reads):
    reader = make_store(tmp_path / "train.zarr", codec="none")
    indices = ORDERS["quasi_random"](STORE_N, reader.info.chunk_samples, 2, seed=1).indices(0)
    expected = np.concatenate([np.sort(b) for b in batch_plan(indices, 40)])
    monkeypatch.setattr(feeds, "FILE_READS", file_reads)
    monkeypatch.setattr(feeds, "READ_AHEAD_BYTES", 3 * reader.info.raw_chunk_file_bytes)
    loader = CacheLoader(reader, torch.device("cpu"), workers=0)
    assert np.array_equal(sample_ids(loader.batches(indices, 40)), expected)


def test_the_whole_file_feed_raises_a_corrupt_chunk_as_one_line(tmp_path, monkeypatch):
    reader = make_store(tmp_path / "train.zarr", codec="none")
    forget_checks()
    flip_bytes(reader.chunk_path(1))
    monkeypatch.setattr(feeds, "FILE_READS", "read")
    loader = CacheLoader(CacheReader(tmp_path / "train.zarr", "fp"), torch.device("cpu"), workers=0)
    with pytest.raises(CacheError, match=r"^\S+: chunk 1 \(samples 32-63\) is corrupt: its crc32c does not match"):
        for _ in loader.batches(np.arange(STORE_N), 40):
            pass


def test_the_disk_is_asked_for_chunk_files_ahead_in_first_use_order(tmp_path, monkeypatch):
    """Every chunk once per epoch, in the order the epoch first reads them, and up to READ_AHEAD_BYTES ahead
    of the chunk being read: before chunk i of that order is read, chunks up to i + ahead were asked for."""
    reader = make_store(tmp_path / "train.zarr", codec="none")
    ahead = 3
    monkeypatch.setattr(feeds, "READ_AHEAD_BYTES", ahead * reader.info.raw_chunk_file_bytes)
    events: list[tuple[str, int]] = []
    advise, get = CacheReader.advise, feeds.MemmapFeed.get
    monkeypatch.setattr(CacheReader, "advise", lambda self, c: events.append(("advise", c)) or advise(self, c))
    monkeypatch.setattr(feeds.MemmapFeed, "get", lambda self, c: events.append(("get", c)) or get(self, c))
    indices = ORDERS["quasi_random"](STORE_N, reader.info.chunk_samples, 2, seed=3).indices(0)
    order, _ = chunk_schedule(batch_plan(indices, 40), reader.info.chunk_samples)
    loader = CacheLoader(reader, torch.device("cpu"), workers=0)
    for _ in loader.batches(indices, 40):
        pass
    advised = [c for what, c in events if what == "advise"]
    assert advised == order  # each chunk once, in first-use order
    for i, c in enumerate(order):
        first_get = events.index(("get", c))
        asked = [c for what, c in events[:first_get] if what == "advise"]
        assert len(asked) >= min(len(order), i + 1 + ahead)
    events.clear()
    monkeypatch.setattr(feeds, "READ_AHEAD_BYTES", 0)  # off: only the loader's own one-batch read-ahead
    for _ in loader.batches(indices, 40):
        pass
    assert not [e for e in events if e[0] == "advise"]


# -- the caching pass keeps pace with the disk -----------------------------------------------------------------

def test_the_writer_starts_each_chunks_writeback_and_bounds_what_the_disk_still_owes(tmp_path, monkeypatch):
    """Every chunk file is handed to the disk right after it is written, and once more than
    WRITEBACK_AHEAD_BYTES are still being written the writer waits for the oldest: a cache bigger than RAM
    never piles up more dirty pages than that, and the final fsync finds little left to write."""
    calls: list[tuple[Path, int]] = []
    sync_range = writer._Writeback._range

    def spy(self, file, flags):
        calls.append((Path(file), flags))
        return sync_range(self, file, flags)

    monkeypatch.setattr(writer._Writeback, "_range", spy)
    chunk_bytes = 32 * 18 * 2 + 4  # make_store's chunks: 32 samples of (2, 3, 3) fp16, and the crc32c
    monkeypatch.setattr(writer, "WRITEBACK_AHEAD_BYTES", 3 * chunk_bytes)
    reader = make_store(tmp_path / "train.zarr", codec="none")
    if not calls:
        pytest.skip("no sync_file_range here (not Linux): the kernel decides when pages are written")
    chunks = [Path(reader.chunk_path(c)) for c in range(reader.info.num_chunks)]
    started = [f for f, flags in calls if flags == writer._Writeback._WRITE]
    assert started == chunks  # each once, in the order written
    owed: list[Path] = []
    for file, flags in calls:
        if flags == writer._Writeback._WRITE:
            owed.append(file)
        else:  # waited for: the oldest still owed
            assert file == owed.pop(0)
        assert len(owed) <= 4  # 3 chunks' bytes, and the one just started
    assert len(owed) == 3  # the rest is left to the final fsync


# -- the planner's read rate -------------------------------------------------------------------------------

# Two stages; per sample: forwards 2 and 4 FLOPs, evaluations 3 and 6, training steps 6 and 12; 10 B per
# stored sample. 10 training and 5 test samples, 4 epochs, 1 FLOP/s, writes 2 B/s, page cache 100 B/s,
# the disk 0.5 B/s. Stage 0's cache is 15 samples * 10 B = 150 B.
COSTS = [StageCost(0, (1, 1, 1), 2.0, 6.0, {"float16": 10}, 3.0),
         StageCost(1, (1, 1, 1), 4.0, 12.0, {"float16": 10}, 6.0)]
W = Workload(train=10, test=5, epochs=4)
STAGE_0 = 4 * (10 * 6 + 5 * 3)  # 300 s: trains on the images in every plan
CACHING_0 = 15 * max(2 / 1, 10 / 2)  # 75 s: 15 samples, bound by the write
RECOMPUTE = STAGE_0 + 4 * (10 * (12 + 2) + 5 * (6 + 2))  # 1020 s: stage 1 recomputes stage 0 every epoch
FROM_PAGE_CACHE = STAGE_0 + CACHING_0 + 4 * (10 * max(12, 0.1) + 5 * max(6, 0.1))  # 975 s: compute-bound
FROM_DISK = STAGE_0 + CACHING_0 + 4 * (10 * max(12, 20) + 5 * max(6, 20))  # 1575 s: 20 s to read a sample


def rates(free_ram: int | None) -> Rates:
    return Rates(1.0, 100.0, 2.0, disk_read_bytes_per_s=0.5, free_ram_bytes=free_ram)


@pytest.mark.parametrize("free_ram, cached_cost, best", [
    (10**6, FROM_PAGE_CACHE, (0,)),  # fits: read from the page cache, and caching stage 0 wins
    (150, FROM_PAGE_CACHE, (0,)),  # exactly fits
    (149, FROM_DISK, ()),  # does not fit: every epoch reads it from the disk, and recomputing wins
    (None, FROM_PAGE_CACHE, (0,)),  # free RAM unknown: the one read rate given
])
def test_a_cache_larger_than_free_ram_is_read_at_the_disks_rate(free_ram, cached_cost, best):
    model = rates(free_ram)
    assert evaluate(COSTS, W, (), "float16", model).cost == pytest.approx(RECOMPUTE)
    assert evaluate(COSTS, W, (0,), "float16", model).cost == pytest.approx(cached_cost)
    assert plan(COSTS, W, 10**9, "float16", model).cached == best


def test_every_view_counts_toward_the_cache_that_must_fit():
    """Two training views: stage 0's cache is (2 * 10 + 5) * 10 B = 250 B, too big for 200 B of free RAM."""
    assert not rates(200).from_disk(15 * 10) and rates(200).from_disk(25 * 10)
    two_views = Workload(train=10, test=5, epochs=4, views=2)
    caching = 25 * 5.0  # each of 25 stored samples written at 2 B/s
    assert evaluate(COSTS, two_views, (0,), "float16", rates(200)).cost == pytest.approx(
        STAGE_0 + caching + 4 * (10 * 20 + 5 * 20))


# -- plan --measure ----------------------------------------------------------------------------------------

MEASURED = {"write": 3e8, "read": 6e8, "page_cache": 5e9}
FLOPS = 1e6  # slow enough that recomputing the tiny stages costs more than reading their caches: they are cached


def fixed_rates(monkeypatch, free_ram: int) -> list[str]:
    """Replace the measuring functions by fixed numbers; returns the list each call is recorded in."""
    calls: list[str] = []
    monkeypatch.setattr(machine, "measure_flops", lambda *a, **k: calls.append("flops") or FLOPS)
    monkeypatch.setattr(machine, "measure_disk", lambda folder, *a, **k: calls.append(str(folder)) or dict(MEASURED))
    monkeypatch.setattr(machine, "measure_h2d", lambda *a, **k: None)
    monkeypatch.setattr(machine, "free_ram_bytes", lambda: free_ram)
    # only the FLOP and disk rates: the per-stage seconds, decoding and zstd (measured when plan passes the
    # dataset) have tests of their own in test_plan_measure.py
    from cachetrain.plan import command

    measure = machine.measure
    monkeypatch.setattr(command, "measure", lambda *a, source=None, trained=None, **k: measure(*a, **k))
    return calls


def test_plan_measure_saves_rates_that_a_later_plan_uses(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run"))
    run = tmp_path / "run"
    stage_0_cache = 8 * 16 * 16 * 2 * (384 + 128)  # stage 0's outputs, fp16, both splits: 1 MiB
    calls = fixed_rates(monkeypatch, free_ram=stage_0_cache // 2)
    assert main(["plan", "--config", str(config), "--measure"]) == 0
    assert calls == ["flops", str(run)]  # the run directory's disk
    saved = json.loads((run / "rates.json").read_text())
    assert (saved["flops_per_s"], saved["disk_write_bytes_per_s"], saved["disk_read_bytes_per_s"],
            saved["page_cache_read_bytes_per_s"], saved["free_ram_bytes"]) == (FLOPS, 3e8, 6e8, 5e9, stage_0_cache // 2)
    first = json.loads((run / "plan.json").read_text())
    assert first["cost_unit"] == "s" and "measured now" in first["rates"]["source"]
    out = capsys.readouterr().out
    assert "read from the disk: the cache of stage" in out and "600 MB/s from the disk" in out

    calls.clear()
    assert main(["plan", "--config", str(config)]) == 0  # no rates given: the saved ones, nothing measured
    assert calls == []
    later = json.loads((run / "plan.json").read_text())
    assert later["cost_unit"] == "s" and later["cost_plan"] == pytest.approx(first["cost_plan"])
    assert later["rates"]["disk_read_bytes_per_s"] == 6e8 and later["rates"]["read_bytes_per_s"] == 5e9
    assert f"measured {saved['measured_at']}" in later["rates"]["source"]
    assert str(run / "rates.json") in capsys.readouterr().out  # the caption says where the rates came from

    # rates given on the command line win over the saved ones
    given = ["--flop-rate", "1T", "--read-rate", "1GB", "--write-rate", "1GB"]
    assert main(["plan", "--config", str(config), *given]) == 0
    assert json.loads((run / "plan.json").read_text())["rates"]["source"] == "given on the command line"


def test_the_saved_rates_decide_which_caches_are_read_from_disk(tmp_path, monkeypatch):
    """The same run measured with plenty of free RAM: no cache is read from the disk, and the plan's cost is
    what the page-cache rate gives, computed again from the saved rates."""
    from cachetrain.plan import planner
    from cachetrain.plan.costs import workload_of

    raw = synthetic_raw(tmp_path / "run")
    config = write_config(tmp_path / "c.yaml", raw)
    fixed_rates(monkeypatch, free_ram=2**40)
    assert main(["plan", "--config", str(config), "--measure"]) == 0
    got = json.loads((tmp_path / "run" / "plan.json").read_text())
    cfg = Config.from_dict(raw)
    costs = planner.stage_costs(cfg, planner.input_shape(cfg), 4)
    w = workload_of(cfg, 352, 128, 32)  # 32 held out for validation
    warm = Rates(FLOPS, 5e9, 3e8, host_shares_compute=True)  # every read from the page cache
    assert got["cached"]
    assert got["cost_plan"] == pytest.approx(evaluate(costs, w, tuple(got["cached"]), "float16", warm).cost)


def test_plan_measure_errors_are_one_line(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "c.yaml", synthetic_raw(tmp_path / "run"))
    fixed_rates(monkeypatch, free_ram=2**30)
    assert main(["plan", "--config", str(config), "--measure", "--flop-rate", "1T"]) == 2
    assert "--measure measures the rates that --flop-rate" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "rates.json").write_text('{"flops_per_s": "fast"}')
    assert main(["plan", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rates.json: unreadable measured rates (expected positive numbers for " \
        "flops_per_s, disk_write_bytes_per_s" in err
    assert err.rstrip().endswith(f"cachetrain plan --config {config} --measure")  # the command that fixes it


def test_the_measuring_functions_give_positive_finite_rates(tmp_path):
    disk = machine.measure_disk(tmp_path / "disk", nbytes=machine.PIECE)
    assert set(disk) == {"write", "read", "page_cache"}
    assert all(math.isfinite(v) and v > 0 for v in disk.values())
    assert list((tmp_path / "disk").iterdir()) == []  # the probe file is gone
    cfg = Config.from_dict(synthetic_raw(tmp_path / "run"))
    flops = machine.measure_flops(cfg, (3, 16, 16), torch.device("cpu"), seconds=0.05)
    assert math.isfinite(flops) and flops > 0
    assert machine.measure_h2d(torch.device("cpu")) is None
    assert machine.free_ram_bytes() > 0


# -- the benchmark -----------------------------------------------------------------------------------------

@pytest.fixture
def threads_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY = ["--gib", "0.005", "--rounds", "2", "--shape", "8", "16", "16", "--workers", "0"]


def run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "disk.json"
    runpy.run_path(str(ROOT / "benchmarks" / "disk_bench.py"), run_name="benchmark")["main"](
        [*TINY, *args, "--dir", str(tmp_path / "work"), "--out", str(out)])
    assert not (tmp_path / "work").exists()  # the stores are removed
    return json.loads(out.read_text())


def check_rows(r: dict, tables: dict[str, list[str]], rounds: int) -> None:
    """Every arm timed each round, with positive finite rates and ratios to each reference arm."""
    for table, refs in tables.items():
        for name, row in r[table].items():
            assert len(row["seconds"]) == rounds and math.isfinite(row["MB_per_s"]) and row["MB_per_s"] > 0
            for ref in refs:
                assert ref == name or (math.isfinite(row[f"ratio_to_{ref}"]) and row[f"ratio_to_{ref}"] > 0)


@pytest.mark.slow
def test_disk_bench_tiny_run(tmp_path, capsys, threads_restored):
    r = run_bench(tmp_path, "--no-drop")  # a test leaves the machine's page cache alone
    assert r["cold_method"].startswith("none") and r["rounds"] == 2
    assert set(r["writes"]) - {"cache_fp16_4mib_tmpfs"} == {"dd", "cache_fp16_4mib", "cache_fp16_16mib",
                                                           "cache_fp16_zstd", "cache_uint8"}
    assert set(r["reads"]) == {"large_file", "large_file_ahead", "chunk_files", "loader_mmap_batch_ahead",
                               "loader_readahead", "loader_read_whole", "loader_readahead_16mib", "loader_zstd",
                               "loader_uint8"}
    check_rows(r, {"writes": ["dd"], "reads": ["large_file", "large_file_ahead", "chunk_files"],
                   "warm": ["warm_mmap_batch_ahead"]}, 2)
    assert r["stores"]["uint8"]["bytes_on_disk"] < r["stores"]["fp16_4mib"]["bytes_on_disk"]
    # every caching pass and every cold loader epoch, against the 0.8x
    assert [t["what"] for t in r["targets"]] == [
        *(f"caching pass, {s}" for s in ("fp16_4mib", "fp16_16mib", "fp16_zstd", "uint8")),
        *(f"cold epoch, {a}" for a in r["reads"] if a.startswith("loader_"))]
    assert r["targets"][0]["ratio"] == r["writes"]["cache_fp16_4mib"]["ratio_to_dd"]
    printed = capsys.readouterr().out
    assert "| loader_readahead |" in printed and "| cache_fp16_4mib |" in printed
    assert "| caching pass, fp16_4mib |" in printed and "| cold epoch, loader_readahead |" in printed


@pytest.mark.slow
def test_disk_bench_bigger_than_ram_mode(tmp_path, threads_restored):
    """A store 1.1x the memory it is told of (4 MiB here): no page cache to drop, the uncompressed arms once."""
    r = run_bench(tmp_path, "--bigger-than-ram", "--ram-gib", str(4 / 1024))
    assert r["cold_method"].startswith("store bigger than RAM") and r["rounds"] == 1
    assert r["fp16_bytes"] > 4 * 2**20 and set(r["stores"]) == {"fp16_4mib"}
    assert set(r["reads"]) == {"large_file", "large_file_ahead", "chunk_files", "loader_mmap_batch_ahead",
                               "loader_readahead", "loader_read_whole"}
    check_rows(r, {"writes": ["dd"], "reads": ["large_file", "large_file_ahead", "chunk_files"]}, 1)
