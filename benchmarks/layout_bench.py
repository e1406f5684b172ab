"""One stage's training step on the same features in two memory layouts: NCHW against channels-last.

On the CPU, a frozen forward hands the next stage channels-last (NHWC) tensors, the layout oneDNN's
convolutions run in, while a cache store holds C-order NCHW. This times the step of stage `--stage`
of a config's network (its block + auxiliary head, forward + backward + optimizer step) on the same
batch in both layouts. Each round trains a fresh copy of the stage for `--steps` steps per layout,
the layout that goes first alternating by round; the median step of each (after 5 warm-up steps) is
reported, and the ratio of the medians over all rounds.

    python benchmarks/layout_bench.py [--config configs/fmnist_bench.yaml] [--stage 3] [--batch 128]
                                      [--steps 60] [--rounds 3] [--out bench/layout]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cachetrain.config import load_config
from cachetrain.models import build_network, make_head
from cachetrain.trainer import StageModel, make_optimizer

WARMUP = 5
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def in_shape(cfg) -> tuple[int, int, int]:
    return (1, 28, 28) if cfg.data.name == "fmnist" else tuple(cfg.data.shape)


def num_classes(cfg) -> int:
    return 10 if cfg.data.name == "fmnist" else cfg.data.num_classes


def step_times(cfg, j: int, batches) -> np.ndarray:
    """Step times (s) of a fresh stage j trained over `batches` (x, y), after WARMUP steps; the wait for
    each batch is not counted."""
    net = build_network(cfg.model, in_shape(cfg), cfg.train.seed)
    model = StageModel(net.stages[j], make_head(cfg.model, net, j, cfg.model.k, num_classes(cfg), cfg.train.seed))
    model.train()
    optimizer, loss_fn = make_optimizer(model.parameters(), cfg.train), nn.CrossEntropyLoss()
    times = []
    for x, y in batches:
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return np.array(times[WARMUP:])


def save_results(args, shape, medians: dict[str, list[float]], ratios: dict[str, float]) -> None:
    """The run's settings, per-round medians and ratios, as `args.out`/results.json."""
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, Python "
                         f"{platform.python_version()}, torch {torch.__version__}",
              "config": args.config, "stage": args.stage, "input_shape": list(shape), "batch": args.batch,
              "steps": args.steps, "rounds": args.rounds, "median_step_ms": medians, **ratios}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'results.json'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fmnist_bench.yaml")
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/layout")
    args = p.parse_args()

    cfg = load_config(args.config)
    shape = build_network(cfg.model, in_shape(cfg), cfg.train.seed).in_shapes[args.stage]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *shape, generator=g).relu_().half().float()  # ReLU maps, as a store holds them
    y = torch.randint(0, num_classes(cfg), (args.batch,), generator=g)
    medians: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for r in range(args.rounds):
        for name in (list(LAYOUTS) if r % 2 == 0 else list(LAYOUTS)[::-1]):
            batch = (x.contiguous(memory_format=LAYOUTS[name]), y)
            ms = 1000 * np.median(step_times(cfg, args.stage, itertools.repeat(batch, WARMUP + args.steps)))
            medians[name].append(float(ms))
            print(f"round {r}  {name:14s} median step {ms:7.1f} ms", flush=True)
    ratio = float(np.median(medians["nchw"]) / np.median(medians["channels_last"]))
    print(f"NCHW / channels-last median step: {ratio:.3f}  (stage {args.stage}, input {tuple(shape)}, "
          f"batch {args.batch})")
    save_results(args, shape, medians, {"nchw_over_channels_last": ratio})


if __name__ == "__main__":
    main()
