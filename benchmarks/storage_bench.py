"""Cache storage formats on Fashion-MNIST: bytes per sample, compression, caching time, final accuracy.

The question: what does each storage format (dtype, codec, BitRound) cost in bytes and caching time,
and what does it cost in final accuracy? It prints a markdown table and saves OUT/results.json and
OUT/results.md.

Every variant runs the same greedy schedule from the same trained stage 0
(`cachetrain.bench.tools.run_variants`) and differs only in cache.dtype / codec / bitround. Bytes are
what the stores take on disk (chunks + metadata) divided by the samples stored; the ratio compares
with the raw fp16 size.

    python benchmarks/storage_bench.py [--config fmnist] [--out bench/storage]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from cachetrain.bench.tools import run_variants, stopwatch
from cachetrain.config import load_config

VARIANTS = {
    "float16+zstd": ["cache.dtype=float16"],
    "float16+zstd-1": ["cache.dtype=float16", "cache.level=1"],
    "float16 raw": ["cache.dtype=float16", "cache.codec=none"],
    "bfloat16+zstd": ["cache.dtype=bfloat16"],
    "float16+bitround6+zstd": ["cache.dtype=float16", "cache.bitround=6"],
    "uint8+zstd": ["cache.dtype=uint8"],
    "uint8 p99.99+zstd": ["cache.dtype=uint8", "cache.quant_percentile=99.99"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="fmnist")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="bench/storage")
    p.add_argument("--only", nargs="*", help="run only these variants")
    args = p.parse_args()
    out = Path(args.out)
    cfg = load_config(args.config, args.set)
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    with stopwatch() as watch:
        results = run_variants(cfg, variants, out, Console())
    fp16_raw = next(iter(results.values()))["raw_bytes_per_sample"]
    ref = results.get("float16+zstd", next(iter(results.values())))["final_test_acc"]
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
               "config": args.config, "wall_seconds": watch.seconds, "variants": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    lines = [f"{summary['machine']}; {summary['date']}; `{summary['command']}` ({summary['wall_seconds'] / 60:.0f} min)",
             "", "| variant | bytes/sample, stage 0 | vs raw fp16 | all caches, MiB | caching s | final test acc | "
             "vs float16+zstd |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        b0, raw0 = r["bytes_per_sample"][0], fp16_raw[0]
        total = sum(r["bytes_per_sample"].values()) * 70000 / 2**20
        lines.append(f"| {name} | {b0:,.0f} | {raw0 / b0:.2f}x smaller | {total:,.0f} | {r['cache_seconds']:.0f} | "
                     f"{100 * r['final_test_acc']:.2f}% | {100 * (r['final_test_acc'] - ref):+.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
