"""What the benchmark scripts in benchmarks/ share, so that no script imports another.

- Timing. `stopwatch` times a block in wall seconds, synchronising CUDA on both sides. `time_total`
  times a number of calls after untimed warm-up calls, synchronising only before the first and after
  the last, so queued GPU work overlaps from call to call as it does in training. `time_each` times
  every call on its own (synchronised around each), leaving out the wait for its argument. Every
  benchmark times through these three; the step they time is the trainer's own (`train_step`).
- `store_layout` and `write_features`: a cache store of given features, laid out and written by the
  real caching pass (`write_store`), as `cachetrain cache` lays out and writes one.
- `imagenet_config`: Belilovsky et al.'s ImageNet layout (J=8, width 128, input
  space-to-depth, downsampling at j=2,4,6, k=3), shared by memory_bench.py and gpu_bench.py.
- `run_variants`: greedy runs that differ only in how stage outputs are cached (storage_bench.py,
  views_bench.py).
- `gpu_summary`: the ratios gpu_bench.py reports, computed from its measured rows alone (a pure
  function, so the tests check it against a table worked out by hand).
"""

from __future__ import annotations

import json

import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cachetrain.config import Config, apply_override

# -- timing ---------------------------------------------------------------------------------------------


def sync(device: torch.device | str | None) -> None:
    """Wait for the work queued on `device` (a no-op off CUDA)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stopwatch:
    seconds: float = float("nan")  # set when the timed block ends


@contextmanager
def stopwatch(device: torch.device | str | None = None) -> Iterator[Stopwatch]:
    """`with stopwatch(device) as w: ...` leaves the block's wall seconds in `w.seconds`, counting the
    GPU work it queued (CUDA is synchronised before the block starts and after it ends)."""
    watch = Stopwatch()
    sync(device)
    t0 = time.perf_counter()
    yield watch
    sync(device)
    watch.seconds = time.perf_counter() - t0


def time_total(fn: Callable[[], object], calls: int, warmup: int = 0, device: torch.device | None = None) -> float:
    """Seconds for `calls` calls of fn() after `warmup` untimed ones (one stopwatch around them all)."""
    for _ in range(warmup):
        fn()
    with stopwatch(device) as watch:
        for _ in range(calls):
            fn()
    return watch.seconds


def time_each(fn: Callable[[object], object], items: Iterable, warmup: int = 0,
              device: torch.device | None = None) -> np.ndarray:
    """Seconds of each call fn(item), item by item from `items`, leaving out the first `warmup` calls
    (run, not timed) and the wait for each item (a loader's, say): only the call is timed."""
    times = []
    for i, item in enumerate(items):
        with stopwatch(device) as watch:
            fn(item)
        if i >= warmup:
            times.append(watch.seconds)
    return np.array(times)


def stepper(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, amp: bool = False,
            channels_last: bool = False) -> Callable[[tuple[torch.Tensor, torch.Tensor]], None]:
    """step((x, y)): one training step of `model` (`cachetrain.step.train_step`, no scheduler), with
    the model put in training mode once here."""
    from cachetrain.step import train_step

    model.train()

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        train_step(model, batch[0], batch[1], optimizer, None, device, amp, channels_last)
    return step


# -- cache stores of given features -------------------------------------------------------------------


def store_layout(sample_shape: tuple[int, ...], n: int, codec: str = "none", batch: int = 256, stage: int = 0,
                 chunk_mib: float = 4.0):
    """(StoreInfo, Layout) of a float16 store of n samples of `sample_shape`, chunked as `cachetrain
    cache` chunks one at forward batch `batch`."""
    from cachetrain.cache import StoreInfo, plan_layout

    shape = tuple(int(d) for d in sample_shape)
    probe = StoreInfo(stage, 3, "train", "fp", "w", "i", "float16", codec, 1, n, shape, 1)
    layout = plan_layout(probe.sample_bytes, chunk_mib, n, batch)
    return replace(probe, chunk_samples=layout.chunk_samples), layout


def write_features(path: Path, info, layout, x: torch.Tensor, labels: np.ndarray | None = None,
                   stage: nn.Module | None = None, amp: bool = False) -> None:
    """Write stage(x) (x itself without a stage) as the store `info` at `path`, through the caching pass
    (`write_store`) on x's device; labels default to zeros."""
    from cachetrain.cache import write_store

    n = len(x)

    def batches(start: int, size: int):
        for i in range(start, n, size):
            yield x[i:i + size], None

    labels = np.zeros(n, dtype=np.int64) if labels is None else labels
    write_store(path, info, labels, stage or nn.Identity(), batches, layout, x.device, amp=amp)


def save_results(out: Path, summary: dict, lines: list[str]) -> dict:
    """A benchmark's ending: `summary` as OUT/results.json, its markdown `lines` as OUT/results.md and on
    stdout; returns `summary` (what `main` returns to the tests' smoke runs)."""
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


# -- the ImageNet layout --------------------------------------------------------------------------------


def imagenet_config(aux: str = "sr", k: int = 3, size: int = 224, width: int = 128, stages: int = 8,
                    amp: bool = False) -> Config:
    """Belilovsky et al.'s ImageNet layout on synthetic data with 1000 classes: J=`stages` (8 in the
    paper), input space-to-depth, downsampling at j=2,4,6, auxiliary head `aux` of depth k; SGD with lr
    0.1, weight decay 1e-4, batch 256; `amp` also turns on channels_last (both act on CUDA only)."""
    return Config.from_dict({
        "name": f"imagenet-shaped-{aux}",
        "data": {"name": "synthetic", "shape": [3, size, size], "num_classes": 1000},
        "model": {"arch": "layercnn", "stages": stages, "width": width, "input_psi": True,
                  "downsample": [j for j in (2, 4, 6) if j < stages], "k": k, "aux": aux},
        "train": {"batch_size": 256, "lr": 0.1, "weight_decay": 1e-4, "amp": amp, "channels_last": amp},
    })


# -- greedy variants that differ only in their caches ----------------------------------------------------


def variant_config(cfg: Config, run_dir: Path, overrides: list[str]) -> Config:
    raw = cfg.to_dict()
    for o in overrides:
        apply_override(raw, o)
    raw["run_dir"] = str(run_dir)
    return Config.from_dict(raw, source="variant " + " ".join(overrides))


def run_variants(cfg: Config, variants: dict[str, list[str]], out: Path, console) -> dict[str, dict]:
    """Greedy runs that differ only in how stage outputs are cached (`variants`: name -> --set overrides).

    Stage 0 trains once (its training does not depend on the cache); every variant then starts from a
    copy of that checkpoint, builds its own caches and trains stages 1..J-1 on them, so accuracy
    differences come from the cache format alone. Per variant: per-stage train/test accuracy, caching
    seconds, bytes per sample on disk and raw, and the compression ratio."""
    from cachetrain.run import Run, StageState
    from cachetrain.source import SPLITS
    from cachetrain.train.greedy import Greedy

    base = Greedy(Run(replace(cfg, run_dir=str(out / "stage0")), console=console))
    if base.state.stage_state(0) is not StageState.TRAINED:
        base.train_stage(0)
    results = {}
    for name, overrides in variants.items():
        run = out / name
        shutil.rmtree(run, ignore_errors=True)
        (run / "stages" / "stage_0").mkdir(parents=True)
        for f in ("checkpoint.pt", "metrics.jsonl"):
            shutil.copy(base.run.layout.unit_dir(0) / f, run / "stages" / "stage_0" / f)
        g = Greedy(Run(variant_config(cfg, run, overrides), console=console))
        console.print(f"[bold]variant {name}[/bold]: {' '.join(overrides)}")
        cache_seconds, stages = 0.0, []
        for j in range(cfg.model.stages):
            if g.state.stage_state(j) is not StageState.TRAINED:
                g.train_stage(j)
            if j in g.state.cached_stages():
                with stopwatch(g.run.device) as watch:
                    g.cache_stage(j)
                cache_seconds += watch.seconds
            m = g.run.records.read_metrics(j)[-1]
            stages.append({"stage": j, "train_acc": m["train_acc"], "test_acc": m["test_acc"]})
        rows = g.state.status()
        cached = [r for r in rows if r.cache_bytes]
        samples = sum(g.run.data.num_samples(s) for s in SPLITS)
        results[name] = {
            "overrides": overrides, "stages": stages, "final_test_acc": stages[-1]["test_acc"],
            "cache_seconds": cache_seconds,
            "bytes_per_sample": {r.j: r.cache_bytes / samples for r in cached},
            "raw_bytes_per_sample": {r.j: r.raw_bytes / samples for r in cached},
            "compression_ratio": {r.j: r.raw_bytes / r.cache_bytes for r in cached},
        }
    return results


# -- gpu_bench.py's summary ---------------------------------------------------------------------------------


def gpu_summary(r: dict, epochs: int, memory_key: str) -> dict:
    """The ratios of a gpu_bench.py run `r` (its results.json before the summary), from measured rows only.

    Seconds per sample of one epoch of every stage, by where stages 1..J-1 read their input (stage 0
    always trains on the images): in device memory, recomputed through the frozen prefix, or each cache
    source. A cache's total over `epochs` epochs adds its caching passes (per sample). The best plan by
    these rates takes, per stage, whichever of recompute and the caches trains faster. Memory ratios
    use `memory_key` of each row (the allocator's peak on CUDA, counted bytes on the CPU)."""
    st = r["stages"]
    s: dict = {f"largest_stage_over_e2e_memory_{aux}": max(x[f"in_memory_{aux}"][memory_key] for x in st)
               / r["e2e"][aux][memory_key] for aux in ("sr", "conv")}
    first = 1 / st[0]["in_memory_sr"]["samples_per_s"]
    per_sample = {"in_memory": sum(1 / x["in_memory_sr"]["samples_per_s"] for x in st),
                  "recompute": first + sum(1 / x["recompute"]["samples_per_s"] for x in st[1:])}
    if r["have_zarr"]:
        n = r["samples"]
        for codec in r["codecs"]:
            build = sum(x[f"cache_build_{codec}_s"] for x in st[:-1])
            s[f"cache_build_over_bare_forward_{codec}"] = build / sum(x["bare_forward_s"] for x in st[:-1])
            s[f"cache_build_MB_per_s_{codec}"] = sum(x[f"cache_bytes_{codec}"] for x in st[:-1]) / build / 1e6
        for source in r.get("sources", r["codecs"]):
            build = sum(x[f"cache_build_{source.split('_')[0]}_s"] for x in st[:-1]) / n
            per_sample[f"cached_{source}"] = first + sum(1 / x[f"cached_{source}"]["samples_per_s"] for x in st[1:])
            s[f"cached_{source}_over_recompute_{epochs}_epochs"] = ((epochs * per_sample[f"cached_{source}"] + build)
                                                                    / (epochs * per_sample["recompute"]))
            s[f"cached_{source}_over_in_memory_per_epoch"] = per_sample[f"cached_{source}"] / per_sample["in_memory"]
        best = first + sum(min(1 / x["recompute"]["samples_per_s"],
                               *(1 / x[f"cached_{c}"]["samples_per_s"] for c in r["codecs"])) for x in st[1:])
        s["best_of_cache_or_recompute_per_stage_over_recompute"] = best / per_sample["recompute"]
        s["cache_wins_at_stages"] = [x["stage"] for x in st[1:] if max(
            x[f"cached_{c}"]["samples_per_s"] for c in r["codecs"]) > x["recompute"]["samples_per_s"]]
    s["in_memory_over_recompute_per_epoch"] = per_sample["in_memory"] / per_sample["recompute"]
    s["seconds_per_sample_one_epoch_each_stage"] = per_sample
    return s
