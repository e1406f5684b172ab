"""Caches bigger than RAM: the caching pass and the cache loader against the disk's own sequential rates, cold.

A cache that does not fit in the page cache is written to and read from the disk every time, so what
matters is how close the caching pass and the loader come to what the disk does for a plain
sequential write or read of the same bytes. Each measurement is cold: the page cache is dropped
before every arm (`sync; echo 3 > /proc/sys/vm/drop_caches`, as root), or, without root, every file's
pages are dropped with posix_fadvise(DONTNEED); with `--bigger-than-ram` the store is also larger than
the machine's memory, so no arm can keep it cached, and only this run's files are dropped (see `Cold`).
The JSON says which.

Writes (each round, in alternating order; every arm writes the same samples, random ReLU maps):
- dd: one file of the fp16 store's chunk-file bytes, in 8 MiB writes, then fdatasync (the limit);
- cache fp16: the caching pass (`cachetrain.cache.write_store`, identity stage, its fsyncs and
  manifest included) of an uncompressed fp16 store, 4 MiB chunks (`cache.chunk_mib` 4, the default)
  and 16 MiB chunks; then fp16 zstd-1 and uint8 uncompressed, whose fewer bytes can beat a slow disk.
Reads (each round, alternating): one epoch of `CacheLoader` in quasi-random order (whole chunks
shuffled, samples shuffled in windows of 4 chunks; batch 256; checked reads: every chunk's crc32c
is verified, as in a first epoch) against
- large file: the dd file read sequentially in 8 MiB reads (the limit; `plan --measure` reads the same way);
- large file, read ahead: the same with READ_AHEAD_BYTES asked of the disk ahead of the reads (posix_fadvise
  WILLNEED), as many bytes in flight as the loader keeps: a virtual disk can give more to many reads in
  flight than to one sequential stream;
- chunk files: the fp16 store's chunk files read one after another, whole, in file order.
The loader arms: the memory-mapped path with only the loader's own read-ahead (one batch ahead, the
path before `ReadAheadFeed`), with `ReadAheadFeed` (chunk files asked of the disk READ_AHEAD_BYTES
ahead with posix_fadvise WILLNEED, the default), `ReadFeed` (whole chunk files read with one large
read each by 4 threads), the 16 MiB-chunk store, and the zstd (2 decoding worker processes) and uint8
stores. Then two warm arms, the page cache holding the store: what the read-ahead costs when there is
nothing to read.

Rates are MB/s of bytes on disk, and "fp16 MB/s": the fp16 bytes of the samples moved per second,
which is what compares across formats. Ratios are medians over rounds of the per-round ratio to that
round's limit, so a disk whose speed drifts between rounds (a shared virtual disk does) still compares.
Loader arms run with torch on one thread: on a loaded 2-core machine a two-thread OpenMP copy ran up
to 50x slower than a one-thread copy, which would measure the scheduler, not the disk.

    python benchmarks/disk_bench.py [--gib 2] [--rounds 3] [--dir bench/disk] [--bigger-than-ram] [--no-drop]
                                    [--out benchmarks/figures/disk_results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import cachetrain.cache.feeds as feeds
from cachetrain.cache import CacheReader, StoreInfo, disk_bytes, plan_layout, write_store
from cachetrain.cache.loader import CacheLoader
from cachetrain.cache.quant import calibrate
from cachetrain.cache.reader import forget_checks
from cachetrain.orders import ORDERS

PIECE = 8 * 2**20
POOL = 256  # distinct samples the caching pass cycles through (random ReLU maps, half zeros)
BATCH, WINDOW = 256, 4  # the loader's batch and quasi-random window (LoaderConfig's default window)

# store name -> (dtype, codec, chunk_mib)
STORES = {"fp16_4mib": ("float16", "none", 4.0), "fp16_16mib": ("float16", "none", 16.0),
          "fp16_zstd": ("float16", "zstd", 4.0), "uint8": ("uint8", "none", 4.0)}


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


class Cold:
    """Empties the page cache before an arm, as well as this machine allows (`method` says how).

    A store bigger than RAM is not cold by its size alone: after one arm reads it through, the page cache
    may still hold most of it (1.1x RAM: up to ~90%), and the next arm's quasi-random order would find
    many of its chunks there. So that mode drops this run's own files too, with posix_fadvise(DONTNEED),
    never the machine's whole page cache: the mode is for where that may not be dropped, and tests run it."""

    def __init__(self, folder: Path, no_drop: bool, bigger_than_ram: bool):
        self.folder = folder
        self.how = "none" if no_drop else "fadvise" if bigger_than_ram or os.geteuid() != 0 else "drop_caches"
        self.method = {"none": "none: page cache warm (--no-drop)",
                       "drop_caches": "sync; echo 3 > /proc/sys/vm/drop_caches before every arm",
                       "fadvise": "sync, then posix_fadvise(DONTNEED) on every file under --dir before every arm"
                       }[self.how]
        if bigger_than_ram and not no_drop:
            self.method = f"store bigger than RAM, and {self.method}"

    def __call__(self) -> None:
        if self.how == "none":
            return
        os.sync()
        if self.how == "drop_caches":
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return
        for file in (p for p in self.folder.rglob("*") if p.is_file()):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def store_info(name: str, shape: tuple[int, ...], n: int, quant) -> tuple[StoreInfo, object]:
    dtype, codec, chunk_mib = STORES[name]
    probe = StoreInfo(0, 3, "train", "fp", "w", "i", dtype, codec, 1, n, shape, 1,
                      quant=quant if dtype == "uint8" else None)
    layout = plan_layout(probe.sample_bytes, chunk_mib, n, BATCH)
    return replace(probe, chunk_samples=layout.chunk_samples), layout


