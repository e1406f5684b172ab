"""A cache store on an S3-compatible server against the same store on the local disk, side by side.

Starts moto's S3 server (`python -m moto.server`, the test suite's server) on 127.0.0.1 in its own process,
writes one store of stage-like features (ReLU of Gaussian noise, fp16) both to the local disk and to a
bucket there, then per round and arm (alternating): the caching pass's write (`write_store` of the same
array, whole-chunk PUTs against local files with the final fsyncs) and one loader epoch in quasi-random
order (`CacheLoader`, what a stage reads: every chunk checked, remote chunks fetched by
`feeds.REMOTE_THREADS` GETs in flight), and for S3 two more epochs with `cache.remote_copies` (one
keeping each fetched object on the local disk, one reading those copies). Prints a markdown table with the medians of the per-round ratios
and saves OUT/results.json and OUT/results.md.

    python benchmarks/s3_bench.py [--samples 8000] [--shape 64 14 14] [--codec none zstd] [--rounds 3]

What it can show: what the S3 path costs over local files when the network is not the limit (loopback),
with moto, a Python server, answering every request; a real object store is slower per request and
faster in parallel. The local arm reads a warm page cache after its first round (it says so); for cold
local reads see benchmarks/disk_bench.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cachetrain.bench.tools import save_results, store_layout, write_features
from cachetrain.cache import CacheReader
from cachetrain.cache.copies import LocalCopies
from cachetrain.cache.feeds import REMOTE_THREADS
from cachetrain.cache.loader import CacheLoader
from cachetrain.cache.location import RemotePath, _filesystem, remove_tree
from cachetrain.orders import ORDERS

BUCKET = "cachetrain-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> subprocess.Popen:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    _filesystem.cache_clear()
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                sys.exit("error: moto's S3 server did not start (pip install 'moto[server]')")
            time.sleep(0.2)
    RemotePath(f"s3://{BUCKET}").fs.mkdir(BUCKET)
    return server


def features(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, *shape, generator=g))


def write(path, x: torch.Tensor, codec: str, chunk_mib: float) -> float:
    """Seconds of the caching pass (`write_store`, identity stage) writing x as a store at `path`."""
    info, layout = store_layout(x.shape[1:], len(x), codec, chunk_mib=chunk_mib)
    t0 = time.perf_counter()
    write_features(path, replace(info, fingerprint="bench"), layout, x)
    return time.perf_counter() - t0


def epoch(path, seed: int, copies: LocalCopies | None = None) -> float:
    reader = CacheReader(path, "bench", copies=copies)
    loader = CacheLoader(reader, torch.device("cpu"), workers=0)
    order = ORDERS["quasi_random"](reader.info.num_samples, reader.info.chunk_samples, 4, seed=seed).indices(0)
    t0 = time.perf_counter()
    seen = sum(len(y) for _, y in loader.batches(order, 256))
    assert seen == reader.info.num_samples
    return time.perf_counter() - t0


def raw_rates(store: RemotePath) -> dict:
    """The server's own rates for the store's chunk objects, with no cachetrain in the way: every object
    fetched by s3fs with its requests in flight together (`cat`), then put back under another prefix
    (`pipe`); what the loader and the writer are measured against."""
    fs = store.fs
    keys = [f"{store.key}/features/{k}" for k in (store / "features").sizes() if k != "zarr.json"]
    t0 = time.perf_counter()
    objects = fs.cat(keys)
    get_s = time.perf_counter() - t0
    size = sum(len(v) for v in objects.values()) / 1e6
    t0 = time.perf_counter()
    fs.pipe({k.replace(store.key, store.key + "-raw", 1): v for k, v in objects.items()})
    put_s = time.perf_counter() - t0
    fs.rm(store.key + "-raw", recursive=True)
    return {"objects": len(keys), "MB": size, "get_MB_per_s": size / get_s, "put_MB_per_s": size / put_s}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8000)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 14, 14])
    p.add_argument("--codec", nargs="+", default=["none", "zstd"])
    p.add_argument("--chunk-mib", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/s3")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    local_root = Path(tempfile.mkdtemp(prefix="s3bench-", dir=out))
    server = start_server()
    x = features(args.samples, tuple(args.shape))
    mb = x.numel() * 2 / 1e6  # fp16 bytes the pass writes and an epoch reads, before compression
    results: dict = {}
    try:
        for codec in args.codec:
            rounds = []
            for r in range(args.rounds):
                row = {}
                for arm in (("local", "s3") if r % 2 == 0 else ("s3", "local")):
                    path = local_root / f"{codec}.zarr" if arm == "local" else \
                        RemotePath(f"s3://{BUCKET}/{codec}.zarr")
                    remove_tree(path)  # a complete store would be kept, not written again
                    w = write(path, x, codec, args.chunk_mib)
                    e = epoch(path, seed=r)
                    row[arm] = {"write_s": w, "write_MB_per_s": mb / w, "epoch_s": e,
                                "epoch_samples_per_s": args.samples / e}
                    if arm == "s3":
                        row["server"] = raw_rates(path)
                        # cache.remote_copies: an epoch that keeps each fetched object on the local disk,
                        # then one that reads those copies
                        copies = LocalCopies(local_root / "copies", 2**40)
                        row["s3_copies"] = {"filling_samples_per_s": args.samples / epoch(path, r, copies),
                                            "epoch_samples_per_s": args.samples / epoch(path, r, copies)}
                        shutil.rmtree(local_root / "copies")
                    print(f"{codec}, round {r + 1}, {arm}: {row[arm]}", flush=True)
                print(f"{codec}, round {r + 1}, the server alone: {row['server']}", flush=True)
                rounds.append(row)
            results[codec] = {
                "rounds": rounds,
                "median_write_ratio": statistics.median(rr["s3"]["write_MB_per_s"] / rr["local"]["write_MB_per_s"]
                                                        for rr in rounds),
                "median_epoch_ratio": statistics.median(
                    rr["s3"]["epoch_samples_per_s"] / rr["local"]["epoch_samples_per_s"] for rr in rounds),
                **{f"median_{arm}_{key}": statistics.median(rr[arm][key] for rr in rounds)
                   for arm in ("local", "s3") for key in ("write_MB_per_s", "epoch_samples_per_s")},
                # stored bytes (after zstd) over the loader's epoch, against what the server serves alone
                "median_epoch_vs_server_get": statistics.median(
                    rr["server"]["MB"] / rr["s3"]["epoch_s"] / rr["server"]["get_MB_per_s"] for rr in rounds),
                "median_write_vs_server_put": statistics.median(
                    rr["server"]["MB"] / rr["s3"]["write_s"] / rr["server"]["put_MB_per_s"] for rr in rounds),
                "median_copies_filling_samples_per_s": statistics.median(
                    rr["s3_copies"]["filling_samples_per_s"] for rr in rounds),
                "median_copies_epoch_samples_per_s": statistics.median(
                    rr["s3_copies"]["epoch_samples_per_s"] for rr in rounds),
                "median_server_get_MB_per_s": statistics.median(rr["server"]["get_MB_per_s"] for rr in rounds),
                "median_server_put_MB_per_s": statistics.median(rr["server"]["put_MB_per_s"] for rr in rounds)}
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(local_root, ignore_errors=True)
    cores = os.cpu_count() or 1
    summary = {"machine": f"{platform.machine()}, {cores} cores, Python {platform.python_version()}, torch "
                          f"{torch.__version__}",
               "command": " ".join(["python", "benchmarks/s3_bench.py", *(argv if argv is not None else sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d"), "samples": args.samples, "shape": args.shape, "fp16_MB": mb,
               "chunk_mib": args.chunk_mib, "gets_in_flight": REMOTE_THREADS, "results": results}
    lines = [f"{summary['machine']}; {summary['date']}; `{summary['command']}`; {args.samples} samples of "
             f"{tuple(args.shape)} fp16 ({mb:.0f} MB), {args.chunk_mib:g} MiB chunks; local: warm page cache after "
             f"round 1; S3: moto on 127.0.0.1, {REMOTE_THREADS} GETs in flight", "",
             "| codec | epoch samples/s local | epoch samples/s S3 | S3 / local | S3 epoch / server GETs alone "
             "| S3 keeping local copies | from the copies | write MB/s local | write MB/s S3 "
             "| S3 write / server PUTs alone |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for codec, res in results.items():
        lines.append(f"| {codec} | {res['median_local_epoch_samples_per_s']:,.0f} | "
                     f"{res['median_s3_epoch_samples_per_s']:,.0f} | {res['median_epoch_ratio']:.2f} | "
                     f"{res['median_epoch_vs_server_get']:.2f} ({res['median_server_get_MB_per_s']:,.0f} MB/s) | "
                     f"{res['median_copies_filling_samples_per_s']:,.0f} | {res['median_copies_epoch_samples_per_s']:,.0f} | "
                     f"{res['median_local_write_MB_per_s']:,.0f} | {res['median_s3_write_MB_per_s']:,.0f} | "
                     f"{res['median_write_vs_server_put']:.2f} ({res['median_server_put_MB_per_s']:,.0f} MB/s) |")
    return save_results(out, summary, lines)


if __name__ == "__main__":
    main()
