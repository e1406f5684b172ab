"""`cachetrain bench`: greedy-cached vs greedy-recompute vs end-to-end, side by side in one process.

Each regime trains the same network on the same data in its own run directory under
`bench/<name>/`; the results (`results.json`, `results.md`, PNG plots) hold, per stage and in total:
steady-state training samples/s, wall time per epoch, cache build time next to a bare forward pass
over the same data, cache bytes and compression ratio, the memory one training step holds, test
accuracy; and the ratios the product is judged by, with the greedy-cached / greedy-recompute time
ratio that a FLOP count predicts for the same configuration (the planner's FLOP model,
`cachetrain.plan.planner.cost_ratio`, on the FLOPs measured here). Times come from
`cachetrain.bench.tools.stopwatch`, which synchronises CUDA.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from cachetrain.bench.tools import stopwatch
from cachetrain.cache.location import location, remove_tree
from cachetrain.config import Config
from cachetrain.source import SPLITS
from cachetrain.device import autocast
from cachetrain.models.factory import e2e_network, network, stage_model
from cachetrain.plan.planner import StageCost, Workload, cost_ratio, sample_bytes
from cachetrain.plan.profile import forward_flops, peak_rss_bytes, step_memory, train_step_flops
from cachetrain.run import E2E, Run
from cachetrain.step import make_optimizer, make_scheduler
from cachetrain.train.greedy import Greedy
from cachetrain.train.trainer import train_one_epoch
from cachetrain.train.unit import EndToEnd, train_unit

REGIMES = ("cached", "recompute", "e2e")


def quick_config(cfg: Config) -> Config:
    """A smoke-test version: small subsets, one epoch per stage."""
    d = cfg.data
    data = replace(d, train_subset=min(d.train_subset or 512, 512), test_subset=min(d.test_subset or 256, 256),
                   synthetic_train=min(d.synthetic_train, 512), synthetic_test=min(d.synthetic_test, 256))
    return replace(cfg, data=data, train=replace(cfg.train, epochs=1, e2e_epochs=1))


def regime_config(cfg: Config, out: Path, regime: str) -> Config:
    mode = {"cached": "all", "recompute": "none", "e2e": cfg.cache.mode}[regime]
    return replace(cfg, run_dir=str(out / regime), cache=replace(cfg.cache, mode=mode))


def _epoch_figures(rows: list[dict]) -> dict:
    """Per-epoch figures summed over a stage. `wait_seconds` is the time the step waited for its input
    (for recompute, the frozen forwards; for the cache, the loader) and `step_seconds` the rest: if the
    cache adds nothing, a stage's step_seconds is the same in both regimes. Both are host times, so the
    split holds on the CPU; on CUDA, GPU work the frozen forwards queue lands in the step."""
    wait = sum(r["data_seconds"] for r in rows)
    train = sum(r["train_seconds"] for r in rows)
    return {"epochs": len(rows), "train_seconds": train, "wait_seconds": wait, "step_seconds": train - wait,
            "seconds_per_epoch": float(np.mean([r["train_seconds"] for r in rows])),
            "steady_samples_per_s": float(np.mean([r["steady_samples_per_s"] for r in rows])),
            "test_acc": rows[-1]["test_acc"], "train_acc": rows[-1]["train_acc"]}


def _bare_forward_seconds(g: Greedy, j: int) -> float:
    """A forward pass of trained stage j over both splits of its input, writing nothing."""
    source, stage = g.inputs.input_source(j), g.inputs.trained_stage(j)
    with stopwatch(g.run.device) as watch, torch.no_grad(), autocast(g.run.device, g.cfg.train.amp):  # as caching runs it
        for split in SPLITS:
            for x, _ in source.eval_batches(split, g.cfg.cache.batch_size):
                stage(x)
    return watch.seconds


def greedy_stage(g: Greedy, j: int, cached: bool) -> dict:
    """Train stage j of `g` (and cache it, if `cached` and the plan caches it); its figures."""
    with stopwatch(g.run.device) as watch:
        g.train_stage(j)
    figures = {"stage": j, "wall_seconds": watch.seconds, **_epoch_figures(g.run.records.read_metrics(j))}
    if cached and j in g.state.cached_stages():
        # the bare forward runs on a quiet disk (what earlier stages left in the page cache is written out
        # first), and the caching pass is timed until its bytes are on disk: the writer fsyncs every chunk
        # before it marks the store complete, so nothing it wrote lands on whatever runs next
        os.sync()
        figures["bare_forward_seconds"] = _bare_forward_seconds(g, j)
        with stopwatch(g.run.device) as watch:
            g.cache_stage(j)
        figures["cache_seconds"] = watch.seconds
        row = g.state.status()[j]
        figures["cache_bytes"], figures["raw_bytes"] = row.cache_bytes, row.raw_bytes
    return figures


def _warm_up(g: Greedy, steps: int = 5) -> None:
    """A few untimed training steps of stage 0, so the process's one-time costs (kernel selection,
    allocator growth, lazy imports) are not charged to whichever regime trains first: in one J=8
    run, the first stage 0 took 11.8 s and the same work in the second regime 8.5 s."""
    t, data, device = g.cfg.train, g.run.data, g.run.device
    model = stage_model(g.cfg, network(g.cfg, data.sample_shape), 0, g.cfg.model.k, data.num_classes).to(device)
    optimizer = make_optimizer(model.parameters(), t)
    train_one_epoch(model, itertools.islice(data.train_batches(0, t.batch_size), steps), optimizer,
                    make_scheduler(optimizer, t, steps, 1), device, t.amp, t.channels_last)


def run_greedy_pair(cfg: Config, out: Path, console: Console) -> dict[str, dict]:
    """Greedy-cached and greedy-recompute, stage by stage in turn (cached stage j, then recompute stage
    j): on a shared machine, load that comes and goes then lands on both regimes alike instead of
    on whichever happened to run at the time."""
    runs = {regime: Greedy(Run(regime_config(cfg, out, regime), console=console)) for regime in ("cached", "recompute")}
    _warm_up(runs["cached"])
    stages: dict[str, list[dict]] = {r: [] for r in runs}
    for j in range(cfg.model.stages):
        for regime in (("cached", "recompute") if j % 2 == 0 else ("recompute", "cached")):  # neither always first
            g = runs[regime]
            console.print(f"[bold]greedy, {'cached' if regime == 'cached' else 'recomputing frozen stages'}: "
                          f"stage {j}[/bold]")
            stages[regime].append(greedy_stage(g, j, cached=regime == "cached"))
    return {regime: {"stages": st, "greedy": runs[regime], "test_acc": st[-1]["test_acc"],
                     "total_seconds": sum(s["wall_seconds"] + s.get("cache_seconds", 0.0) for s in st)}
            for regime, st in stages.items()}


def architecture(g: Greedy) -> list[dict]:
    net = g.inputs.net
    return [{"stage": j, "in_shape": list(net.in_shapes[j]), "out_shape": list(net.out_shapes[j]),
             "params": sum(p.numel() for p in net.stages[j].parameters())} for j in range(net.depth)]


def memory_and_flops(g: Greedy, batch: int) -> dict:
    """Per stage (block + its head on its input) and end to end (all stages + last head on images):
    the memory of one training step at `batch`, training-step FLOPs and forward FLOPs per sample."""
    cfg, dev, net = g.cfg, g.run.device, g.inputs.net
    num_classes = g.run.data.num_classes
    y = torch.randint(0, num_classes, (batch,), device=dev)
    out = {"stages": []}
    for j in range(net.depth):
        ck = g.state.checkpoint(j)
        k = ck.k if ck else cfg.model.k
        model = stage_model(cfg, net, j, k, num_classes, seed=0).to(dev)
        x = torch.randn(batch, *net.in_shapes[j], device=dev)
        mem = step_memory(model, x, y, make_optimizer(model.parameters(), cfg.train), cfg.train.amp)
        out["stages"].append({"stage": j, "k": k, "memory": mem.to_dict(),
                              "train_flops_per_sample": train_step_flops(model, x, y) / batch,
                              "eval_flops_per_sample": forward_flops(model, x) / batch,
                              "block_flops_per_sample": forward_flops(net.stages[j], x) / batch})
    e2e = e2e_network(cfg, g.run.data.sample_shape, num_classes).to(dev)
    x = torch.randn(batch, *g.run.data.sample_shape, device=dev)
    mem = step_memory(e2e, x, y, make_optimizer(e2e.parameters(), cfg.train), cfg.train.amp)
    out["e2e"] = {"memory": mem.to_dict(), "train_flops_per_sample": train_step_flops(e2e, x, y) / batch,
                  "eval_flops_per_sample": forward_flops(e2e, x) / batch}
    return out


def planner_costs(costs: dict, out_shapes: list) -> list[StageCost]:
    """The per-stage FLOPs measured by `memory_and_flops`, as the planner's cost table."""
    return [StageCost(s["stage"], tuple(shape), s["block_flops_per_sample"], s["train_flops_per_sample"],
                      sample_bytes(shape), s["eval_flops_per_sample"]) for s, shape in zip(costs["stages"], out_shapes)]


