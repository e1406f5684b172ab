"""What fits in 16 and 24 GiB: each greedy stage against the whole network, ImageNet k=3 layout, counted
on a CPU without allocating anything.

The layout is the built-in config imagenet_k3 (cachetrain/configs/imagenet_k3.yaml) (Belilovsky et al.: 224 px, input space-to-depth to 12x112x112,
J=8, width 128, downsampling at j=2,4,6, the k=3 conv head, SGD with momentum), 1000 classes, batch
256, fp32. A unit is one greedy stage (block + head on its cached input) or the whole network end to
end; each is measured by `cachetrain.plan.memory` on fake tensors (nothing allocated, whatever the
size): the live-tensor peak of a steady-state step, and the count (saved tensors + parameters +
gradients + momentum + input batch). It prints and saves (--out, JSON):

- `table`: per unit and variant, the peak at batch 256 and the largest batch in 24 GiB (and 16 GiB),
  for the variants that add one option each: in-place ReLU, BN -> ReLU (and space-to-depth)
  recomputation in the backward, the `sr` head;
- `headline`: the largest width and batch at which every greedy stage, and the whole network, trains in
  16 GiB and in 24 GiB, without the options (as configured) and with all of them; by the live peak and
  by the count;
- `h200_check`: the same count and live peak in bf16 (fake tensors under CPU autocast) against the
  allocator peaks the H200 measured for this layout (benchmarks/figures/h200_results.json: bf16,
  channels_last, batch 256, `sr` and `conv` heads, no checkpointing);
- `step_time`: what each option costs: step-time ratios, each variant against the one before, measured
  side by side on the CPU at a small size (largest stage and end to end).

    python benchmarks/memory_bench.py [--out benchmarks/figures/memory_results.json] [--tiny]

--tiny shrinks everything (32 px, width 8, 2 stages, batch 32, an 8 MiB budget, widths by the live peak
only, one timing round of the largest stage only, no H200 check) so the test suite runs it in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from cachetrain.bench.tools import imagenet_config
from cachetrain.config import Config, load_config
from cachetrain.plan.memory import (FAKE, VARIANTS, largest_width, measure, memory_table, step_time_ratios,
                                    units, variants_for)
from cachetrain.plan.planner import input_shape

GIB = 2**30
ROOT = Path(__file__).resolve().parent.parent
H200 = ROOT / "benchmarks" / "figures" / "h200_results.json"


def layout(tiny: bool) -> tuple[Config, tuple[int, int, int], int, int, list[int]]:
    """(config, input shape, classes, batch, budgets in bytes)."""
    cfg = load_config("imagenet_k3")
    if tiny:
        cfg = replace(cfg, model=replace(cfg.model, width=8, stages=2, downsample=[1]))
        return cfg, (3, 32, 32), 10, 32, [8 * 2**20]
    return cfg, input_shape(cfg), 1000, 256, [16 * GIB, 24 * GIB]


def h200_check(batch: int) -> dict | None:
    """Count and live peak in bf16 (CPU autocast on fake tensors) against the H200's allocator peaks for
    the same layout (no checkpointing, in-place ReLU, as gpu_bench.py ran it)."""
    if not H200.exists():
        return None
    h = json.loads(H200.read_text())
    if h.get("batch") != batch or not h.get("amp_bf16"):
        return {"comparable": False, "why": f"{H200.name}: batch {h.get('batch')}, bf16 {h.get('amp_bf16')}"}
    rows = []
    for aux in ("sr", "conv"):
        cfg = imagenet_config(aux, amp=True)
        shape, classes = tuple(cfg.data.shape), cfg.data.num_classes
        for i, (name, build, unit_shape) in enumerate(units(cfg, shape, classes, VARIANTS[1])):
            m = measure(build, unit_shape, classes, cfg, batch, FAKE, torch.bfloat16)
            recorded = h["e2e"][aux] if name == "e2e" else h["stages"][i][f"in_memory_{aux}"]
            # gpu_bench counts the peak above what was resident before the first step: the stages' inputs
            # were resident (slices of one tensor, already channels-last), so the batch is not in its figure;
            # the images were NCHW and train_step made a channels-last copy of each batch, which is
            resident = 0 if name in ("stage 0", "e2e") else _batch_bytes(unit_shape, batch)
            live, count = m.live_peak - resident, m.total_bytes - resident
            rows.append({"head": aux, "unit": name, "h200_peak_allocated": recorded["peak_allocated"],
                         "live_peak": live, "count": count, "h200_over_live": recorded["peak_allocated"] / live,
                         "h200_over_count": recorded["peak_allocated"] / count})
            print(f"  {aux:4s} {name:8s} H200 {recorded['peak_allocated'] / GIB:6.2f} GiB   live {live / GIB:6.2f}   "
                  f"count {count / GIB:6.2f}   H200/live {rows[-1]['h200_over_live']:.2f}   "
                  f"H200/count {rows[-1]['h200_over_count']:.2f}", flush=True)
    span = lambda k: [min(r[k] for r in rows), max(r[k] for r in rows)]  # noqa: E731
    ratio = {aux: {k: max(r[k] for r in rows if r["head"] == aux and r["unit"] != "e2e")
                   / next(r[k] for r in rows if r["head"] == aux and r["unit"] == "e2e")
                   for k in ("h200_peak_allocated", "live_peak", "count")} for aux in ("sr", "conv")}
    return {"comparable": True, "file": str(H200.relative_to(ROOT)), "date": h.get("date"), "rows": rows,
            "h200_over_live": span("h200_over_live"), "h200_over_count": span("h200_over_count"),
            "largest_stage_over_e2e": ratio}


def _batch_bytes(shape, batch: int) -> int:
    n = batch
    for d in shape:
        n *= d
    return 4 * n  # fp32 inputs


def headline(cfg: Config, shape, classes: int, batch: int, budgets: list[int], tiny: bool) -> dict:
    """Largest width and batch that train in each budget: greedy (every stage) vs end to end, without the
    options (as configured) and with all of them, by the live peak and by the count."""
    chosen = [v for v in variants_for(cfg) if v.name in ("in-place ReLU", "+ sr head")]
    out = {}
    for v in chosen:
        for budget in budgets:
            for key, label in (("live_peak", "live"),) + ((("total_bytes", "count"),) if not tiny else ()):
                kw = {"step": 4, "hi": 32} if tiny else {"step": 8, "hi": 4096}
                g = largest_width(cfg, shape, classes, batch, budget, v, greedy=True, key=key, **kw)
                e = largest_width(cfg, shape, classes, batch, budget, v, greedy=False, key=key, **kw)
                row = {"variant": v.name, "budget_gib": budget / GIB, "by": label, "width_greedy": g, "width_e2e": e,
                       "width_ratio": g / e if e else None}
                out[f"{v.name} | {budget / GIB:g} GiB | {label}"] = row
                print(f"  {v.name:16s} {budget / GIB:5.3g} GiB by {label:5s}: width greedy {g:5d} vs end to end {e:5d}"
                      f" ({row['width_ratio'] or 0:.2f}x)", flush=True)
    return out


def print_table(t: dict, budget: int) -> list[str]:
    names = [v["name"] for v in t["variants"]]
    lines = [f"peak GiB at batch {t['batch']} (live peak / count) and largest batch in {budget / GIB:g} GiB",
             "| unit | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for r in t["units"]:
        cells = [f"{c['peak_bytes'] / GIB:.2f} / {c['count_bytes'] / GIB:.2f} ({c['largest_batch']:,})"
                 for c in (r["variants"][n] for n in names)]
        lines.append(f"| {r['unit']} | " + " | ".join(cells) + " |")
    for n in names:
        s = t["summary"][n]
        lines.append(f"{n}: largest stage {s['largest_stage']} / end to end = {s['largest_stage_over_e2e']:.3f} "
                     f"(count {s['largest_stage_over_e2e_count']:.3f}); largest batch greedy "
                     f"{s['largest_batch_greedy']:,} vs end to end {s['largest_batch_e2e']:,}")
    print("\n".join(lines), flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "figures" / "memory_results.json"))
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cfg, shape, classes, batch, budgets = layout(args.tiny)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "load_average_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(["python", "benchmarks/memory_bench.py", *(sys.argv[1:] if argv is None else argv)]),
              "tiny": args.tiny,
              "config": "imagenet_k3" + (" (shrunk: --tiny)" if args.tiny else ""),
              "in_shape": list(shape), "classes": classes, "batch": batch, "precision": "fp32",
              "regime": "CPU: fake tensors, live-tensor peak and saved-tensor count of a steady-state step"}
    print(f"memory table: {result['config']}, batch {batch}", flush=True)
    result["table"] = {f"{b / GIB:g} GiB": memory_table(cfg, shape, classes, batch, b, "cpu") for b in budgets}
    result["table_lines"] = print_table(result["table"][f"{budgets[-1] / GIB:g} GiB"], budgets[-1])
    print("headline: largest width at batch", batch, flush=True)
    result["headline"] = headline(cfg, shape, classes, batch, budgets, args.tiny)
    result["headline_batch"] = {name: {f"{b / GIB:g} GiB": {k: t["summary"][name][k] for k in
                                                          ("largest_batch_greedy", "largest_batch_e2e")}
                                       for b, t in zip(budgets, result["table"].values())}
                                for name in result["table"][f"{budgets[-1] / GIB:g} GiB"]["summary"]}
    print("H200 check (bf16 count and live peak on the CPU against the H200's allocator peaks):", flush=True)
    result["h200_check"] = None if args.tiny else h200_check(batch)
    print("step time on the CPU, each variant against the one before:", flush=True)
    top = result["table"][f"{budgets[-1] / GIB:g} GiB"]["summary"]["in-place ReLU"]["largest_stage_index"]
    small = {"size": 32, "width": 8, "batch": 4, "rounds": 1, "round_s": 0.0} if args.tiny else \
        {"size": 112, "width": 32, "batch": 8, "rounds": 7, "round_s": 0.5}
    timed = [(f"stage {top}", top)] + ([] if args.tiny else [("e2e", -1)])
    result["step_time"] = {unit: step_time_ratios(cfg, shape, classes, index, **small) for unit, index in timed}
    for unit, r in result["step_time"].items():
        print(f"  {unit}: " + ", ".join(f"{n} {x:.2f}x" for n, x in r["over_previous"].items()), flush=True)
    t = result["table"][f"{budgets[-1] / GIB:g} GiB"]["summary"]
    best = t["+ sr head"] if "+ sr head" in t else t[list(t)[-1]]
    result["targets"] = {
        "largest_stage_over_e2e_best_count_le_0.35": best["largest_stage_over_e2e_count"] <= 0.35,
        "largest_stage_over_e2e_best_count": best["largest_stage_over_e2e_count"],
        "largest_stage_over_e2e_best_live": best["largest_stage_over_e2e"],
        "greedy_width_2x_e2e": {k: (r["width_ratio"] or 0) >= 2 for k, r in result["headline"].items()},
    }
    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"targets: {json.dumps(result['targets'])}\nwrote {out} in {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
