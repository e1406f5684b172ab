"""End to end vs each greedy stage, ImageNet-shaped, on one GPU (the body of gpu_check.sh).

The question: on one GPU, how fast does each greedy stage train, and in how much memory, when its
input sits in device memory, is recomputed through the frozen stages, or is read back from a cache;
and what does that make of a whole greedy run, cached against recomputed? It prints each row as it is
measured and the summary at the end, and saves OUT/results.json (the README's H200 table comes from
its `stages`, `e2e` and `summary`), OUT/memory.png and OUT/throughput.png.

Synthetic 224 px images, 1000 classes, Belilovsky's ImageNet k=3 layout (J=8, width 128, input
space-to-depth, downsampling at j=2,4,6), AMP bf16 and channels_last on CUDA. Random-init stages
stand in for trained ones: throughput and memory do not depend on the weights. Measured at --batch:
- the end-to-end network's training steps/s and allocator peak (space-reducing "sr" and naive "conv" head);
- per stage j, training steps/s and peak with its input (a) in device memory, (b) recomputed from the
  images through the frozen stages 0..j-1 for every batch (the published behaviour), (c) read back
  from a real cache of stage j-1's outputs through the cache loader, uncompressed (memmap) and zstd
  (decoded by --workers processes), and through DALI where it is installed; next to each, the
  loader's own ceiling (batches landed on the device with no training step);
- per stage, the time to cache its outputs (both codecs) against a bare forward over the same samples.
The summary (`cachetrain.bench.tools.gpu_summary`) turns these into the issue's ratios, next to what
the planner's FLOP model predicts (`cachetrain.plan.planner.cost_ratio`). Every step is the trainer's own
(`cachetrain.step.train_step`), timed by `cachetrain.bench.tools.time_total` after 2 warm-up steps.

    python benchmarks/gpu_bench.py OUT [--batch 256] [--steps 20] [--stages 8] [--tiny]

--tiny shrinks everything (32 px, width 8, batch 4, 3 steps, one CPU thread) so the script runs on a
CPU in seconds; the test suite runs it that way, with --stages 2 --no-dali. Without zarr, (c) and
the cache builds are left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cachetrain.bench.tools import (gpu_summary, imagenet_config, stepper, stopwatch, store_layout,
                                   time_total, write_features)
from cachetrain.config import Config
from cachetrain.device import autocast
from cachetrain.models.factory import e2e_network
from cachetrain.models import build_network, make_head
from cachetrain.plan.planner import Workload, cost_ratio, stage_costs
from cachetrain.plan.profile import step_memory
from cachetrain.models.factory import StageModel
from cachetrain.step import make_optimizer

HAVE_ZARR = importlib.util.find_spec("zarr") is not None and importlib.util.find_spec("numcodecs") is not None
HAVE_DALI = HAVE_ZARR and importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def config(tiny: bool, aux: str, stages: int = 8) -> Config:
    """The ImageNet layout (32 px and width 8 when tiny) with AMP bf16 and channels_last (CUDA only)."""
    return imagenet_config(aux, size=32 if tiny else 224, width=8 if tiny else 128, stages=stages, amp=True)


def timed_steps(model: nn.Module, batches, steps: int, device: torch.device, amp: bool) -> dict:
    """Train `steps` steps on batches from `batches()`, waiting for each batch included; samples/s after
    the first two steps; peak memory."""
    step = stepper(model, make_optimizer(model.parameters(), config(True, "conv").train), device, amp,
                   channels_last=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        # the benchmark's own resident data (images, the previous stage's outputs) is not training memory:
        # count the peak above what was allocated before the first step, plus the parameters
        base = torch.cuda.memory_allocated() - sum(p.numel() * p.element_size() for p in model.parameters())
    it, sizes = batches(), []

    def one() -> None:
        batch = next(it)
        sizes.append(len(batch[1]))
        step(batch)
    seconds = time_total(one, steps, warmup=2, device=device)
    out = {"samples_per_s": sum(sizes[2:]) / seconds}
    if device.type == "cuda":
        out["peak_allocated"] = torch.cuda.max_memory_allocated() - base
        out["peak_allocated_incl_resident_data"] = torch.cuda.max_memory_allocated()
        out["peak_reserved"] = torch.cuda.max_memory_reserved()
    return out


def forever(x: torch.Tensor, y: torch.Tensor, batch: int, prefix: nn.Module | None = None, amp: bool = False):
    """Endless batches of (x, y); with `prefix`, x goes through those frozen stages first (recompute)."""
    def gen():
        while True:
            for i in range(0, len(x) - batch + 1, batch):
                xb = x[i:i + batch]
                if prefix is not None:
                    with torch.no_grad(), autocast(xb.device, amp):
                        xb = prefix(xb)
                yield xb, y[i:i + batch]
    return gen


def build_cache(stage: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device,
                path: Path, j: int, codec: str, amp: bool) -> float:
    """Cache `stage`'s outputs over x the way `cachetrain cache` does; returns the seconds it took."""
    with torch.no_grad():
        shape = tuple(stage(x[:1]).shape[1:])
    info, layout = store_layout(shape, len(x), codec, batch, stage=j)
    with stopwatch(device) as watch:
        write_features(path, info, layout, x, y.cpu().numpy(), stage, amp)
    return watch.seconds


