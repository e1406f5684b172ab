"""This machine's measured rates, for the planner's seconds model (`cachetrain plan --measure`).

What a plan in seconds needs to know about the machine a run trains on, a few seconds of measuring each:
- compute: forward FLOP/s of this device on the configured network's first stage (FLOPs counted by
  torch's flop counter, cachetrain.plan.profile), in the run's precision;
- the run directory's disk, where its caches live: the sequential write rate (a file written in 8 MiB
  pieces, then fdatasync: the bytes have reached the disk), the cold sequential read rate (the same file
  read back after its pages were dropped from the page cache with posix_fadvise(POSIX_FADV_DONTNEED):
  no root needed and no other file's pages disturbed), and the page-cache read rate (the same file read
  again, cached now);
- the host-to-device copy rate from pinned memory, where CUDA is present: every batch crosses it;
- free RAM (MemAvailable) when measured: a stage's cache bigger than it cannot stay in the page cache,
  so it is read from the disk every epoch.

`MachineRates.to_rates` turns them into the planner's `Rates`: a store that fits in free RAM is read at
the page-cache rate, a bigger one at the disk's (each capped by the host-to-device copy on CUDA), and a
caching pass writes at the disk's rate. The rates are saved to <run>/rates.json (`save`, atomically,
with when, where and on what they were measured) and later plans of the run use them (cachetrain/cli.py).

A virtual disk may be backed by a file the host caches: a file just written can read back "cold" from
the host's memory. benchmarks/disk_bench.py measures what the cache loader and the caching pass reach
against these same sequential rates.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from cachetrain.config import Config
from cachetrain.device import autocast
from cachetrain.durable import write_json
from cachetrain.errors import ConfigError, Fix
from cachetrain.models import build_network
from cachetrain.plan.planner import Rates
from cachetrain.plan.profile import forward_flops

RATES_FILE = "rates.json"
PIECE = 8 * 2**20  # bytes per write and read call: large enough that the calls cost nothing beside the disk
DISK_PROBE_BYTES = 512 * 2**20  # a few seconds on a slow disk (~150 MB/s), well under one on a fast one


@dataclass(frozen=True)
class MachineRates:
    """What `measure` found; bytes per second, FLOP per second."""

    flops_per_s: float
    disk_write_bytes_per_s: float
    disk_read_bytes_per_s: float
    page_cache_read_bytes_per_s: float
    free_ram_bytes: int
    h2d_bytes_per_s: float | None = None  # None: no CUDA device
    device: str = "cpu"
    disk_path: str = ""  # the folder whose disk was measured
    measured_at: str = ""  # UTC, ISO 8601
    host: str = ""

    def to_rates(self, source: str) -> Rates:
        """The planner's seconds model: reads from the page cache or the disk, whichever the store's size
        allows (Rates.read_rate), both capped by the copy to the device."""
        def landed(rate: float) -> float:
            return min(rate, self.h2d_bytes_per_s) if self.h2d_bytes_per_s else rate

        return Rates(self.flops_per_s, landed(self.page_cache_read_bytes_per_s), self.disk_write_bytes_per_s,
                     disk_read_bytes_per_s=landed(self.disk_read_bytes_per_s), free_ram_bytes=self.free_ram_bytes,
                     source=source)


def rates_path(run_dir: Path) -> Path:
    return Path(run_dir) / RATES_FILE


def save(rates: MachineRates, run_dir: Path) -> Path:
    path = rates_path(run_dir)
    write_json(path, asdict(rates))  # atomic and durable: a crash leaves the old rates or the new
    return path


def load(run_dir: Path) -> MachineRates | None:
    """The rates saved in the run directory, or None when it has none."""
    path = rates_path(run_dir)
    if not path.exists():
        return None
    numbers = ("flops_per_s", "disk_write_bytes_per_s", "disk_read_bytes_per_s", "page_cache_read_bytes_per_s",
               "free_ram_bytes")
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object")
        bad = [k for k in numbers if not isinstance(raw.get(k), (int, float)) or not 0 < raw[k] < float("inf")]
        if bad:
            raise ValueError(f"expected positive numbers for {', '.join(bad)}")
        known = {f.name for f in fields(MachineRates)}
        rates = MachineRates(**{k: v for k, v in raw.items() if k in known})
    except (ValueError, TypeError) as e:  # not JSON, not an object, a field missing or of the wrong type
        raise ConfigError(f"{path}: unreadable measured rates ({str(e).splitlines()[0][:100]}); measure them again",
                          Fix.of("plan", measure=True)) from None
    return rates


def free_ram_bytes() -> int:
    """MemAvailable: what the page cache can hold for a store without pushing anything out to swap."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _read_all(fd: int, buf: bytearray) -> int:
    os.lseek(fd, 0, os.SEEK_SET)
    total = 0
    while n := os.readv(fd, [buf]):
        total += n
    return total


