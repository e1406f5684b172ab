"""Shared by storage_bench and views_bench: greedy runs that differ only in how stage outputs are cached.

Stage 0 trains once (its training does not depend on the cache); every variant then starts from a
copy of that checkpoint, builds its own caches and trains stages 1..J-1 on them, so accuracy
differences come from the cache format alone.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from cachetrain.config import Config, apply_override
from cachetrain.data import SPLITS
from cachetrain.greedy import Greedy


def variant_config(cfg: Config, run_dir: Path, overrides: list[str]) -> Config:
    raw = cfg.to_dict()
    for o in overrides:
        apply_override(raw, o)
    raw["run_dir"] = str(run_dir)
    return Config.from_dict(raw, source="variant " + " ".join(overrides))


def run_variants(cfg: Config, variants: dict[str, list[str]], out: Path, console: Console) -> dict[str, dict]:
    base = Greedy(replace(cfg, run_dir=str(out / "stage0")), console)
    if base.stage_state(0) != "trained":
        base.train_stage(0)
    results = {}
    for name, overrides in variants.items():
        run = out / name
        shutil.rmtree(run, ignore_errors=True)
        (run / "stages" / "stage_0").mkdir(parents=True)
        for f in ("checkpoint.pt", "metrics.jsonl"):
            shutil.copy(base.run.stage_dir(0) / f, run / "stages" / "stage_0" / f)
        g = Greedy(variant_config(cfg, run, overrides), console)
        console.print(f"[bold]variant {name}[/bold]: {' '.join(overrides)}")
        cache_seconds, stages = 0.0, []
        for j in range(g.depth):
            if g.stage_state(j) != "trained":
                g.train_stage(j)
            if j in g.cached_stages():
                t0 = time.perf_counter()
                g.cache_stage(j)
                cache_seconds += time.perf_counter() - t0
            m = g.run.read_metrics(j)[-1]
            stages.append({"stage": j, "train_acc": m["train_acc"], "test_acc": m["test_acc"]})
        rows = g.status()
        cached = [r for r in rows if r.cache_bytes]
        samples = sum(g.data.num_samples(s) for s in SPLITS)
        results[name] = {
            "overrides": overrides, "stages": stages, "final_test_acc": stages[-1]["test_acc"],
            "cache_seconds": cache_seconds,
            "bytes_per_sample": {r.j: r.cache_bytes / samples for r in cached},
            "raw_bytes_per_sample": {r.j: r.raw_bytes / samples for r in cached},
            "compression_ratio": {r.j: r.raw_bytes / r.cache_bytes for r in cached},
        }
    return results
