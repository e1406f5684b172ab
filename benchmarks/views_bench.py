"""Augmented cache views on Fashion-MNIST: what V = 1, 2, 4 views do to accuracy and overfitting.

The question: do several augmented views of the training set in the cache stop later stages from
overfitting their cached inputs, and at what accuracy and caching cost? It prints a markdown table and
saves OUT/results.json and OUT/results.md. The runs are `cachetrain.bench.tools.run_variants`.

With a cache, stages after the first see the same feature map of each image every epoch; the seed
thesis (Trinh 2019) found early layers overfit in layerwise training. Each variant caches V views of
the training set (view 0 plain, the others under stage-0 augmentation) and trains with feature-space
augmentation (random crop, padding 1) on top; reported per stage: train and test accuracy and the gap.

    python benchmarks/views_bench.py [--config fmnist] [--out bench/views]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="fmnist")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--views", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--out", default="bench/views")
    args = p.parse_args()
    out = Path(args.out)
    cfg = load_config(args.config, args.set)
    variants = {f"V={v}": [f"cache.views={v}", "train.feature_crop_padding=1"] for v in args.views}
    with stopwatch() as watch:
        results = run_variants(cfg, variants, out, Console())
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
               "wall_seconds": watch.seconds, "variants": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    depth = len(next(iter(results.values()))["stages"])
    lines = [f"{summary['machine']}; {summary['date']}; `{summary['command']}` ({summary['wall_seconds'] / 60:.0f} min)",
             "", "| views | " + " | ".join(f"stage {j} train / test (gap)" for j in range(depth)) +
             " | caching s |", "|---|" + "---:|" * (depth + 1)]
    for name, r in results.items():
        cells = [f"{100 * s['train_acc']:.1f} / {100 * s['test_acc']:.1f} ({100 * (s['train_acc'] - s['test_acc']):+.1f})"
                 for s in r["stages"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['cache_seconds']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