def write_cache(path: Path, info: StoreInfo, layout, pool: torch.Tensor) -> None:
    """The caching pass of `info.num_samples` samples cycled from `pool`, with an identity stage."""
    n = info.num_samples

    def batches(start: int, size: int):
        for i in range(start, n, size):
            j, m = i % len(pool), min(size, n - i)
            yield (pool[j:j + m] if j + m <= len(pool) else pool[:m]), None

    write_store(path, info, np.zeros(n, dtype=np.int64), torch.nn.Identity(), batches, layout, torch.device("cpu"))


def dd_write(path: Path, nbytes: int, data: bytes) -> None:
    """`nbytes` of `data`, repeated, in PIECE writes, then fdatasync: what `dd bs=8M conv=fdatasync` does."""
    view = memoryview(data)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < nbytes:
            at = written % len(view)
            written += os.write(fd, view[at:at + min(PIECE, nbytes - written, len(view) - at)])
        os.fdatasync(fd)
    finally:
        os.close(fd)


def read_files(files: list[Path]) -> int:
    buf = bytearray(PIECE)
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def read_file_ahead(path: Path, ahead: int) -> int:
    """One file in PIECE reads, the next `ahead` bytes asked of the disk (posix_fadvise WILLNEED) as the reads
    go: as many bytes in flight as the loader's ReadAheadFeed keeps, where a plain sequential read keeps
    the kernel's read-ahead window (read_ahead_kb of the device)."""
    buf = bytearray(PIECE)
    total = asked = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        while True:
            if min(size, total + ahead) > asked:
                os.posix_fadvise(fd, asked, min(size, total + ahead) - asked, os.POSIX_FADV_WILLNEED)
                asked = min(size, total + ahead)
            n = os.readv(fd, [buf])
            if not n:
                return total
            total += n
    finally:
        os.close(fd)


def chunk_files(path: Path) -> list[Path]:
    reader = CacheReader(path, "fp")
    return [Path(reader.chunk_path(c)) for c in range(reader.info.num_chunks)]