def measure_disk(folder: Path, nbytes: int = DISK_PROBE_BYTES) -> dict[str, float]:
    """Sequential write, cold read and page-cache read rates (bytes/s) of the disk holding `folder`, with a
    probe file of `nbytes` (at most a quarter of the free space) that is removed afterwards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nbytes = max(PIECE, min(nbytes, shutil.disk_usage(folder).free // 4) // PIECE * PIECE)
    piece = np.random.default_rng(0).integers(0, 256, PIECE, dtype=np.uint8).tobytes()  # nothing to compress
    probe = folder / f".rates-probe-{os.getpid()}.tmp"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(nbytes // PIECE):
            os.write(fd, piece)
        os.fdatasync(fd)  # on the disk, not only in the page cache
        write = nbytes / (time.perf_counter() - t0)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages now: dropped, so the read is cold
        buf = bytearray(PIECE)
        t0 = time.perf_counter()
        got = _read_all(fd, buf)
        cold = got / (time.perf_counter() - t0)
        warm = 0.0
        for _ in range(2):  # the file is cached now; the faster of two reads
            t0 = time.perf_counter()
            got = _read_all(fd, buf)
            warm = max(warm, got / (time.perf_counter() - t0))
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    return {"write": write, "read": cold, "page_cache": warm}


def measure_flops(cfg: Config, in_shape: tuple[int, int, int], device: torch.device, seconds: float = 2.0,
                  batch: int | None = None) -> float:
    """Forward FLOP/s of the configured network's first stage on `device` (bf16 autocast on CUDA with
    train.amp), timed over about `seconds` after a warm-up. A CPU gets a small batch (its FLOP/s hardly
    depends on it, and a wide stage's full batch takes seconds); a GPU gets the training batch."""
    batch = batch or (cfg.train.batch_size if device.type == "cuda" else min(cfg.train.batch_size, 16))
    stage = build_network(cfg.model, in_shape, cfg.train.seed).stages[0].to(device).eval()
    x = torch.randn(batch, *in_shape, device=device)
    flops = forward_flops(stage, x)

    def run(calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            stage(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    with torch.no_grad(), autocast(device, cfg.train.amp):
        calls, elapsed = 1, run(1)  # warm-up (and the first guess of a call's time)
        calls = max(1, int(seconds / max(elapsed, 1e-6)))
        elapsed = run(calls)
    return flops * calls / elapsed


def measure_h2d(device: torch.device, nbytes: int = 256 * 2**20, seconds: float = 1.0) -> float | None:
    """Bytes/s of host-to-device copies from pinned memory, the way the loader copies batches; None off CUDA."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize(device)
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        calls += 1
    return nbytes * calls / (time.perf_counter() - t0)


def measure(cfg: Config, in_shape: tuple[int, int, int], disk_folder: Path, device: torch.device,
            disk_bytes: int = DISK_PROBE_BYTES, report=lambda what, value: None) -> MachineRates:
    """Every rate above, each reported through `report(what, value)` as it is measured."""
    flops = measure_flops(cfg, in_shape, device)
    report("forward FLOP/s (stage 0)", flops)
    disk = measure_disk(disk_folder, disk_bytes)
    for key, what in (("write", "disk write"), ("read", "disk read, cold"), ("page_cache", "page-cache read")):
        report(f"{what} B/s", disk[key])
    h2d = measure_h2d(device)
    if h2d is not None:
        report("host-to-device B/s", h2d)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return MachineRates(flops, disk["write"], disk["read"], disk["page_cache"], free_ram_bytes(), h2d, name,
                        str(Path(disk_folder).resolve()), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        platform.node())


def _size(n: float) -> str:
    """Bytes (or bytes/s) in decimal units, three significant digits: '1.23 GB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def describe(rates: Rates) -> str:
    """The rates a plan in seconds assumed and where they came from, for the plan table's caption."""
    text = (f"rates {rates.source}: {rates.flops_per_s / 1e12:.3g} TFLOP/s, caching passes write "
            f"{_size(rates.write_bytes_per_s)}/s, caches are read at {_size(rates.read_bytes_per_s)}/s")
    if rates.disk_read_bytes_per_s is not None and rates.free_ram_bytes is not None:
        text += (f" from the page cache, {_size(rates.disk_read_bytes_per_s)}/s from the disk when larger than "
                 f"free RAM ({_size(rates.free_ram_bytes)})")
    return text


def caption(rates: Rates, plan: dict) -> str:
    """`describe`, and which of the plan's caches (`planner.describe`'s dict) it reads from the disk."""
    text = describe(rates)
    from_disk = [s["stage"] for s in plan["stages"] if s["cached"] and rates.from_disk(s["store_bytes"][plan["dtype"]])]
    if from_disk:
        text += f"; read from the disk: the cache of stage{'s' if len(from_disk) > 1 else ''} " \
                f"{', '.join(map(str, from_disk))}"
    return text