def bare_forward(stage: nn.Module, x: torch.Tensor, batch: int, device: torch.device, amp: bool) -> float:
    """Seconds for the same forward pass with the outputs thrown away (what caching is compared with)."""
    stage.eval()
    with stopwatch(device) as watch, torch.no_grad(), autocast(device, amp):
        for i in range(0, len(x), batch):
            stage(x[i:i + batch])
    return watch.seconds


def cached_batches(path: Path, batch: int, device: torch.device, workers: int, backend: str = "numpy"):
    """Endless batches read back from a cache store through the cache loader (numpy or DALI backend;
    epochs reshuffled). One loader serves every call of the returned generator, so its pinned batch
    ring is allocated once, as in training."""
    from cachetrain.cache import CacheReader
    from cachetrain.orders import ORDERS

    reader = CacheReader(path, "fp")
    n = reader.info.num_samples
    order = ORDERS["quasi_random"](n, reader.info.chunk_samples, 4, 0)
    if backend == "dali":
        from cachetrain.cache.dali_feed import DaliFeatureLoader

        dali = DaliFeatureLoader(reader, order, device, workers, 0, 0, False)

        def epoch_batches(epoch):
            return dali.train_batches(epoch, batch)
    else:
        from cachetrain.cache.loader import CacheLoader

        loader = CacheLoader(reader, device, workers=workers)

        def epoch_batches(epoch):
            return loader.batches(order.indices(epoch), batch)

    def gen():
        epoch = 0
        while True:
            for x, y in epoch_batches(epoch):
                if len(y) == batch:  # a short last batch would change what a step measures
                    yield x, y
            epoch += 1
    return gen


def loader_only(batches, steps: int, device: torch.device) -> dict:
    """The loader's own ceiling: batches/s landed on the device with no training step to hide behind."""
    it, sizes = batches(), []

    def one() -> None:
        sizes.append(len(next(it)[1]))
    seconds = time_total(one, steps, warmup=2, device=device)
    return {"samples_per_s": sum(sizes[2:]) / seconds}