def loader_epoch(path: Path, workers: int, file_reads: str = "mmap", ahead: int | None = None,
                 epoch: int = 0) -> int:
    """One quasi-random epoch of the cache loader over the store at `path` (host batches in the storage
    dtype); returns the samples delivered. A fresh reader in a process that has checked nothing: every
    chunk is hashed, as in a first epoch."""
    forget_checks()
    reader = CacheReader(path, "fp")
    info = reader.info
    loader = CacheLoader(reader, torch.device("cpu"), workers=workers if info.codec != "none" else 0)
    if info.codec != "none" and workers:
        for _ in loader.host_batches(np.arange(1), 1):  # start the worker processes outside the timing
            pass
    order = ORDERS["quasi_random"](info.num_samples, info.chunk_samples, WINDOW, seed=epoch)
    saved = feeds.FILE_READS, feeds.READ_AHEAD_BYTES
    feeds.FILE_READS = file_reads
    feeds.READ_AHEAD_BYTES = saved[1] if ahead is None else ahead
    try:
        seen = 0
        for x, _ in loader.host_batches(order.indices(epoch), BATCH):
            seen += len(x)
    finally:
        feeds.FILE_READS, feeds.READ_AHEAD_BYTES = saved
    if seen != info.num_samples:
        raise RuntimeError(f"{path}: the loader delivered {seen} of {info.num_samples} samples")
    return seen


def rounds_of(arms: dict, rounds: int, cold: Cold | None, prepare: dict | None = None) -> dict[str, list[float]]:
    """Seconds of every arm, `rounds` times, in alternating order; untimed, `prepare[name]()` (removing
    what the arm writes) and `cold()` before each arm."""
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            if prepare and name in prepare:
                prepare[name]()
            if cold is not None:
                cold()
            t0 = time.perf_counter()
            arms[name]()
            seconds[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1}: {name:22s} {seconds[name][-1]:7.2f} s", flush=True)
    return seconds


def summarise(seconds: dict[str, list[float]], nbytes: dict[str, int], fp16_bytes: int, refs: list[str],
              plain: set[str]) -> dict[str, dict]:
    """Per arm: MB/s on disk and, for cache arms, fp16 MB/s (medians); and the median per-round ratio of
    what it moved per second (fp16 bytes for cache arms, its bytes for the `plain` file arms) to each
    reference arm's MB/s in the same round."""
    out = {}
    for name, secs in seconds.items():
        payload = nbytes[name] if name in plain else fp16_bytes
        row = {"seconds": secs, "bytes": nbytes[name],
               "MB_per_s": statistics.median(nbytes[name] / s / 1e6 for s in secs),
               "fp16_MB_per_s": None if name in plain else statistics.median(fp16_bytes / s / 1e6 for s in secs)}
        for ref in refs:
            if name != ref:
                row[f"ratio_to_{ref}"] = statistics.median(
                    (payload / s) / (nbytes[ref] / t) for s, t in zip(secs, seconds[ref]))
        out[name] = row
    return out


