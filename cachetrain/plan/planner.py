"""The cache planner: which stage outputs to cache under a disk budget.

Stage j trains on its input every epoch. If stage j-1's output is cached that input is read from
disk; otherwise it is recomputed from the nearest cached stage a < j (or from the images, a = -1) by
forwarding through the frozen stages a+1..j-1, for every training and test sample, every epoch.
Caching stage s costs one forward pass over the data (through its own uncached ancestors too) and
its store's bytes. The planner picks the set of cached stages of least total cost whose stores fit
the budget, under one of two cost models:
- FLOPs (the default): recompute + caching passes; reading a cache is free. Right where compute is
  the scarce thing (a CPU, or deep narrow stages). This is also the FLOP prediction of the
  greedy-cached / greedy-recompute time ratio that `cachetrain bench` and benchmarks/gpu_bench.py
  report (`cost_ratio`), so there is one FLOP model in the package.
- Seconds, from a machine's measured rates (FLOP/s, cache read and write bytes/s): a stage's epoch
  takes the longer of its compute and reading its input cache (the loader prefetches while the step
  runs), a caching pass the longest of its forward, read and write. On an H200 this is what decides:
  the wide early stages of the ImageNet layout train faster recomputed than read back (3.2 MB a
  sample at ~25 GB/s), and a caching pass is bound by the writer, not the forward.

Exact search: stages are decided in order and the only thing the future depends on is the last
cached stage, so a dynamic programme keeps, for each possible last cached stage, the Pareto front of
(disk bytes, cost) over the choices so far. Stores are counted at their raw (uncompressed) size,
so a plan that fits stays within budget whatever zstd achieves.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

import torch

from cachetrain.cache.formats import FORMATS
from cachetrain.config import Config
from cachetrain.models import build_network, make_head
from cachetrain.plan.profile import forward_flops, train_step_flops


@dataclass(frozen=True)
class StageCost:
    stage: int
    out_shape: tuple[int, int, int]
    forward_flops: float  # per sample, the block alone (what recomputing it costs)
    train_flops: float  # per sample, one training step of block + head (forward + backward): the same in every plan
    sample_bytes: dict[str, int]  # per storage dtype
    eval_flops: float = 0.0  # per sample, a forward of block + head (each epoch's test evaluation): every plan


@dataclass(frozen=True)
class Workload:
    train: int  # training samples
    test: int
    epochs: int  # per stage
    views: int = 1  # cached training views (disk and caching passes scale with it)


@dataclass(frozen=True)
class Plan:
    cached: tuple[int, ...]
    cost: float  # in the cost model's unit, over the whole greedy run
    disk_bytes: int


class FlopCost:
    """Recompute and caching-pass FLOPs; reading a cache costs nothing. Every plan trains (and evaluates)
    every stage the same, so the stages' own work is left out of the comparison (`constant` adds it back)."""

    unit = "FLOP"

    def train(self, costs: list[StageCost], w: Workload, a: int, j: int, dtype: str) -> float:
        """Producing stage j's input from the last cached stage a, every epoch."""
        return w.epochs * (w.train + w.test) * _recompute(costs, a, j)

    def build(self, costs: list[StageCost], w: Workload, a: int, j: int, dtype: str) -> float:
        """Caching stage j's outputs, forwarding from stage a's cache (or the images)."""
        return (w.train * w.views + w.test) * _recompute(costs, a, j + 1)

    def constant(self, costs: list[StageCost], w: Workload) -> float:
        """Each stage's own training steps and test evaluations, every epoch."""
        return sum(w.epochs * (w.train * c.train_flops + w.test * c.eval_flops) for c in costs)


FLOPS = FlopCost()  # stateless: the default cost model


