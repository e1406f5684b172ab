"""End to end vs each greedy stage on its cache, ImageNet-shaped, for one GPU (the body of gpu_check.sh).

Synthetic 224 px images, 1000 classes, Belilovsky's ImageNet k=3 layout (J=8, width 128, input
space-to-depth, downsampling at j=2,4,6), AMP bf16 and channels_last on CUDA. For the end-to-end
network and for every greedy stage (block + auxiliary head), a number of training steps at --batch:
steady-state samples/s and the allocator's peak memory. Stage j reads its input from a real cache
of stage j-1's outputs (random-init frozen stages, uncompressed zarr store, the memmap loader) when
zarr is installed; otherwise from a tensor in GPU memory, and results.json says so.

    python benchmarks/gpu_bench.py OUT [--batch 256] [--steps 20] [--tiny]

--tiny shrinks everything (32 px, width 8, batch 4, 3 steps) so the script runs on a CPU in seconds:
the test suite runs it that way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cachetrain.config import Config
from cachetrain.e2e import e2e_network
from cachetrain.models import build_network, make_head
from cachetrain.profile import step_memory
from cachetrain.trainer import StageModel, make_optimizer

HAVE_ZARR = importlib.util.find_spec("zarr") is not None and importlib.util.find_spec("numcodecs") is not None


class _Shape:
    def __init__(self, shape, classes):
        self.sample_shape, self.num_classes = shape, classes


def config(tiny: bool, aux: str) -> Config:
    size, width = (32, 8) if tiny else (224, 128)
    return Config.from_dict({
        "name": "gpu-check", "data": {"name": "synthetic", "shape": [3, size, size], "num_classes": 1000},
        "model": {"arch": "layercnn", "stages": 8, "width": width, "input_psi": True, "downsample": [2, 4, 6],
                  "k": 3, "aux": aux},
        "train": {"lr": 0.1, "weight_decay": 1e-4, "amp": True, "channels_last": True}})


def timed_steps(model: nn.Module, batches, steps: int, device: torch.device, amp: bool) -> dict:
    """Train `steps` steps on batches from `batches()`; samples/s after the first two steps; peak memory."""
    opt = make_optimizer(model.parameters(), config(True, "conv").train)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    it, n, t0 = batches(), 0, None
    for step in range(steps + 2):
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
        x, y = next(it)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"samples_per_s": n / (time.perf_counter() - t0)}
    if device.type == "cuda":
        out["peak_allocated"] = torch.cuda.max_memory_allocated()
        out["peak_reserved"] = torch.cuda.max_memory_reserved()
    return out


def forever(x: torch.Tensor, y: torch.Tensor, batch: int):
    def gen():
        while True:
            for i in range(0, len(x) - batch + 1, batch):
                yield x[i:i + batch], y[i:i + batch]
    return gen


def cached_batches(features: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device, tmp: Path, j: int):
    """Write features to an uncompressed cache store and read them back through the cache loader."""
    from cachetrain.cache import CacheReader, StoreInfo, plan_layout, write_store
    from cachetrain.loader import CacheLoader

    n, shape = len(features), tuple(features.shape[1:])
    probe = StoreInfo(j, 3, "train", "fp", "w", "i", "float16", "none", 3, n, shape, 1)
    layout = plan_layout(probe.sample_bytes, 4.0, n, batch)
    info = StoreInfo(j, 3, "train", "fp", "w", "i", "float16", "none", 3, n, shape, layout.chunk_samples)

    def inputs(start, size):
        for i in range(start, n, size):
            yield features[i:i + size], None

    write_store(tmp / f"stage_{j}.zarr", info, y.cpu().numpy(), nn.Identity(), inputs, layout, torch.device("cpu"))
    loader = CacheLoader(CacheReader(tmp / f"stage_{j}.zarr", "fp"), device, workers=0)

    def gen():
        epoch = 0
        while True:
            order = np.random.default_rng(epoch).permutation(n)
            for x, yy in loader.batches(order[: n // batch * batch], batch):
                yield x, yy
            epoch += 1
    return gen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--aux", default="sr", choices=["sr", "conv"])
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.steps = 4, 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config(args.tiny, args.aux)
    shape, classes = tuple(cfg.data.shape), cfg.data.num_classes
    n = 2 * args.batch
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, *shape, generator=g).to(device)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
               "machine": platform.platform(), "torch": torch.__version__, "batch": args.batch, "steps": args.steps,
               "aux": args.aux, "tiny": args.tiny, "amp_bf16": device.type == "cuda",
               "stage_input": "zarr cache via the cache loader" if HAVE_ZARR else "tensor in device memory (no zarr)",
               "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"device {results['device']}, stage inputs from: {results['stage_input']}", flush=True)

    e2e = e2e_network(cfg, _Shape(shape, classes)).to(device)
    if device.type == "cuda":
        e2e = e2e.to(memory_format=torch.channels_last)
    results["e2e"] = timed_steps(e2e, forever(images, labels, args.batch), args.steps, device, True)
    if device.type != "cuda":
        results["e2e"]["counted_bytes"] = step_memory(e2e, images[:args.batch], labels[:args.batch],
                                                      make_optimizer(e2e.parameters(), cfg.train)).total_bytes
    print(f"end to end: {results['e2e']}", flush=True)
    del e2e

    net = build_network(cfg.model, shape, seed=0)
    x = images
    results["stages"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for j in range(net.depth):
            model = StageModel(net.stages[j], make_head(cfg.model, net, j, cfg.model.k, classes, 0)).to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            source = (cached_batches(x.half().cpu(), labels, args.batch, device, Path(tmp), j) if HAVE_ZARR and j > 0
                      else forever(x, labels, args.batch))
            row = {"stage": j, "in_shape": list(x.shape[1:]),
                   **timed_steps(model, source, args.steps, device, True)}
            if device.type != "cuda":
                row["counted_bytes"] = step_memory(model, x[:args.batch], labels[:args.batch],
                                                   make_optimizer(model.parameters(), cfg.train)).total_bytes
            results["stages"].append(row)
            print(f"stage {j}: {row}", flush=True)
            with torch.no_grad():  # the next stage's input: this stage's outputs, frozen
                frozen = model.stage.eval()
                x = torch.cat([frozen(x[i:i + args.batch]) for i in range(0, n, args.batch)])
            del model
    key = "peak_allocated" if device.type == "cuda" else "counted_bytes"
    results["largest_stage_over_e2e_memory"] = max(s[key] for s in results["stages"]) / results["e2e"][key]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out, key)
    print(f"largest stage / end-to-end memory: {results['largest_stage_over_e2e_memory']:.3f}; wrote {out}")


def plot(r: dict, out: Path, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"stage {s['stage']}" for s in r["stages"]] + ["end to end"]
    for field, label, fname in ((key, "GiB", "memory.png"), ("samples_per_s", "samples/s", "throughput.png")):
        vals = [s[field] for s in r["stages"]] + [r["e2e"][field]]
        vals = [v / 2**30 for v in vals] if field == key else vals
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(names, vals, color=["tab:blue"] * len(r["stages"]) + ["tab:gray"])
        ax.set(ylabel=label, title=f"{r['device']}, batch {r['batch']}: {field}")
        ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
    plt.close("all")


if __name__ == "__main__":
    main()
