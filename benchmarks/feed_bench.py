"""What the cache loader costs a CPU training step that it feeds, by who assembles the batches: a
background thread beside the step, the consumer's own thread between steps, or nobody (the same
batches collected in memory beforehand).

The cached regime's steps ran 10-14% longer than the recompute regime's on the 2-core CPU even with
channels-last batches. This isolates the loader: a store of ReLU-like fp16 features of stage
`--stage`'s input shape is written as `cachetrain cache` writes one (uncompressed, memory-mapped),
then each round trains a fresh copy of the stage (block + auxiliary head) for `--steps` steps three
ways: fed by `CacheLoader.batches` assembling in a background thread (`background=True`, what CUDA
hosts use), fed by it assembling inline (`background=False`, the CPU default), and fed the very same
float32 batches collected beforehand. Batches follow the config's traversal order (`loader.order`),
as in training. The feed that goes first rotates by round. Only the step is timed, never the wait for
a batch; the median step of each (after 5 warm-up steps) is reported, and the ratios of the medians
over all rounds. The memory feed is no perfect zero: its batches were made long before their step
and come from DRAM, where a loader's batch was just written and is still in the CPU's caches.

    python benchmarks/feed_bench.py [--config configs/fmnist_bench.yaml] [--stage 2] [--batch 128]
                                    [--steps 120] [--rounds 6] [--out bench/feed]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from cachetrain.cache import CacheReader, StoreInfo, plan_layout, write_store
from cachetrain.config import load_config
from cachetrain.loader import CacheLoader
from cachetrain.models import build_network
from cachetrain.orders import ORDERS
from layout_bench import WARMUP, in_shape, num_classes, save_results, step_times  # this script's folder is on sys.path


def write_features(path: Path, shape: tuple[int, ...], n: int, classes: int) -> CacheReader:
    """An uncompressed fp16 store of n ReLU-like samples, laid out as a caching pass lays it out."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g).relu_()
    labels = torch.randint(0, classes, (n,), generator=g).numpy()
    layout = plan_layout(int(np.prod(shape)) * 2, 4.0, n, 256)
    info = StoreInfo(1, 2, "train", "fp", "w", "i", "float16", "none", 1, n, shape, layout.chunk_samples)

    def batches(start, size):
        for i in range(start, n, size):
            yield x[i:i + size], None
    write_store(path, info, labels, torch.nn.Identity(), batches, layout, torch.device("cpu"))
    return CacheReader(path, "fp")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fmnist_bench.yaml")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default="bench/feed")
    args = p.parse_args()

    cfg = load_config(args.config)
    shape = tuple(build_network(cfg.model, in_shape(cfg), cfg.train.seed).in_shapes[args.stage])
    n = (WARMUP + args.steps) * args.batch
    arms = ["background", "inline", "memory"]
    medians: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        reader = write_features(Path(tmp) / "features.zarr", shape, n, num_classes(cfg))
        loaders = {arm: CacheLoader(reader, torch.device("cpu"), workers=0, background=arm == "background")
                   for arm in ("background", "inline")}
        # the config's traversal order: it decides how many samples each copy out of a chunk moves
        order = ORDERS[cfg.loader.order](n, reader.info.chunk_samples, cfg.loader.window_chunks, cfg.train.seed)
        for r in range(args.rounds):
            for arm in arms[r % 3:] + arms[:r % 3]:
                batches = loaders["inline" if arm == "memory" else arm].batches(order.indices(r), args.batch)
                ms = 1000 * float(np.median(step_times(cfg, args.stage, list(batches) if arm == "memory" else batches)))
                medians[arm].append(ms)
                print(f"round {r}  fed {arm:10s} median step {ms:7.1f} ms", flush=True)
    m = {arm: float(np.median(v)) for arm, v in medians.items()}
    ratios = {"background_over_inline": m["background"] / m["inline"], "inline_over_memory": m["inline"] / m["memory"]}
    print(f"median step, fed by a background thread / inline: {ratios['background_over_inline']:.3f}; inline / from "
          f"memory: {ratios['inline_over_memory']:.3f}  (stage {args.stage}, input {shape}, batch {args.batch})")
    save_results(args, shape, medians, ratios)


if __name__ == "__main__":
    main()