@dataclass(frozen=True)
class Rates:
    """Seconds from a machine's measured rates (see the module docstring). Reading the images is taken
    to keep up in every plan. A cache is read at the page-cache rate while its stores fit in free RAM;
    given the disk's cold read rate and free RAM (`cachetrain plan --measure`, cachetrain/plan/rates.py),
    a cache bigger than free RAM cannot stay cached between epochs and is read at the disk's rate."""

    flops_per_s: float  # what the training steps reach
    read_bytes_per_s: float  # what the cache loader lands on the device while a stage trains (page cache)
    write_bytes_per_s: float  # what a caching pass writes
    disk_read_bytes_per_s: float | None = None  # the same from the disk, cold (None: read_bytes_per_s always)
    free_ram_bytes: int | None = None  # a cache whose stores are bigger is read from the disk
    source: str = "given"  # where the rates came from, for the plan's caption
    unit = "s"

    def from_disk(self, store_bytes: float) -> bool:
        """Whether a cache of `store_bytes` (all its stores: every view and the test split) is read from the
        disk every epoch: it does not fit in free RAM, and the disk's rate is known."""
        return self.disk_read_bytes_per_s is not None and self.free_ram_bytes is not None \
            and store_bytes > self.free_ram_bytes

    def read_rate(self, store_bytes: float) -> float:
        """Bytes/s a stage reads a cache of `store_bytes` at."""
        return self.disk_read_bytes_per_s if self.from_disk(store_bytes) else self.read_bytes_per_s

    def _read(self, costs: list[StageCost], w: Workload, a: int, dtype: str) -> float:
        if a < 0:
            return 0.0
        per_sample = costs[a].sample_bytes[dtype]
        return per_sample / self.read_rate((w.train * w.views + w.test) * per_sample)

    def train(self, costs: list[StageCost], w: Workload, a: int, j: int, dtype: str) -> float:
        recompute, read = _recompute(costs, a, j) / self.flops_per_s, self._read(costs, w, a, dtype)
        own, own_eval = costs[j].train_flops / self.flops_per_s, costs[j].eval_flops / self.flops_per_s
        return w.epochs * (w.train * max(own + recompute, read) + w.test * max(own_eval + recompute, read))

    def build(self, costs: list[StageCost], w: Workload, a: int, j: int, dtype: str) -> float:
        return (w.train * w.views + w.test) * max(_recompute(costs, a, j + 1) / self.flops_per_s,
                                                  self._read(costs, w, a, dtype),
                                                  costs[j].sample_bytes[dtype] / self.write_bytes_per_s)

    def constant(self, costs: list[StageCost], w: Workload) -> float:
        return 0.0  # the stages' own training is inside `train`: it overlaps the reads