def markdown(title: str, rows: dict[str, dict], refs: list[str]) -> str:
    lines = [f"**{title}**", "", "| arm | MB/s on disk | fp16 MB/s | " + " | ".join(f"x {r}" for r in refs) + " |",
             "|---|---:|---:|" + "---:|" * len(refs)]
    for name, row in rows.items():
        ratios = [f"{row[f'ratio_to_{r}']:.2f}" if f"ratio_to_{r}" in row else "(limit)" if r == name else "-"
                  for r in refs]
        fp16 = "-" if row["fp16_MB_per_s"] is None else f"{row['fp16_MB_per_s']:,.0f}"
        lines.append(f"| {name} | {row['MB_per_s']:,.0f} | {fp16} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


TARGET = 0.8  # issue 18: the caching pass and a cold loader epoch, each at least 0.8x the disk's sequential rate


def against_targets(writes: dict[str, dict], reads: dict[str, dict]) -> list[dict]:
    """Every caching pass (x dd) and every cold loader epoch (x the large file read sequentially) against
    TARGET, in fp16 bytes moved per second."""
    rows = [{"what": f"caching pass, {name[len('cache_'):]}", "ratio": row["ratio_to_dd"], "over": "dd"}
            for name, row in writes.items() if name.startswith("cache_") and not name.endswith("_tmpfs")]
    rows += [{"what": f"cold epoch, {name}", "ratio": row["ratio_to_large_file"], "over": "large_file"}
             for name, row in reads.items() if name.startswith("loader_")]
    return [{**row, "target": TARGET, "met": row["ratio"] >= TARGET} for row in rows]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0, help="fp16 store size (default 2; ignored with --bigger-than-ram)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 16, 16],
                   help="sample shape (C H W); the default, 32 KiB in fp16, puts 128 samples in a 4 MiB chunk, so a "
                        "batch of 256 spans few chunks and the loader's own one-batch read-ahead is short")
    p.add_argument("--dir", default="bench/disk", help="where the stores go: the disk under test")
    p.add_argument("--workers", type=int, default=2, help="decoding processes for the zstd store")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    p.add_argument("--bigger-than-ram", action="store_true",
                   help="an fp16 store 1.1x the machine's memory instead of dropping the page cache (uncompressed "
                        "4 MiB arms only, one round)")
    p.add_argument("--ram-gib", type=float, help="the memory --bigger-than-ram exceeds (default: MemTotal; less "
                                                 "where a container's memory limit is lower)")
    p.add_argument("--no-drop", action="store_true", help="leave the page cache alone (a smoke test: warm figures)")
    p.add_argument("--out", default="benchmarks/figures/disk_results.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    sample_fp16 = int(np.prod(shape)) * 2
    ram = int(args.ram_gib * 2**30) if args.ram_gib else mem_total()
    total = int(1.1 * ram) if args.bigger_than_ram else int(args.gib * 2**30)
    n = max(BATCH, total // sample_fp16)
    rounds = 1 if args.bigger_than_ram else args.rounds
    names = ["fp16_4mib"] if args.bigger_than_ram else list(STORES)
    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cold = Cold(folder, args.no_drop, args.bigger_than_ram)
    start = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg": os.getloadavg()}
    print(f"{n} samples of {shape} fp16 ({n * sample_fp16 / 2**30:.2f} GiB) in {folder.resolve()}; cold: {cold.method}")

    pool = torch.randn(POOL, *shape, generator=torch.Generator().manual_seed(0)).relu_().half()
    quant = calibrate([pool.float()])
    stores = {name: store_info(name, shape, n, quant) for name in names}
    fp16_bytes = n * sample_fp16
    large = folder / "large.bin"
    dd_bytes = stores["fp16_4mib"][0].num_chunks * stores["fp16_4mib"][0].raw_chunk_file_bytes
    pool_bytes = pool.numpy().tobytes()  # dd writes the bytes the caching pass writes, with the same period

    # -- writes ------------------------------------------------------------------------------------------------
    print("writes:")
    write_arms = {"dd": lambda: dd_write(large, dd_bytes, pool_bytes),
                  **{f"cache_{name}": (lambda name=name: write_cache(folder / f"{name}.zarr", *stores[name], pool))
                     for name in names}}
    remove = {"dd": lambda: large.unlink(missing_ok=True),
              **{f"cache_{name}": (lambda name=name: shutil.rmtree(folder / f"{name}.zarr", ignore_errors=True))
                 for name in names}}
    # the same caching pass into memory (tmpfs): what the writer reaches with no disk at all, its CPU ceiling
    shm = Path("/dev/shm")
    in_memory = shm / f"disk_bench_{os.getpid()}.zarr"
    if not args.bigger_than_ram and shm.is_dir() and shutil.disk_usage(shm).free > 3 * dd_bytes:
        write_arms["cache_fp16_4mib_tmpfs"] = lambda: write_cache(in_memory, *stores["fp16_4mib"], pool)
        remove["cache_fp16_4mib_tmpfs"] = lambda: shutil.rmtree(in_memory, ignore_errors=True)
    try:
        write_s = rounds_of(write_arms, rounds, cold, remove)
    finally:
        shutil.rmtree(in_memory, ignore_errors=True)
    write_bytes = {"dd": dd_bytes, "cache_fp16_4mib_tmpfs": dd_bytes,
                   **{f"cache_{name}": disk_bytes(folder / f"{name}.zarr") for name in names}}
    writes = summarise(write_s, write_bytes, fp16_bytes, ["dd"], {"dd"})

    # -- reads -------------------------------------------------------------------------------------------------
    print("reads:")
    files = chunk_files(folder / "fp16_4mib.zarr")
    read_arms = {"large_file": lambda: read_files([large]),
                 "large_file_ahead": lambda: read_file_ahead(large, feeds.READ_AHEAD_BYTES),
                 "chunk_files": lambda: read_files(files),
                 "loader_mmap_batch_ahead": lambda: loader_epoch(folder / "fp16_4mib.zarr", args.workers, ahead=0),
                 "loader_readahead": lambda: loader_epoch(folder / "fp16_4mib.zarr", args.workers),
                 "loader_read_whole": lambda: loader_epoch(folder / "fp16_4mib.zarr", args.workers, "read")}
    if not args.bigger_than_ram:
        read_arms.update({"loader_readahead_16mib": lambda: loader_epoch(folder / "fp16_16mib.zarr", args.workers),
                          "loader_zstd": lambda: loader_epoch(folder / "fp16_zstd.zarr", args.workers),
                          "loader_uint8": lambda: loader_epoch(folder / "uint8.zarr", args.workers)})
    read_bytes = {"large_file": dd_bytes, "large_file_ahead": dd_bytes,
                  "chunk_files": sum(f.stat().st_size for f in files),
                  **{k: dd_bytes for k in read_arms if k.startswith("loader_")}}
    store_of = {"loader_readahead_16mib": "fp16_16mib", "loader_zstd": "fp16_zstd", "loader_uint8": "uint8"}
    for arm, name in store_of.items():
        if arm in read_arms:
            read_bytes[arm] = sum(f.stat().st_size for f in (folder / f"{name}.zarr" / "features").rglob("*")
                                  if f.is_file() and f.name != "zarr.json")
    read_s = rounds_of(read_arms, rounds, cold)
    plain = ["large_file", "large_file_ahead", "chunk_files"]
    reads = summarise(read_s, read_bytes, fp16_bytes, plain, set(plain))

    # -- warm: what the read-ahead costs when the page cache already holds the store -----------------------------
    warm = {}
    if not args.bigger_than_ram:
        print("warm (page cache holding the fp16 store):")
        loader_epoch(folder / "fp16_4mib.zarr", args.workers)  # brings the whole store into the page cache
        warm_arms = {"warm_mmap_batch_ahead": lambda: loader_epoch(folder / "fp16_4mib.zarr", args.workers, ahead=0),
                     "warm_readahead": lambda: loader_epoch(folder / "fp16_4mib.zarr", args.workers),
                     "warm_read_whole": lambda: loader_epoch(folder / "fp16_4mib.zarr", args.workers, "read")}
        warm_s = rounds_of(warm_arms, rounds, None)
        warm = summarise(warm_s, {k: dd_bytes for k in warm_arms}, fp16_bytes, ["warm_mmap_batch_ahead"], set())

    result = {
        "command": "python benchmarks/disk_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **start, "loadavg_end": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {ram / 2**30:.1f} GiB RAM, Python "
                   f"{platform.python_version()}, torch {torch.__version__}, torch threads {args.threads}",
        "dir": str(folder.resolve()), "cold_method": cold.method, "rounds": rounds, "samples": n,
        "sample_shape": list(shape), "fp16_bytes": fp16_bytes, "read_ahead_bytes": feeds.READ_AHEAD_BYTES,
        "stores": {name: {"dtype": info.dtype, "codec": info.codec, "chunk_samples": info.chunk_samples,
                          "chunk_file_bytes": info.raw_chunk_file_bytes, "chunks": info.num_chunks,
                          "bytes_on_disk": disk_bytes(folder / f"{name}.zarr")} for name, (info, _) in stores.items()},
        "writes": writes, "reads": reads, "warm": warm,
        "targets": against_targets(writes, reads),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print(f"{result['date']}, {result['machine']}; cold: {cold.method}; {rounds} rounds, medians; load average "
          f"{start['loadavg'][0]:.1f} at the start, {result['loadavg_end'][0]:.1f} at the end")
    print()
    print(markdown("writes (x dd: fp16 MB/s over dd's MB/s, per round)", writes, ["dd"]))
    print()
    print(markdown("cold reads (x: fp16 MB/s over the reference's MB/s, per round)", reads, plain))
    if warm:
        print()
        print(markdown("warm reads", warm, ["warm_mmap_batch_ahead"]))
    print(f"\n**against the targets (>= {TARGET}x)**\n\n| | x | over | met |\n|---|---:|---|---|")
    for row in result["targets"]:
        print(f"| {row['what']} | {row['ratio']:.2f} | {row['over']} | {'yes' if row['met'] else 'no'} |")
    print(f"\nwrote {out}")
    shutil.rmtree(folder, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