def predicted_time_ratio(costs: dict, out_shapes: list, workload: Workload, cached: set[int]) -> float:
    """greedy-cached / greedy-recompute total FLOPs by the planner's FLOP model: training steps, test
    evaluations, caching passes and (for recompute) the frozen forwards every batch needs."""
    return cost_ratio(planner_costs(costs, out_shapes), workload, sorted(cached))


def run_bench(cfg: Config, out: Path, console: Console, quick: bool = False) -> dict:
    if quick:
        cfg = quick_config(cfg)
    for regime in REGIMES:
        shutil.rmtree(out / regime, ignore_errors=True)  # fresh runs: timings of resumed work mean nothing
        if cfg.cache.location:  # and their caches, wherever cache.location keeps them
            remove_tree(location(cfg.cache.location) / regime)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"name": cfg.name, "quick": quick, "date": time.strftime("%Y-%m-%d %H:%M"),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                                f"torch {torch.__version__}",
                     "device": str(Run(cfg, console=console).device), "config": cfg.to_dict()}
    pair = run_greedy_pair(cfg, out, console)
    cached, recompute = pair["cached"], pair["recompute"]
    console.print("[bold]end to end[/bold]")
    e2e_run = Run(regime_config(cfg, out, "e2e"), console=console)
    e2e_run.data  # opened before the stopwatch, as the greedy runs' data was
    with stopwatch(e2e_run.device) as watch:
        e2e_acc = train_unit(e2e_run, EndToEnd(e2e_run))
    e2e = {"total_seconds": watch.seconds, "test_acc": e2e_acc, **_epoch_figures(e2e_run.records.read_metrics(E2E))}

    g = cached["greedy"]
    costs = memory_and_flops(g, min(cfg.train.batch_size, 32 if g.run.device.type == "cpu" else cfg.train.batch_size))
    n_train, n_test = g.run.data.num_samples("train"), g.run.data.num_samples("test")
    for regime, r in (("cached", cached), ("recompute", recompute)):
        results[regime] = {k: v for k, v in r.items() if k != "greedy"}
        results[regime]["architecture"] = architecture(r["greedy"])
    results["e2e"] = e2e
    results["costs"] = costs
    largest = max(s["memory"]["total_bytes"] for s in costs["stages"])
    cache_stages = [s for s in cached["stages"] if "cache_seconds" in s]
    results["ratios"] = {
        "cached_over_recompute_time": cached["total_seconds"] / recompute["total_seconds"],
        "flop_predicted_cached_over_recompute": predicted_time_ratio(
            costs, g.inputs.net.out_shapes, Workload(n_train, n_test, cfg.train.epochs, cfg.cache.views),
            g.state.cached_stages()),
        "largest_stage_over_e2e_memory": largest / costs["e2e"]["memory"]["total_bytes"],
        "cached_over_recompute_step_time": (sum(s["step_seconds"] for s in cached["stages"]) /
                                            sum(s["step_seconds"] for s in recompute["stages"])),
        "cache_build_over_bare_forward": (sum(s["cache_seconds"] for s in cache_stages) /
                                          max(1e-9, sum(s["bare_forward_seconds"] for s in cache_stages))),
        "greedy_minus_e2e_accuracy": cached["test_acc"] - e2e_acc,
    }
    results["peak_rss_bytes"] = peak_rss_bytes()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out)
    return results


