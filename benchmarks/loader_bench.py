"""Cache loader throughput vs the local limit (a numpy memmap read at random batch indices).

Features are real ReLU maps: a randomly initialised layercnn stage (conv3x3-BN-ReLU) run over
Fashion-MNIST images, stored as fp16 (N, C, 28, 28). The same bytes are written three ways, an .npy
file, an uncompressed cache store and a zstd cache store, then read with a warm page cache:

- memmap: `mm[sorted(random batch of indices)]`, the fastest a process can gather random samples;
- cache loader, uncompressed: memory-mapped chunk files, quasi-random and fully random orders;
- cache loader, zstd: chunks decoded by 0, 1, 2 worker processes; plus raw zstd decode speed of
  one core (numcodecs) and zarr's own chunk read, to show what limits it;
- the training step of the next stage (its block + a k=2 head, forward + backward + SGD step) at the
  same batch size, so a reader sees whether the loader or the model is the bottleneck;
- checked reads: the uncompressed loader, quasi-random order, with every chunk's crc32c checked and
  with the checks switched off (`cachetrain.cache.reader.VERIFY = False`, which nothing but this
  benchmark sets). Both arms are measured side by side, interleaved over `--rounds` rounds (which arm
  goes first alternates), and the median of the per-round ratios is reported, twice: for a first
  epoch (a fresh reader in a process that has checked nothing: every chunk mapped and hashed, from a
  warm page cache) and for later epochs (mapped chunks already checked; a stat per chunk per epoch).
  Each arm's rate is also reported per CPU second of this process (`time.process_time`), which is
  steadier than wall time on a machine shared with other work.

    python benchmarks/loader_bench.py [--samples 10000] [--width 32] [--batch 256] [--rounds 9] [--checks-only]
                                      [--out bench/loader]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cachetrain.cache.reader as reader_module
from cachetrain.cache import CacheReader, StoreInfo, plan_layout, write_store
from cachetrain.config import DataConfig, ModelConfig
from cachetrain.data.tensors import load_fmnist
from cachetrain.cache.loader import CacheLoader
from cachetrain.models import build_network, make_head
from cachetrain.orders import ORDERS


def make_features(n: int, width: int) -> torch.Tensor:
    data = load_fmnist(DataConfig(train_subset=n), seed=0, device=torch.device("cpu"))
    net = build_network(ModelConfig(stages=2, width=width, downsample=[1]), data.sample_shape, seed=0)
    stage = net.stages[0].eval()
    with torch.no_grad():
        return torch.cat([stage(x).half() for x, _ in data.eval_batches("train", 1000)])  # (N, C, 28, 28)


def write(path: Path, x: torch.Tensor, codec: str) -> CacheReader:
    shape = tuple(x.shape[1:])
    info0 = StoreInfo(0, 2, "train", "fp", "w", "i", "float16", codec, 3, len(x), shape, 1)
    layout = plan_layout(info0.sample_bytes, 4.0, len(x), 256)
    info = StoreInfo(0, 2, "train", "fp", "w", "i", "float16", codec, 3, len(x), shape, layout.chunk_samples)

    def batches(start, size):
        for i in range(start, len(x), size):
            yield x[i:i + size].float(), None

    write_store(path, info, np.zeros(len(x), dtype=np.int64), torch.nn.Identity(), batches, layout,
                torch.device("cpu"))
    return CacheReader(path, "fp")


def rate(fn, n_samples: int, repeats: int = 2) -> float:
    fn()  # warm the page cache and any lazily opened maps
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_samples / best


def checked_vs_unchecked(path: Path, batch: int, rounds: int) -> dict:
    """Epoch rates of the uncompressed loader, quasi-random, with checked reads on and off (module
    docstring): per-round ratios and their medians, for a first epoch and for later epochs."""
    probe = CacheReader(path, "fp")
    n, cs = probe.info.num_samples, probe.info.chunk_samples
    idx = ORDERS["quasi_random"](n, cs, 4, seed=0).indices(0)

    def epoch(loader: CacheLoader, verify: bool) -> tuple[float, float]:
        """(samples per wall second, samples per CPU second of this process)"""
        reader_module.VERIFY = verify
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in loader.host_batches(idx, batch):
                pass
            return n / (time.perf_counter() - t0), n / (time.process_time() - c0)
        finally:
            reader_module.VERIFY = True

    def first_epoch(verify: bool) -> tuple[float, float]:
        reader_module.forget_checks()  # this process has checked nothing yet
        return epoch(CacheLoader(CacheReader(path, "fp"), torch.device("cpu"), workers=0), verify)

    later = {True: CacheLoader(CacheReader(path, "fp"), torch.device("cpu"), workers=0),
             False: CacheLoader(CacheReader(path, "fp"), torch.device("cpu"), workers=0)}
    for verify, loader in later.items():  # map (and check) every chunk once
        epoch(loader, verify)
    first_epoch(True)  # and warm the page cache
    rates: dict[str, dict[bool, list[tuple[float, float]]]] = {"first": {True: [], False: []},
                                                               "later": {True: [], False: []}}
    for r in range(rounds):
        for verify in ((True, False) if r % 2 == 0 else (False, True)):
            rates["first"][verify].append(first_epoch(verify))
        for verify in ((True, False) if r % 2 == 0 else (False, True)):
            rates["later"][verify].append(epoch(later[verify], verify))
    out = {"rounds": rounds, "order": "quasi_random", "codec": "none"}
    for name, arms in rates.items():
        ratios = [c[0] / u[0] for c, u in zip(arms[True], arms[False])]
        cpu_ratios = [c[1] / u[1] for c, u in zip(arms[True], arms[False])]
        out[name] = {"checked_samples_per_s": [r[0] for r in arms[True]],
                     "unchecked_samples_per_s": [r[0] for r in arms[False]],
                     "checked_samples_per_cpu_s": [r[1] for r in arms[True]],
                     "unchecked_samples_per_cpu_s": [r[1] for r in arms[False]],
                     "ratios": ratios, "median_ratio": float(np.median(ratios)),
                     "cpu_ratios": cpu_ratios, "median_cpu_ratio": float(np.median(cpu_ratios))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the checked/unchecked comparison")
    p.add_argument("--checks-only", action="store_true", help="only the checked/unchecked comparison")
    p.add_argument("--out", default="bench/loader")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    x = make_features(args.samples, args.width)
    n, sample_bytes = len(x), x[0].numel() * 2
    mb = n * sample_bytes / 1e6
    rows: list[dict] = []

    def record(name: str, samples_per_s: float, note: str = "") -> None:
        rows.append({"reader": name, "samples_per_s": samples_per_s, "MB_per_s": samples_per_s * sample_bytes / 1e6,
                     "note": note})
        print(f"{name:<44} {samples_per_s:>10,.0f} samples/s {samples_per_s * sample_bytes / 1e6:>8,.0f} MB/s  {note}",
              flush=True)

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        raw = write(tmp / "raw.zarr", x, "none")
        chunk = raw.info.chunk_samples
        checks = checked_vs_unchecked(tmp / "raw.zarr", args.batch, args.rounds)
        for name, what in (("first", "first epoch"), ("later", "later epochs")):
            c = checks[name]
            record(f"uncompressed, quasi_random, checked, {what}", float(np.median(c["checked_samples_per_s"])),
                   f"median checked/unchecked {c['median_ratio']:.3f} (per CPU second {c['median_cpu_ratio']:.3f}) "
                   f"over {args.rounds} rounds")
            record(f"uncompressed, quasi_random, unchecked, {what}", float(np.median(c["unchecked_samples_per_s"])),
                   "cachetrain.cache.reader.VERIFY = False")
        if args.checks_only:
            _save(out, args, x, n, sample_bytes, mb, chunk, rows, checks)
            return
        np.save(tmp / "x.npy", x.numpy())
        mm = np.load(tmp / "x.npy", mmap_mode="r")
        perm = np.random.default_rng(0).permutation(n)

        def memmap_epoch():
            for i in range(0, n, args.batch):
                mm[np.sort(perm[i:i + args.batch])]

        limit = rate(memmap_epoch, n)
        record("numpy memmap, random batches (the limit)", limit)

        zst = write(tmp / "zstd.zarr", x, "zstd")

        def loader_epoch(reader, order, workers):
            loader = CacheLoader(reader, torch.device("cpu"), workers=workers)
            idx = ORDERS[order](n, reader.info.chunk_samples, 4, seed=0).indices(0)
            return lambda: [None for _ in loader.host_batches(idx, args.batch)]

        rates = {}
        for order in ("quasi_random", "random"):
            rates[order] = r = rate(loader_epoch(raw, order, 0), n)
            record(f"cache loader, uncompressed, {order}", r, f"{r / limit:.2f}x memmap")
        loader_rate = rates["quasi_random"]
        zstd_rates = {}
        for workers in (0, 1, 2):
            r = rate(loader_epoch(zst, "quasi_random", workers), n)
            zstd_rates[workers] = r
            record(f"cache loader, zstd, {workers} worker process(es)", r, f"{r / limit:.2f}x memmap")

        import numcodecs
        files = sorted((tmp / "zstd.zarr" / "features" / "c").rglob("*"))
        blobs = [f.read_bytes()[:-4] for f in files if f.is_file()]  # without the crc32c trailer
        codec = numcodecs.Zstd()
        raw_zstd = rate(lambda: [codec.decode(b) for b in blobs], n)
        record("zstd decode alone, 1 core (numcodecs)", raw_zstd)
        zarr_read = rate(lambda: [zst.read_chunk(c) for c in range(zst.info.num_chunks)], n)
        record("zarr chunk reads, 1 core", zarr_read)
        ratio = n * sample_bytes / sum(f.stat().st_size for f in files if f.is_file())

    # the next stage's training step on these features, at the same batch size
    cfg = ModelConfig(stages=2, width=args.width, downsample=[1], k=2)
    net = build_network(cfg, (1, 28, 28), seed=0)
    model = torch.nn.Sequential(net.stages[1], make_head(cfg, net, 1, 2, 10, seed=0)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xb, yb = x[: args.batch].float(), torch.randint(0, 10, (args.batch,))

    def steps():
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()

    step_rate = rate(steps, 5 * args.batch, repeats=1)
    record("next stage's training step (compute only)", step_rate, "fwd+bwd+SGD, k=2 head")

    _save(out, args, x, n, sample_bytes, mb, chunk, rows, checks, {
        "zstd_ratio": ratio, "uncompressed_vs_memmap": loader_rate / limit,
        "zstd_MB_per_s_per_worker": {w: r * sample_bytes / 1e6 / max(1, w) for w, r in zstd_rates.items()}})


def _save(out: Path, args, x: torch.Tensor, n: int, sample_bytes: int, mb: float, chunk: int, rows: list[dict],
          checks: dict, more: dict | None = None) -> None:
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "samples": n, "sample_shape": list(x.shape[1:]), "sample_bytes": sample_bytes, "dataset_MB": mb,
        "chunk_samples": chunk, "batch": args.batch, "rows": rows, "checked_reads": checks, **(more or {}),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    ratio = result.get("zstd_ratio")
    lines = [f"Machine: {result['machine']}; {result['date']}; `{result['command']}`", "",
             f"{n} samples of {tuple(x.shape[1:])} fp16 ({sample_bytes / 1024:.1f} KiB each, {mb:.0f} MB), chunks of "
             f"{chunk} samples, batch {args.batch}" + (f", zstd-3 ratio {ratio:.2f}x" if ratio else "") +
             ", warm page cache.", "",
             f"Checked reads (uncompressed, quasi-random), median checked/unchecked over {checks['rounds']} "
             f"interleaved rounds: first epoch {checks['first']['median_ratio']:.3f} (per CPU second "
             f"{checks['first']['median_cpu_ratio']:.3f}), later epochs {checks['later']['median_ratio']:.3f} (per CPU "
             f"second {checks['later']['median_cpu_ratio']:.3f}).", "",
             "| reader | samples/s | MB/s | note |", "|---|---:|---:|---|"]
    lines += [f"| {r['reader']} | {r['samples_per_s']:,.0f} | {r['MB_per_s']:,.0f} | {r['note']} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
