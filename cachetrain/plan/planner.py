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
- Seconds, from a machine's rates (cachetrain/plan/seconds.py `Rates`): every pass takes, a sample,
  the longest of its compute, its host work (decoding images where it starts from them, zstd where it
  reads or writes compressed chunks) and its storage (reading the input cache from the tier it lives
  on, writing the output one). On an H200 this is what decides: the wide early stages of the ImageNet
  layout train faster recomputed than read back (3.2 MB a sample at ~25 GB/s), unless decoding the
  images is slower still, which is where caching an early stage pays.

With rates, each stage also gets its break-even read rate (`break_even`): the rate at which its
cache must be read for caching it to cost the same as recomputing its outputs, the rest of the plan
as it is; a tier faster than that makes the cache pay.

Exact search: stages are decided in order and the only thing the future depends on is the last
cached stage, so a dynamic programme keeps, for each possible last cached stage, the Pareto front of
(disk bytes, cost) over the choices so far. Stores are counted at their raw (uncompressed) size,
so a plan that fits stays within budget whatever zstd achieves.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass

# the cost table and the seconds model live in their own modules; their names are the planner's API too
from cachetrain.errors import ConfigError
from cachetrain.plan.costs import (StageCost, Workload, input_shape, recompute_flops, sample_bytes,  # noqa: F401
                                   stage_costs, with_compression, workload_of)
from cachetrain.plan.seconds import PinnedRead, Rates


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
        return w.epochs * (w.train + w.test + w.train_eval) * recompute_flops(costs, a, j)

    def build(self, costs: list[StageCost], w: Workload, a: int, j: int, dtype: str) -> float:
        """Caching stage j's outputs, forwarding from stage a's cache (or the images)."""
        return (w.train * w.views + w.test) * recompute_flops(costs, a, j + 1)

    def constant(self, costs: list[StageCost], w: Workload) -> float:
        """Each stage's own training steps and evaluations, every epoch."""
        return sum(w.epochs * (w.train * c.train_flops + (w.test + w.train_eval) * c.eval_flops) for c in costs)


FLOPS = FlopCost()  # stateless: the default cost model


def parse_size(text: str, option: str = "--disk-budget", example: str = "a size like 2TB, 500GB or 1.5TiB") -> int:
    """'2TB' (decimal), '1.5TiB' (binary), '500G', '123' (bytes) -> bytes (or '300T' -> FLOP/s)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"{option} {text!r}: expected {example}")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGTP".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


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
    """Bytes/s stage j must read from its input cache (stage a's) to keep its training steps busy: what the
    disk, the shared file system or the object store holding that cache must deliver (README, "Scaling
    out"). None without rates, or when stage j reads the images."""
    if not isinstance(model, Rates) or a < 0:
        return None
    return model.input_rate(costs, a, j, dtype)


def break_even(costs: list[StageCost], w: Workload, cached, s: int, dtype: str, rates: Rates) -> float | None:
    """The read rate of stage s's cache (bytes/s, the same every epoch) at which the run caching s costs what
    the run without it costs, every other stage cached as in `cached`: above it, caching s pays. None when it
    cannot pay at any rate (its caching pass, the codec's work or one epoch leave nothing to win)."""
    without = tuple(sorted(set(cached) - {s}))
    with_s = tuple(sorted(set(cached) | {s}))
    target = evaluate(costs, w, without, dtype, rates).cost

    def cost(rate: float) -> float:
        return evaluate(costs, w, with_s, dtype, PinnedRead.of(rates, s, rate)).cost

    if cost(math.inf) >= target * (1 - 1e-12):
        return None
    lo, hi = -60.0, 60.0  # log10 of bytes/s, far past any storage either way
    if cost(10.0 ** hi) >= target:
        return None
    for _ in range(100):  # the cost falls as the rate rises: bisect for where it crosses the target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(10.0 ** mid) >= target else (lo, mid)
    return 10.0 ** hi


def describe(costs: list[StageCost], w: Workload, chosen: Plan, dtype: str, model=FLOPS,
             notes: tuple[str, ...] = ()) -> dict:
    """The plan as saved to <run>/plan.json and printed: per stage, where its input comes from; with rates,
    also the tier its cache would be read from, at what rate, and the break-even read rate that makes
    caching it pay. `notes`: what the plan assumed, in words (cachetrain/plan/command.py writes them)."""
    stages, a = [], -1
    timed = isinstance(model, Rates)
    for c in costs:
        j = c.stage
        source = "images" if a < 0 else f"cache {a}"
        through = list(range(a + 1, j))
        store = (w.train * w.views + w.test) * c.stored(dtype)
        row = {**asdict(c), "cached": j in chosen.cached, "input": source, "recompute_through": through,
               "store_bytes": {d: (w.train * w.views + w.test) * b for d, b in c.sample_bytes.items()},
               "stored_bytes_per_sample": c.stored(dtype), "input_bytes_per_s": _input_rate(costs, a, j, dtype, model)}
        if timed and j < len(costs) - 1:
            rate = break_even(costs, w, chosen.cached, j, dtype, model)
            row.update(tier=model.tier(store), tier_first_read_bytes_per_s=model.read_rate(store, 0),
                       tier_read_bytes_per_s=model.read_rate(store, 1), break_even_read_bytes_per_s=rate,
                       never_pays=rate is None)
        stages.append(row)
        if j in chosen.cached:
            a = j
    none = evaluate(costs, w, (), dtype, model)
    return {"cached": list(chosen.cached), "dtype": dtype, "disk_bytes": chosen.disk_bytes,
            "cost_unit": model.unit, "rates": asdict(model) if timed else None,
            "cost_plan": chosen.cost, "cost_recompute_everything": none.cost, "cost_saved": none.cost - chosen.cost,
            "cost_constant": model.constant(costs, w),
            "total_vs_recompute_everything": cost_ratio(costs, w, chosen.cached, dtype, model),
            "workload": asdict(w), "notes": list(notes), "stages": stages}