def markdown(r: dict) -> str:
    mib = 2**20
    lines = [f"Machine: {r['machine']}, device {r['device']}; {r['date']}" + (" (quick mode)" if r["quick"] else ""),
             "", "| stage | cached: samples/s | s/epoch | cache build s (bare fwd s) | cache MiB (ratio) | "
             "recompute: samples/s | s/epoch | test acc cached / recompute | step memory MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, p, m in zip(r["cached"]["stages"], r["recompute"]["stages"], r["costs"]["stages"]):
        build = f"{c['cache_seconds']:.1f} ({c['bare_forward_seconds']:.1f})" if "cache_seconds" in c else "-"
        size = f"{c['cache_bytes'] / mib:.0f} ({c['raw_bytes'] / c['cache_bytes']:.2f}x)" if c.get("cache_bytes") else "-"
        lines.append(f"| {c['stage']} | {c['steady_samples_per_s']:,.0f} | {c['seconds_per_epoch']:.1f} | {build} | "
                     f"{size} | {p['steady_samples_per_s']:,.0f} | {p['seconds_per_epoch']:.1f} | "
                     f"{100 * c['test_acc']:.2f}% / {100 * p['test_acc']:.2f}% | "
                     f"{m['memory']['total_bytes'] / mib:.1f} |")
    e = r["e2e"]
    waits = ["", "Training time per stage, all epochs: the step itself, and the wait for its input (for "
             "recompute, the frozen forwards).", "",
             "| stage | cached: step s | cached: wait s | recompute: step s | recompute: wait s |",
             "|---|---:|---:|---:|---:|"]
    waits += [f"| {c['stage']} | {c['step_seconds']:.1f} | {c['wait_seconds']:.1f} | {p['step_seconds']:.1f} | "
              f"{p['wait_seconds']:.1f} |" for c, p in zip(r["cached"]["stages"], r["recompute"]["stages"])]
    lines.append(f"| end to end | {e['steady_samples_per_s']:,.0f} | {e['seconds_per_epoch']:.1f} | - | - | - | - | "
                 f"{100 * e['test_acc']:.2f}% | {r['costs']['e2e']['memory']['total_bytes'] / mib:.1f} |")
    q = r["ratios"]
    lines += ["", f"Total wall time: greedy-cached {r['cached']['total_seconds']:.0f} s, greedy-recompute "
                  f"{r['recompute']['total_seconds']:.0f} s, end to end {e['total_seconds']:.0f} s.", *waits, "",
              "| ratio | value |", "|---|---:|",
              f"| greedy-cached / greedy-recompute total time | {q['cached_over_recompute_time']:.3f} |",
              f"| same, predicted by FLOP count | {q['flop_predicted_cached_over_recompute']:.3f} |",
              f"| greedy-cached / greedy-recompute training-step time (input waits excluded) | "
              f"{q['cached_over_recompute_step_time']:.3f} |",
              f"| largest greedy stage / end-to-end step memory | {q['largest_stage_over_e2e_memory']:.3f} |",
              f"| cache build / bare forward pass | {q['cache_build_over_bare_forward']:.3f} |",
              f"| greedy - end-to-end test accuracy (points) | {100 * q['greedy_minus_e2e_accuracy']:+.2f} |"]
    return "\n".join(lines) + "\n"


def plot(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s["stage"] for s in r["cached"]["stages"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(stages, [100 * s["test_acc"] for s in r["cached"]["stages"]], "o-", label="greedy, cached")
    ax.plot(stages, [100 * s["test_acc"] for s in r["recompute"]["stages"]], "s--", label="greedy, recompute")
    ax.axhline(100 * r["e2e"]["test_acc"], color="k", linestyle=":", label="end to end")
    ax.set(xlabel="stage j", ylabel="test accuracy (%)", title="Layerwise test accuracy", xticks=stages)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    mem = [s["memory"]["total_bytes"] / 2**20 for s in r["costs"]["stages"]]
    ax.bar([f"stage {j}" for j in stages] + ["end to end"], mem + [r["costs"]["e2e"]["memory"]["total_bytes"] / 2**20],
           color=["tab:blue"] * len(stages) + ["tab:gray"])
    ax.set(ylabel="MiB per training step", title="Training-step memory (saved tensors + params + grads + optimizer)")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.4
    xs = np.arange(len(stages))
    ax.bar(xs - width / 2, [s["steady_samples_per_s"] for s in r["cached"]["stages"]], width, label="greedy, cached")
    ax.bar(xs + width / 2, [s["steady_samples_per_s"] for s in r["recompute"]["stages"]], width,
           label="greedy, recompute")
    ax.axhline(r["e2e"]["steady_samples_per_s"], color="k", linestyle=":", label="end to end")
    ax.set(xticks=xs, xticklabels=[f"stage {j}" for j in stages], ylabel="training samples/s",
           title="Steady-state training throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close("all")