def parse_size(text: str, option: str = "--disk-budget", example: str = "a size like 2TB, 500GB or 1.5TiB") -> int:
    """'2TB' (decimal), '1.5TiB' (binary), '500G', '123' (bytes) -> bytes (or '300T' -> FLOP/s)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"{option} {text!r}: expected {example}")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGTP".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def input_shape(cfg: Config, image_size: int | None = None) -> tuple[int, int, int]:
    d = cfg.data
    c, h, w = {"fmnist": (1, 28, 28), "imagefolder": (3, d.image_size, d.image_size), "synthetic": tuple(d.shape)}[d.name]
    return (c, image_size, image_size) if image_size else (c, h, w)


def sample_bytes(out_shape: tuple[int, ...]) -> dict[str, int]:
    """Bytes of one stored sample of shape `out_shape`, per storage format (cachetrain/cache/formats.py)."""
    return {name: fmt.sample_bytes(out_shape) for name, fmt in FORMATS.items()}


def stage_costs(cfg: Config, in_shape: tuple[int, int, int], num_classes: int = 10) -> list[StageCost]:
    net = build_network(cfg.model, in_shape, cfg.train.seed)
    costs = []
    for j, stage in enumerate(net.stages):
        x = torch.zeros(2, *net.in_shapes[j])  # batch 2: BN in training mode needs more than one value
        model = torch.nn.Sequential(stage, make_head(cfg.model, net, j, cfg.model.k, num_classes, 0))
        costs.append(StageCost(j, net.out_shapes[j], forward_flops(stage, x) / 2,
                               train_step_flops(model, x, torch.zeros(2, dtype=torch.long)) / 2,
                               sample_bytes(net.out_shapes[j]), forward_flops(model, x) / 2))
    return costs


def _recompute(costs: list[StageCost], a: int, j: int) -> float:
    """Per-sample FLOPs to produce stage j's input from stage a's output (a = -1: the images)."""
    return sum(c.forward_flops for c in costs[a + 1:j])


def evaluate(costs: list[StageCost], w: Workload, cached: tuple[int, ...], dtype: str, model=FLOPS) -> Plan:
    """Cost and disk of one cache set (the brute-force reference for `plan`)."""
    cost, disk, a = 0.0, 0, -1
    for j in range(len(costs)):
        cost += model.train(costs, w, a, j, dtype)
        if j in cached:
            cost += model.build(costs, w, a, j, dtype)
            disk += (w.train * w.views + w.test) * costs[j].sample_bytes[dtype]
            a = j
    return Plan(tuple(sorted(cached)), cost, disk)


def cost_ratio(costs: list[StageCost], w: Workload, cached, dtype: str = "float16", model=FLOPS) -> float:
    """The whole greedy run (the stages' own training and test evaluations included) with the outputs of
    the stages in `cached` stored, over the same run recomputing every stage's input from the images.
    With FLOPS this is the FLOP prediction of the greedy-cached / greedy-recompute time ratio."""
    own = model.constant(costs, w)
    with_cache, without = evaluate(costs, w, tuple(cached), dtype, model), evaluate(costs, w, (), dtype, model)
    return (own + with_cache.cost) / (own + without.cost)


def brute_force(costs: list[StageCost], w: Workload, budget: int, dtype: str, model=FLOPS) -> Plan:
    candidates = range(len(costs) - 1)
    plans = [evaluate(costs, w, s, dtype, model) for r in range(len(costs))
             for s in itertools.combinations(candidates, r)]
    return min((p for p in plans if p.disk_bytes <= budget), key=lambda p: (p.cost, p.disk_bytes))


def plan(costs: list[StageCost], w: Workload, budget: int, dtype: str, model=FLOPS) -> Plan:
    """The cache set of least cost (FLOPs, or seconds with `Rates`) whose stores fit `budget` bytes
    (the last stage is never cached: nothing reads it)."""
    # fronts[a]: Pareto-optimal (disk, cost, cached) for choices so far, with a the last cached stage
    fronts: dict[int, list[tuple[int, float, tuple[int, ...]]]] = {-1: [(0, 0.0, ())]}
    for j in range(len(costs)):
        nxt: dict[int, list] = {}
        for a, front in fronts.items():
            train = model.train(costs, w, a, j, dtype)
            for disk, cost, cached in front:
                nxt.setdefault(a, []).append((disk, cost + train, cached))
                if j < len(costs) - 1:
                    d = disk + (w.train * w.views + w.test) * costs[j].sample_bytes[dtype]
                    if d <= budget:
                        build = model.build(costs, w, a, j, dtype)
                        nxt.setdefault(j, []).append((d, cost + train + build, cached + (j,)))
        fronts = {a: _pareto(points) for a, points in nxt.items()}
    disk, cost, cached = min((p for front in fronts.values() for p in front), key=lambda p: (p[1], p[0]))
    return Plan(cached, cost, disk)


def _pareto(points: list[tuple[int, float, tuple[int, ...]]]) -> list[tuple[int, float, tuple[int, ...]]]:
    """Drop every point that another beats on both disk and FLOPs."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return front


def _input_rate(costs: list[StageCost], a: int, j: int, dtype: str, model) -> float | None:
    """Bytes/s stage j must read from its input cache (stage a's) to keep its training steps busy at the
    model's FLOP/s: what the disk, the shared file system or the object store holding that cache must
    deliver (README, "Scaling out"). None without measured rates, or when stage j reads the images."""
    if not isinstance(model, Rates) or a < 0:
        return None
    return costs[a].sample_bytes[dtype] * model.flops_per_s / (costs[j].train_flops + _recompute(costs, a, j))


def describe(costs: list[StageCost], w: Workload, chosen: Plan, dtype: str, model=FLOPS) -> dict:
    """The plan as saved to <run>/plan.json and printed: per stage, where its input comes from."""
    stages, a = [], -1
    for c in costs:
        j = c.stage
        source = "images" if a < 0 else f"cache {a}"
        through = list(range(a + 1, j))
        stages.append({**asdict(c), "cached": j in chosen.cached, "input": source, "recompute_through": through,
                       "store_bytes": {d: (w.train * w.views + w.test) * b for d, b in c.sample_bytes.items()},
                       "input_bytes_per_s": _input_rate(costs, a, j, dtype, model)})
        if j in chosen.cached:
            a = j
    none = evaluate(costs, w, (), dtype, model)
    return {"cached": list(chosen.cached), "dtype": dtype, "disk_bytes": chosen.disk_bytes,
            "cost_unit": model.unit, "rates": asdict(model) if isinstance(model, Rates) else None,
            "cost_plan": chosen.cost, "cost_recompute_everything": none.cost, "cost_saved": none.cost - chosen.cost,
            "cost_constant": model.constant(costs, w),
            "total_vs_recompute_everything": cost_ratio(costs, w, chosen.cached, dtype, model),
            "workload": asdict(w), "stages": stages}
