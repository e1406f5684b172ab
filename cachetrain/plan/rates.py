"""This machine's measured rates, for the planner's seconds model (`cachetrain plan --measure`).

What a plan in seconds needs to know about the machine a run trains on, a few seconds of measuring each:
- compute: forward FLOP/s of this device on the configured network's first stage (FLOPs counted by
  torch's flop counter, cachetrain.plan.profile), in the run's precision; and, given the dataset, every
  stage's own seconds a sample of a training step, an evaluation and a block forward (`measure_stage_seconds`):
  on a CPU the FLOP/s of a stage's backward or of a narrow late stage is a fraction of the first
  stage's forward, so one FLOP rate mispredicts them by several times;
- the disk where the caches are read from (the run directory's, cache.location's folder, or for a cache on
  an object store the folder of its local copies): the sequential write rate (a file written in 8 MiB
  pieces, then fdatasync: the bytes have reached the disk), the cold sequential read rate (the same file
  read back after its pages were dropped from the page cache with posix_fadvise(POSIX_FADV_DONTNEED): no
  root needed and no other file's pages disturbed), and the page-cache read rate (the same file read again,
  cached now);
- an object store at cache.location: its PUT and GET rates (cachetrain/plan/tiers.py);
- the stage-0 input pipeline, given the dataset: images/s of its training and plain batches
  (cachetrain/plan/decode.py);
- zstd on real stage outputs, given the dataset: the ratio per stage and storage format, and the rates
  chunks compress and decompress at on one thread (cachetrain/plan/compression.py);
- the host-to-device copy rate from pinned memory, where CUDA is present: every batch crosses it;
- free RAM (MemAvailable) when measured: a stage's cache bigger than it cannot stay in the page cache,
  so it is read from the disk every epoch.

`MachineRates.to_rates` turns them into the planner's `Rates` (cachetrain/plan/seconds.py): a store that
fits in free RAM is read at the page-cache rate, a bigger one at the disk's (each capped by the
host-to-device copy on CUDA), a caching pass writes at the disk's rate, and the codec's rates scale with
the processes that run it. The rates are saved to <run>/rates.json (`save`, atomically, with when, where
and on what they were measured) and later plans of the run use them (cachetrain/cli.py). A rates.json
written before a field existed loads with that field unmeasured.

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
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cachetrain.cache.location import RemotePath
from cachetrain.config import Config
from cachetrain.device import autocast
from cachetrain.durable import write_json
from cachetrain.errors import ConfigError, Fix
from cachetrain.models import build_network
from cachetrain.models.factory import network, stage_model
from cachetrain.plan.compression import measure_codec
from cachetrain.plan.decode import measure_decode
from cachetrain.plan.profile import forward_flops, forward_seconds, step_seconds
from cachetrain.plan.seconds import Rates
from cachetrain.plan.tiers import measure_object_store
from cachetrain.source import Source

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
    # measured with the dataset (None: not measured)
    decode_samples_per_s: float | None = None  # the stage-0 pipeline, training batches (augmented)
    decode_eval_samples_per_s: float | None = None  # ... plain batches (evaluation, caching passes)
    data: str = ""  # which dataset's pipeline
    decode_start_seconds: float = 0.0  # a pass over the images starting its pipeline (worker processes)
    stage_seconds: list[list[float]] | None = None  # per stage: training step, evaluation, block forward; s/sample
    zstd_ratios: dict[str, list[float]] | None = None  # storage dtype -> per stage, raw / stored
    compress_bytes_per_s: dict[str, float] | None = None  # storage dtype -> raw bytes/s, one thread
    decompress_bytes_per_s: dict[str, float] | None = None  # the same, decompressing
    zstd_note: str = ""  # what the ratios were measured on (CodecFigures.source)
    # measured against cache.location when it is an object store
    remote_read_bytes_per_s: float | None = None
    remote_write_bytes_per_s: float | None = None
    remote_url: str = ""

    def to_rates(self, source: str, dtype: str = "float16", codec_threads: int = 1, remote: bool = False,
                 copies_bytes: int | None = None) -> Rates:
        """The planner's seconds model: reads from the page cache or the disk, whichever the store's size
        allows (Rates.read_rate), both capped by the copy to the device; the object store's rates when the
        caches live there (`remote`) and it was measured, with local copies up to `copies_bytes`; zstd's
        rates for the storage `dtype` planned, decompression on `codec_threads` loader processes."""
        def landed(rate: float | None) -> float | None:
            return min(rate, self.h2d_bytes_per_s) if self.h2d_bytes_per_s and rate else rate

        remote = remote and self.remote_read_bytes_per_s is not None
        decompress = (self.decompress_bytes_per_s or {}).get(dtype)
        return Rates(self.flops_per_s, landed(self.page_cache_read_bytes_per_s), self.disk_write_bytes_per_s,
                     disk_read_bytes_per_s=landed(self.disk_read_bytes_per_s), free_ram_bytes=self.free_ram_bytes,
                     source=source, decode_samples_per_s=self.decode_samples_per_s,
                     decode_eval_samples_per_s=self.decode_eval_samples_per_s,
                     decode_start_seconds=self.decode_start_seconds,
                     decompress_bytes_per_s=decompress * max(1, codec_threads) if decompress else None,
                     compress_bytes_per_s=(self.compress_bytes_per_s or {}).get(dtype),
                     remote_read_bytes_per_s=landed(self.remote_read_bytes_per_s) if remote else None,
                     remote_write_bytes_per_s=self.remote_write_bytes_per_s if remote else None,
                     copies_bytes=copies_bytes if remote else None, host_shares_compute=self.device.startswith("cpu"),
                     stage_seconds=tuple(tuple(s) for s in self.stage_seconds) if self.stage_seconds else None)


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
        optional = ("decode_samples_per_s", "decode_eval_samples_per_s", "remote_read_bytes_per_s",
                    "remote_write_bytes_per_s")
        bad = [k for k in numbers if not isinstance(raw.get(k), (int, float)) or not 0 < raw[k] < float("inf")]
        bad += [k for k in optional if raw.get(k) is not None
                and (not isinstance(raw[k], (int, float)) or not 0 < raw[k] < float("inf"))]
        if bad:
            raise ValueError(f"expected positive numbers for {', '.join(bad)}")
        seconds = raw.get("stage_seconds")
        if seconds is not None and not (isinstance(seconds, list) and all(
                isinstance(s, list) and len(s) == 3 and all(isinstance(v, (int, float)) and v > 0 for v in s)
                for s in seconds)):
            raise ValueError("expected stage_seconds as a list of [training step, evaluation, block forward] "
                             "seconds per stage")
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


def measure_stage_seconds(cfg: Config, in_shape: tuple[int, int, int], num_classes: int, device: torch.device,
                          max_call_seconds: float = 10.0) -> list[list[float]]:
    """Per stage of the configured network on `device`: seconds a sample of a training step (block + head, the
    trainer's step), of an evaluation (block + head, no autograd) and of the block's forward alone, at the
    training batch (evaluations at twice it, as the trainer evaluates): on a CPU a step of 4 samples took 5x
    as long a sample as one of 128 (J=8 layout, stage 1), so a smaller batch would mispredict. Only where a
    step at the training batch would take longer than `max_call_seconds` (a first step of 4 samples says) is
    the batch cut to fit."""
    net = network(cfg, in_shape)
    out = []
    for j in range(net.depth):
        t = cfg.stage_train(j)  # what the trainer builds and steps: stages.<j>.* and activation checkpointing
        model = stage_model(cfg, net, j, cfg.model.k, num_classes, t.seed,
                            checkpoint_activations=t.checkpoint_activations).to(device)
        if t.channels_last and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        batch = t.batch_size
        if device.type != "cuda":
            probe = min(batch, 4)
            x, y = torch.randn(probe, *net.in_shapes[j], device=device), torch.zeros(probe, dtype=torch.long,
                                                                                     device=device)
            per_sample = step_seconds(model, x, y, t.amp, repeats=1) / probe  # over-estimates: small batches are slow
            batch = max(probe, min(batch, int(max_call_seconds / max(per_sample, 1e-9))))
        x = torch.randn(batch, *net.in_shapes[j], device=device)
        y = torch.zeros(batch, dtype=torch.long, device=device)
        step = step_seconds(model, x, y, t.amp, t.channels_last, repeats=3) / batch
        x2 = torch.randn(2 * batch, *net.in_shapes[j], device=device)
        evaluation = forward_seconds(model, x2, t.amp, repeats=3) / len(x2)
        block = forward_seconds(model.stage, x2, t.amp, repeats=3) / len(x2)
        out.append([step, evaluation, block])
    return out


def measure(cfg: Config, in_shape: tuple[int, int, int], disk_folder: Path, device: torch.device,
            disk_bytes: int = DISK_PROBE_BYTES, report=lambda what, value: None, *, source: Source | None = None,
            trained: Callable[[int], nn.Module | None] | None = None, remote: RemotePath | None = None,
            probe_seconds: float = 3.0) -> MachineRates:
    """Every rate above, each reported through `report(what, value)` as it is measured. With the dataset
    (`source`, from cachetrain.data.open_dataset): each stage's seconds, the stage-0 pipeline's images/s and
    zstd on the stages' outputs (through `trained(j)`, a run's trained stage j or None, else the initialised
    one). With `remote` (cache.location on an object store): its GET and PUT rates. `probe_seconds`: about how
    long each pipeline is read and each stage's timed call takes."""
    flops = measure_flops(cfg, in_shape, device)
    report("forward FLOP/s (stage 0)", flops)
    disk = measure_disk(disk_folder, disk_bytes)
    for key, what in (("write", "disk write"), ("read", "disk read, cold"), ("page_cache", "page-cache read")):
        report(f"{what} B/s", disk[key])
    h2d = measure_h2d(device)
    if h2d is not None:
        report("host-to-device B/s", h2d)
    extra: dict = {}
    if source is not None:
        extra["stage_seconds"] = measure_stage_seconds(cfg, in_shape, source.num_classes, device,
                                                       max(1.0, 3 * probe_seconds))
        for j, (step, evaluation, block) in enumerate(extra["stage_seconds"]):
            report(f"stage {j} training samples/s", 1 / step)
            report(f"stage {j} evaluation samples/s", 1 / evaluation)
            report(f"stage {j} block forward samples/s", 1 / block)
        decode = measure_decode(source, cfg.train.batch_size, probe_seconds)
        extra.update(decode_samples_per_s=decode.train_samples_per_s, decode_eval_samples_per_s=decode.eval_samples_per_s,
                     decode_start_seconds=decode.start_seconds,
                     data=f"{cfg.data.name}" + (f" at {cfg.data.resolved_root}" if cfg.data.name == "imagefolder" else ""))
        report("stage-0 input images/s, training (augmented)", decode.train_samples_per_s)
        report("stage-0 input images/s, plain", decode.eval_samples_per_s)
        report("stage-0 input, seconds to start a pass", decode.start_seconds)
        codec = measure_codec(cfg, source, device, trained)
        extra.update(zstd_ratios=codec.ratios, compress_bytes_per_s=codec.compress_bytes_per_s,
                     decompress_bytes_per_s=codec.decompress_bytes_per_s, zstd_note=codec.source())
        for j, ratio in enumerate(codec.ratios[cfg.cache.dtype]):
            report(f"stage {j} zstd-{codec.level} ratio ({cfg.cache.dtype}, {codec.weights[j]})", ratio)
        report(f"zstd decompress B/s ({cfg.cache.dtype}, one thread)", codec.decompress_bytes_per_s[cfg.cache.dtype])
    if remote is not None:
        store = measure_object_store(remote)
        extra.update(remote_read_bytes_per_s=store["read"], remote_write_bytes_per_s=store["write"], remote_url=str(remote))
        report(f"object store GET B/s ({remote})", store["read"])
        report("object store PUT B/s", store["write"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return MachineRates(flops, disk["write"], disk["read"], disk["page_cache"], free_ram_bytes(), h2d, name,
                        str(Path(disk_folder).resolve()), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        platform.node(), **extra)


def _size(n: float) -> str:
    """Bytes (or bytes/s) in decimal units, three significant digits: '1.23 GB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def describe(rates: Rates) -> str:
    """The rates a plan in seconds assumed and where they came from, for the plan table's caption."""
    compute = f"{rates.flops_per_s / 1e12:.3g} TFLOP/s"
    if rates.stage_seconds:
        compute = "each stage's measured seconds a sample"
    text = (f"rates {rates.source}: {compute}, caching passes write {_size(rates.write_rate())}/s, caches are read at "
            f"{_size(rates.read_bytes_per_s)}/s")
    if rates.disk_read_bytes_per_s is not None and rates.free_ram_bytes is not None:
        text += (f" from the page cache, {_size(rates.disk_read_bytes_per_s)}/s from the disk when larger than "
                 f"free RAM ({_size(rates.free_ram_bytes)})")
    if rates.remote:
        copies = f", then from local copies (up to {_size(rates.copies_bytes)})" if rates.copies_bytes else \
            ", every epoch (no cache.remote_copies)"
        text += f"; on the object store: {_size(rates.remote_read_bytes_per_s)}/s{copies}"
    if rates.decode_samples_per_s:
        text += f"; stage-0 input {rates.decode_samples_per_s:,.0f} images/s"
        if rates.decode_eval_samples_per_s and rates.decode_eval_samples_per_s != rates.decode_samples_per_s:
            text += f" ({rates.decode_eval_samples_per_s:,.0f} plain)"
    if rates.decompress_bytes_per_s:
        text += f"; zstd decompresses {_size(rates.decompress_bytes_per_s)}/s"
    if rates.host_shares_compute:
        text += "; the device is the CPU: decoding and zstd take the cores that compute"
    return text


def caption(rates: Rates, plan: dict) -> str:
    """`describe`, and which of the plan's caches (`planner.describe`'s dict) it reads from the disk."""
    text = describe(rates)
    w = plan["workload"]
    from_disk = [s["stage"] for s in plan["stages"] if s["cached"] and rates.from_disk(
        (w["train"] * w["views"] + w["test"]) * s.get("stored_bytes_per_sample", s["sample_bytes"][plan["dtype"]]))]
    if from_disk:
        text += f"; read from the disk: the cache of stage{'s' if len(from_disk) > 1 else ''} " \
                f"{', '.join(map(str, from_disk))}"
    return text
