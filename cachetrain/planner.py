"""The cache planner: which stage outputs to cache under a disk budget.

Stage j trains on its input every epoch. If stage j-1's output is cached that input is read from
disk; otherwise it is recomputed from the nearest cached stage a < j (or from the images, a = -1) by
forwarding through the frozen stages a+1..j-1, for every training and test sample, every epoch.
Caching stage s costs one forward pass over the data (through its own uncached ancestors too) and
its store's bytes. The planner picks the set of cached stages with the least total FLOPs (recompute
+ caching passes) whose stores fit the budget.

Exact search: stages are decided in order and the only thing the future depends on is the last
cached stage, so a dynamic programme keeps, for each possible last cached stage, the Pareto front of
(disk bytes, FLOPs) over the choices so far. Stores are counted at their raw (uncompressed) size,
so a plan that fits stays within budget whatever zstd achieves.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cachetrain.cache.manifest import DTYPES
from cachetrain.config import Config
from cachetrain.models import build_network, make_head
from cachetrain.profile import forward_flops, train_step_flops


@dataclass(frozen=True)
class StageCost:
    stage: int
    out_shape: tuple[int, int, int]
    forward_flops: float  # per sample, the block alone (what recomputing it costs)
    train_flops: float  # per sample, one training step of block + head (forward + backward): the same in every plan
    sample_bytes: dict[str, int]  # per storage dtype


@dataclass(frozen=True)
class Workload:
    train: int  # training samples
    test: int
    epochs: int  # per stage
    views: int = 1  # cached training views (disk and caching passes scale with it)


@dataclass(frozen=True)
class Plan:
    cached: tuple[int, ...]
    flops: float  # recompute + caching passes, over the whole greedy run
    disk_bytes: int


def parse_size(text: str) -> int:
    """'2TB' (decimal), '1.5TiB' (binary), '500G', '123' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--disk-budget {text!r}: expected a size like 2TB, 500GB or 1.5TiB")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGTP".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def input_shape(cfg: Config, image_size: int | None = None) -> tuple[int, int, int]:
    d = cfg.data
    c, h, w = {"fmnist": (1, 28, 28), "imagefolder": (3, d.image_size, d.image_size), "synthetic": tuple(d.shape)}[d.name]
    return (c, image_size, image_size) if image_size else (c, h, w)


def stage_costs(cfg: Config, in_shape: tuple[int, int, int], num_classes: int = 10) -> list[StageCost]:
    net = build_network(cfg.model, in_shape, cfg.train.seed)
    costs = []
    for j, stage in enumerate(net.stages):
        x = torch.zeros(2, *net.in_shapes[j])  # batch 2: BN in training mode needs more than one value
        model = torch.nn.Sequential(stage, make_head(cfg.model, net, j, cfg.model.k, num_classes, 0))
        n = int(np.prod(net.out_shapes[j]))
        costs.append(StageCost(j, net.out_shapes[j], forward_flops(stage, x) / 2,
                               train_step_flops(model, x, torch.zeros(2, dtype=torch.long)) / 2,
                               {d: n * np.dtype(DTYPES[d][0]).itemsize for d in DTYPES}))
    return costs


def _recompute(costs: list[StageCost], a: int, j: int) -> float:
    """Per-sample FLOPs to produce stage j's input from stage a's output (a = -1: the images)."""
    return sum(c.forward_flops for c in costs[a + 1:j])


def evaluate(costs: list[StageCost], w: Workload, cached: tuple[int, ...], dtype: str) -> Plan:
    """FLOPs and disk of one cache set (the brute-force reference for `plan`)."""
    flops, disk, a = 0.0, 0, -1
    for j in range(len(costs)):
        flops += w.epochs * (w.train + w.test) * _recompute(costs, a, j)
        if j in cached:
            flops += (w.train * w.views + w.test) * _recompute(costs, a, j + 1)
            disk += (w.train * w.views + w.test) * costs[j].sample_bytes[dtype]
            a = j
    return Plan(tuple(sorted(cached)), flops, disk)


def brute_force(costs: list[StageCost], w: Workload, budget: int, dtype: str) -> Plan:
    candidates = range(len(costs) - 1)
    plans = [evaluate(costs, w, s, dtype) for r in range(len(costs)) for s in itertools.combinations(candidates, r)]
    return min((p for p in plans if p.disk_bytes <= budget), key=lambda p: (p.flops, p.disk_bytes))


def plan(costs: list[StageCost], w: Workload, budget: int, dtype: str) -> Plan:
    """The cache set of least FLOPs whose stores fit `budget` bytes (the last stage is never cached:
    nothing reads it)."""
    # fronts[a]: Pareto-optimal (disk, flops, cached) for choices so far, with a the last cached stage
    fronts: dict[int, list[tuple[int, float, tuple[int, ...]]]] = {-1: [(0, 0.0, ())]}
    for j in range(len(costs)):
        nxt: dict[int, list] = {}
        for a, front in fronts.items():
            train = w.epochs * (w.train + w.test) * _recompute(costs, a, j)
            for disk, flops, cached in front:
                nxt.setdefault(a, []).append((disk, flops + train, cached))
                if j < len(costs) - 1:
                    d = disk + (w.train * w.views + w.test) * costs[j].sample_bytes[dtype]
                    if d <= budget:
                        build = (w.train * w.views + w.test) * _recompute(costs, a, j + 1)
                        nxt.setdefault(j, []).append((d, flops + train + build, cached + (j,)))
        fronts = {a: _pareto(points) for a, points in nxt.items()}
    disk, flops, cached = min((p for front in fronts.values() for p in front), key=lambda p: (p[1], p[0]))
    return Plan(cached, flops, disk)


def _pareto(points: list[tuple[int, float, tuple[int, ...]]]) -> list[tuple[int, float, tuple[int, ...]]]:
    """Drop every point that another beats on both disk and FLOPs."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return front


def describe(costs: list[StageCost], w: Workload, chosen: Plan, dtype: str) -> dict:
    """The plan as saved to <run>/plan.json and printed: per stage, where its input comes from."""
    stages, a = [], -1
    for c in costs:
        j = c.stage
        source = "images" if a < 0 else f"cache {a}"
        through = list(range(a + 1, j))
        stages.append({**asdict(c), "cached": j in chosen.cached, "input": source, "recompute_through": through,
                       "store_bytes": {d: (w.train * w.views + w.test) * b for d, b in c.sample_bytes.items()}})
        if j in chosen.cached:
            a = j
    none = evaluate(costs, w, (), dtype)
    own = sum(w.epochs * w.train * c.train_flops for c in costs)  # every plan trains every stage the same
    return {"cached": list(chosen.cached), "dtype": dtype, "disk_bytes": chosen.disk_bytes,
            "flops_training": own, "flops_plan": chosen.flops, "flops_recompute_everything": none.flops,
            "flops_saved": none.flops - chosen.flops,
            "total_vs_recompute_everything": (own + chosen.flops) / (own + none.flops),
            "workload": asdict(w), "stages": stages}
