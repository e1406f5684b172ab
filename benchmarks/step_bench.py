"""What a stage's input costs its training step on the CPU, apart from the wait for it: its memory
layout (`layout`) and who assembles its batches (`feed`).

The question: the cached regime's steps ran 10-14% longer than the recompute regime's on the 2-core
CPU. Is the input to blame, and how? Both ways time the training step of stage `--stage` of a
config's network (its block + auxiliary head; `cachetrain.step.train_step`, forward + backward +
optimizer step) on ReLU-like features of that stage's input shape, with
`cachetrain.bench.tools.time_each`: only the step is timed, never the wait for a batch. Each round
trains a fresh copy of the stage for `--steps` steps per arm, after `--warmup` (5) untimed steps; the arm
that goes first rotates by round. It prints each round's median step per arm and the ratios of the
medians over all rounds, and saves OUT/results.json (settings, `median_step_ms` per arm and round,
the ratios; `benchmarks/figures/layout_results_stage*.json` and `feed_results*.json`).

- `layout`: the same in-memory batch as C-order NCHW and as channels-last (NHWC). A frozen forward
  hands the next stage channels-last tensors, the layout oneDNN's convolutions run in, while a cache
  store holds NCHW. Ratio: `nchw_over_channels_last`.
- `feed`: batches from an uncompressed, memory-mapped store written as `cachetrain cache` writes one,
  in the config's traversal order (`loader.order`), fed three ways: by `CacheLoader.batches`
  assembling in a background thread (`background=True`, what CUDA hosts use), by it assembling inline
  (`background=False`, the CPU default), and the very same batches collected in memory beforehand.
  Ratios: `background_over_inline`, `inline_over_memory`. The memory arm is no perfect zero: its
  batches were made long before their step and come from DRAM, where a loader's batch was just
  written and is still in the CPU's caches.

    python benchmarks/step_bench.py layout [--config fmnist_bench] [--stage 3] [--batch 128]
                                           [--steps 60] [--rounds 3] [--warmup 5] [--out bench/layout]
    python benchmarks/step_bench.py feed   [--config fmnist_bench] [--stage 2] [--batch 128]
                                           [--steps 120] [--rounds 6] [--warmup 5] [--out bench/feed]

(These were benchmarks/layout_bench.py and benchmarks/feed_bench.py, with the same flags and output.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from cachetrain.bench.tools import stepper, store_layout, time_each, write_features
from cachetrain.config import Config, load_config
from cachetrain.models import build_network, make_head
from cachetrain.plan.planner import input_shape
from cachetrain.models.factory import StageModel
from cachetrain.step import make_optimizer

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DEFAULTS = {"layout": {"stage": 3, "steps": 60, "rounds": 3, "out": "bench/layout"},
            "feed": {"stage": 2, "steps": 120, "rounds": 6, "out": "bench/feed"}}


def num_classes(cfg: Config) -> int:
    return 10 if cfg.data.name == "fmnist" else cfg.data.num_classes


def median_step_ms(cfg: Config, j: int, batches, warmup: int) -> float:
    """Median step (ms) of a fresh stage j of `cfg`'s network trained over `batches` (x, y), after `warmup`
    untimed steps; the wait for each batch is not counted."""
    net = build_network(cfg.model, input_shape(cfg), cfg.train.seed)
    model = StageModel(net.stages[j], make_head(cfg.model, net, j, cfg.model.k, num_classes(cfg), cfg.train.seed))
    step = stepper(model, make_optimizer(model.parameters(), cfg.train), torch.device("cpu"))
    return 1000 * float(np.median(time_each(step, batches, warmup=warmup)))


def relu_features(n: int, shape: tuple[int, ...], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n ReLU-like samples as a store holds them (rounded through fp16), and their labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g).relu_().half().float()
    return x, torch.randint(0, classes, (n,), generator=g)


def layout_rounds(args, cfg: Config, shape: tuple[int, ...], log) -> dict[str, list[float]]:
    x, y = relu_features(args.batch, shape, num_classes(cfg))
    medians: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for r in range(args.rounds):
        for name in (list(LAYOUTS) if r % 2 == 0 else list(LAYOUTS)[::-1]):
            batch = (x.contiguous(memory_format=LAYOUTS[name]), y)
            medians[name].append(median_step_ms(cfg, args.stage, itertools.repeat(batch, args.warmup + args.steps),
                                                args.warmup))
            log(r, name, medians[name][-1])
    return medians


def feed_rounds(args, cfg: Config, shape: tuple[int, ...], log) -> dict[str, list[float]]:
    from cachetrain.cache import CacheReader
    from cachetrain.cache.loader import CacheLoader
    from cachetrain.orders import ORDERS

    n = (args.warmup + args.steps) * args.batch
    arms = ["background", "inline", "memory"]
    medians: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        x, y = relu_features(n, shape, num_classes(cfg))
        info, layout = store_layout(shape, n, "none", 256, stage=1)
        write_features(Path(tmp) / "features.zarr", info, layout, x, y.numpy())
        reader = CacheReader(Path(tmp) / "features.zarr", "fp")
        loaders = {arm: CacheLoader(reader, torch.device("cpu"), workers=0, background=arm == "background")
                   for arm in ("background", "inline")}
        # the config's traversal order: it decides how many samples each copy out of a chunk moves
        order = ORDERS[cfg.loader.order](n, reader.info.chunk_samples, cfg.loader.window_chunks, cfg.train.seed)
        for r in range(args.rounds):
            for arm in arms[r % 3:] + arms[:r % 3]:
                batches = loaders["inline" if arm == "memory" else arm].batches(order.indices(r), args.batch)
                medians[arm].append(median_step_ms(cfg, args.stage, list(batches) if arm == "memory" else batches,
                                                   args.warmup))
                log(r, f"fed {arm}", medians[arm][-1])
    return medians


def ratios(what: str, medians: dict[str, list[float]]) -> dict[str, float]:
    m = {arm: float(np.median(v)) for arm, v in medians.items()}
    if what == "layout":
        return {"nchw_over_channels_last": m["nchw"] / m["channels_last"]}
    return {"background_over_inline": m["background"] / m["inline"], "inline_over_memory": m["inline"] / m["memory"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=sorted(DEFAULTS), help="layout: NCHW vs channels-last; feed: who assembles batches")
    p.add_argument("--config", default="fmnist_bench")
    p.add_argument("--stage", type=int, help="stage whose step is timed (layout: 3, feed: 2)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, help="timed steps per arm and round (layout: 60, feed: 120)")
    p.add_argument("--rounds", type=int, help="rounds (layout: 3, feed: 6)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones, per arm and round")
    p.add_argument("--out", help="output folder (bench/layout, bench/feed)")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.what].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    cfg = load_config(args.config)
    shape = tuple(build_network(cfg.model, input_shape(cfg), cfg.train.seed).in_shapes[args.stage])

    def log(r: int, arm: str, ms: float) -> None:
        print(f"round {r}  {arm:16s} median step {ms:7.1f} ms", flush=True)
    medians = (layout_rounds if args.what == "layout" else feed_rounds)(args, cfg, shape, log)
    result = ratios(args.what, medians)
    print("; ".join(f"{name}: {value:.3f}" for name, value in result.items()) +
          f"  (median step, stage {args.stage}, input {shape}, batch {args.batch})")
    record = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, Python "
                         f"{platform.python_version()}, torch {torch.__version__}",
              "config": args.config, "stage": args.stage, "input_shape": list(shape), "batch": args.batch,
              "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "median_step_ms": medians, **result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