def flop_prediction(cfg: Config, shape, classes: int, epochs: int) -> dict:
    """Greedy-cached / greedy-recompute time as the planner's FLOP model predicts it, per training
    sample: E epochs of each stage's own training plus one caching forward per cached stage (all but
    the last), against E epochs that also forward the frozen prefix."""
    costs = stage_costs(cfg, shape, classes)
    return {"epochs": epochs,
            "cached_over_recompute": cost_ratio(costs, Workload(train=1, test=0, epochs=epochs), range(len(costs) - 1)),
            "train_gflop_per_sample": [c.train_flops / 1e9 for c in costs],
            "forward_gflop_per_sample": [c.forward_flops / 1e9 for c in costs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--samples", type=int, default=0, help="samples per cache (default 4 batches)")
    p.add_argument("--workers", type=int, default=8, help="decode processes for the zstd stores")
    p.add_argument("--epochs", type=int, default=45, help="epochs per stage for the total-time ratio")
    p.add_argument("--codecs", default="none,zstd", help="cache codecs to build and read (comma-separated)")
    p.add_argument("--cache-dir", default=None, help="where the caches are written (default: the temp dir); "
                                                     "/dev/shm separates the writer's own speed from the disk's")
    p.add_argument("--no-dali", action="store_true", help="skip the DALI loader even where DALI is installed")
    p.add_argument("--stages", type=int, default=8, help="J: the first J stages of the layout (default all 8)")
    p.add_argument("--tiny", action="store_true", help="32 px, width 8, batch 4, 3 steps, one CPU thread: a smoke run")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.steps, args.workers = 4, 3, 1
        torch.set_num_threads(1)  # toy-sized ops on a shared CPU: more threads only wait for each other
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    codecs = [c for c in args.codecs.split(",") if c]
    cfg, cfg_conv = config(args.tiny, "sr", args.stages), config(args.tiny, "conv", args.stages)
    shape, classes = tuple(cfg.data.shape), cfg.data.num_classes
    n = args.samples or 4 * args.batch
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, *shape, generator=g).to(device)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
               "machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "batch": args.batch, "steps": args.steps, "samples": n, "tiny": args.tiny, "amp_bf16": amp,
               "channels_last": device.type == "cuda", "have_zarr": HAVE_ZARR, "have_dali": HAVE_DALI,
               "codecs": codecs, "cache_dir": args.cache_dir or tempfile.gettempdir(),
               "stage_input": "zarr cache via the cache loader" if HAVE_ZARR else "tensor in device memory (no zarr)",
               "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"gpu_check: torch {torch.__version__} | cuda {torch.cuda.is_available()} | {results['device']}; stage "
          f"inputs from: {results['stage_input']}", flush=True)

    def memory_layout(model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model

    results["e2e"] = {}
    for aux, c in (("sr", cfg), ("conv", cfg_conv)):
        e2e = memory_layout(e2e_network(c, shape, classes).to(device))
        row = timed_steps(e2e, forever(images, labels, args.batch), args.steps, device, amp)
        if device.type != "cuda":
            row["counted_bytes"] = step_memory(e2e, images[:args.batch], labels[:args.batch],
                                               make_optimizer(e2e.parameters(), c.train)).total_bytes
        results["e2e"][aux] = row
        print(f"end to end ({aux} head): {row}", flush=True)
        del e2e

    net = build_network(cfg.model, shape, seed=0)
    frozen: list[nn.Module] = []
    x = images
    results["stages"] = []
    # what each stage reads its input through: the numpy loader per codec, and DALI on uncompressed stores
    sources = codecs + (["none_dali"] if HAVE_DALI and "none" in codecs and not args.no_dali else [])
    results["sources"] = sources
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
        tmp = Path(tmp)
        for j in range(net.depth):
            row: dict = {"stage": j, "in_shape": list(x.shape[1:])}
            for aux, c in (("sr", cfg), ("conv", cfg_conv)):
                model = memory_layout(StageModel(net.stages[j], make_head(c.model, net, j, c.model.k, classes, 0))
                                      .to(device))
                row[f"in_memory_{aux}"] = timed_steps(model, forever(x, labels, args.batch), args.steps, device, amp)
                if device.type != "cuda":
                    row[f"in_memory_{aux}"]["counted_bytes"] = step_memory(
                        model, x[:args.batch], labels[:args.batch], make_optimizer(model.parameters(), c.train)
                    ).total_bytes
                if aux == "sr":
                    sr_model = model
            if j > 0:  # the published behaviour: forward the frozen prefix for every batch
                prefix = nn.Sequential(*frozen).eval()
                row["recompute"] = timed_steps(sr_model, forever(images, labels, args.batch, prefix, amp),
                                               args.steps, device, amp)
                if HAVE_ZARR:
                    for source in sources:
                        codec, backend = source.split("_")[0], "dali" if source.endswith("_dali") else "numpy"
                        batches = cached_batches(tmp / f"in_{codec}.zarr", args.batch, device,
                                                 0 if codec == "none" and backend == "numpy" else args.workers,
                                                 backend)
                        row[f"loader_only_{source}"] = loader_only(batches, args.steps, device)
                        row[f"cached_{source}"] = timed_steps(sr_model, batches, args.steps, device, amp)
            stage = net.stages[j].eval()
            frozen.append(stage)
            if j < net.depth - 1:  # cache this stage's outputs for the next one; time it against a bare forward
                row["bare_forward_s"] = bare_forward(stage, x, args.batch, device, amp)
                if HAVE_ZARR:
                    for codec in codecs:
                        old = tmp / f"in_{codec}.zarr"
                        if old.exists():
                            shutil.rmtree(old)
                        row[f"cache_build_{codec}_s"] = build_cache(stage, x, labels, args.batch, device,
                                                                   tmp / f"in_{codec}.zarr", j, codec, amp)
                        files = (tmp / f"in_{codec}.zarr").rglob("*")
                        row[f"cache_bytes_{codec}"] = sum(f.stat().st_size for f in files if f.is_file())
                with torch.no_grad():
                    x = torch.cat([stage(x[i:i + args.batch]) for i in range(0, n, args.batch)])
            results["stages"].append(row)
            print(f"stage {j}: {json.dumps(row)}", flush=True)
            del model, sr_model
    key = "peak_allocated" if device.type == "cuda" else "counted_bytes"
    results["summary"] = {**gpu_summary(results, args.epochs, key),
                          "flop_prediction": flop_prediction(cfg, shape, classes, args.epochs)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out, key)
    print(json.dumps(results["summary"], indent=2))
    print(f"wrote {out}")


def plot(r: dict, out: Path, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = r["stages"]
    names = [f"stage {s['stage']}" for s in stages] + ["end to end"]
    where = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, aux in enumerate(("sr", "conv")):
        vals = [s[f"in_memory_{aux}"][key] / 2**30 for s in stages] + [r["e2e"][aux][key] / 2**30]
        ax.bar(where + (i - 0.5) * 0.4, vals, 0.4, label=f"{aux} auxiliary head")
    ax.set_xticks(where, names, rotation=45)
    ax.set(ylabel="GiB", title=f"{r['device']}, batch {r['batch']}: peak training memory ({key})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)

    sources = [("in_memory_sr", "input in device memory"), ("recompute", "recompute frozen prefix")]
    if r["have_zarr"]:
        sources += [(f"cached_{c}", f"cache, {'uncompressed' if c.startswith('none') else c.split('_')[0]}"
                     f"{', DALI' if c.endswith('_dali') else ''}") for c in r.get("sources", r["codecs"])]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(sources)
    for i, (field, label) in enumerate(sources):
        vals = [s[field]["samples_per_s"] if field in s else s["in_memory_sr"]["samples_per_s"] for s in stages]
        ax.bar(where[:-1] + (i - (len(sources) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(where[:-1], names[:-1], rotation=45)
    ax.set(ylabel="training samples/s", title=f"{r['device']}, batch {r['batch']}: stage training throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close("all")


if __name__ == "__main__":
    main()
