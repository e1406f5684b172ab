"""The planner's seconds model against whole greedy runs on this machine: predicted, then measured.

For each regime the script measures this machine's rates for the run (`cachetrain plan --measure`'s
functions, cachetrain/plan/command.py: each stage's step times, the stage-0 input pipeline, the disk,
zstd on the stages' outputs), predicts every stage's training and caching pass with the seconds model
(cachetrain/plan/seconds.py), then runs the greedy run stage by stage through the command line
(`cachetrain stage --j J --no-cache`, then `cachetrain cache --j J` where the stage is cached, each
command timed whole, in this process) and prints predicted / measured per stage and in total.

Regimes (each a pair of arms where both are asked for):
- `j8`: the built-in imagenet_shaped_cpu (the ImageNet layout shrunk to a CPU, J=8), every stage cached
  vs every stage recomputing its input from the images (cache.mode all / none);
- `jpeg`: the same layout on an image folder: a tree of JPEGs generated under OUT/jpegs (class-dependent
  smooth patterns with noise, 320x240 px, quality 90: decoding is real work), decoded by PIL and
  torchvision in `loader.workers` processes, cropped to 64 px; cached vs recompute, so the recompute arm
  decodes the images in every epoch of every stage;
- `cold`: the j8 run with zstd chunks and one epoch per stage, every stage's input cache dropped from the
  page cache before each command reads it (posix_fadvise DONTNEED on its files: no root, nothing else
  disturbed), so every read is a cold read from the disk, and predicted with every cache read at the
  disk's measured cold rate.

    python benchmarks/plan_check.py [--quick] [--regimes j8 jpeg cold] [--out bench/plan_check]

`--quick` is a smoke run at toy sizes (a few seconds a regime): its figures mean nothing. The target is
predicted / measured within 15% per run (the total); where a stage misses, the table says which term the
model charged it with (compute, host: decoding or zstd, storage), which is where to look.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from cachetrain.bench.tools import save_results
from cachetrain.cli import main as cli
from cachetrain.config import load_config
from cachetrain.data import open_dataset
from cachetrain.device import resolve_device
from cachetrain.plan import command
from cachetrain.plan.costs import input_shape, stage_costs, with_compression

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.15


def arm_config(base: str, overrides: list[str], run: Path) -> tuple[object, list[str]]:
    """The resolved config of one arm, and the --set options that make it from `base`."""
    sets = [*overrides, f"run_dir={run}"]
    return load_config(base, sets), sets


def regime_overrides(regime: str, quick: bool, jpegs: Path) -> list[str]:
    # probes are off: they are diagnostics, not part of the run the planner times
    sizes = ["train.probes=false"] + (["data.synthetic_train=256", "data.synthetic_test=128", "model.stages=2",
                                       "model.downsample=[1]", "model.width=8", "train.epochs=1",
                                       "train.batch_size=64"] if quick else
                                      ["data.synthetic_train=2048", "data.synthetic_test=512"])
    if regime == "j8":
        return sizes
    if regime == "jpeg":
        return [*sizes, "data.name=imagefolder", f"data.root={jpegs}", "data.image_size=64", "loader.workers=2"] + \
            (["data.val_samples=16"] if quick else ["data.val_samples=64"])
    if regime == "cold":
        return [*sizes, "cache.codec=zstd", "train.epochs=1"]
    raise ValueError(regime)


def make_jpegs(folder: Path, classes: int, train: int, test: int, size: tuple[int, int], seed: int = 0) -> None:
    """`train` and `test` JPEGs per class under folder/{train,val}/<class>/: a smooth class pattern (a few
    sinusoids at class-dependent frequencies) with per-image noise and shifts, at quality 90."""
    from PIL import Image

    if (folder / "done").exists():
        return
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for c in range(classes):
        freq = rng.uniform(0.01, 0.08, size=(3, 2))
        for split, n in (("train", train), ("val", test)):
            out = folder / split / f"class{c:02d}"
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                dx, dy = rng.uniform(0, 50, size=2)
                img = np.stack([127 + 80 * np.sin(freq[k, 0] * (xx + dx)) * np.cos(freq[k, 1] * (yy + dy))
                                for k in range(3)], axis=-1)
                img += rng.normal(0, 20, img.shape)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out / f"{i:04d}.jpg", quality=90)
    (folder / "done").write_text("")


def drop_pages(folder: Path) -> int:
    """Drop every file under `folder` from the page cache (posix_fadvise DONTNEED, after an fsync: only clean
    pages can be dropped); returns the bytes dropped."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def timed_cli(argv: list[str], console: Console) -> float:
    t0 = time.perf_counter()
    rc = cli(argv, console)
    if rc != 0:
        sys.exit(f"error: cachetrain {' '.join(argv)} exited {rc}")
    return time.perf_counter() - t0


def terms(model, costs, w, a: int, j: int, dtype: str) -> str:
    """Which resource the model says bounds stage j's training samples (the max in `sample_seconds`)."""
    compute = model._step(costs, j) + model._forward(costs, a, j)
    host = model._input_host(costs, a, dtype, True)
    read = model._read(costs, w, a, dtype, 0)
    parts = {"compute": compute, "host": host, "storage": read}
    if model.host_shares_compute:
        parts = {"compute+host": compute + host, "storage": read}
    return max(parts, key=parts.get)


def predict(model, costs, w, cached: tuple[int, ...], dtype: str) -> list[dict]:
    """Per stage: seconds of its training (epochs and evaluations) and of its caching pass."""
    rows, a = [], -1
    for j in range(len(costs)):
        row = {"stage": j, "train_s": model.train(costs, w, a, j, dtype), "bound": terms(model, costs, w, a, j, dtype),
               "input": "images" if a < 0 else f"cache {a}", "recompute": list(range(a + 1, j))}
        if j in cached:
            row["cache_s"] = model.build(costs, w, a, j, dtype)
            a = j
        rows.append(row)
    return rows


def run_arm(base: str, sets: list[str], run: Path, cached: tuple[int, ...], depth: int, cold: bool,
            console: Console) -> list[dict]:
    """The greedy run, stage by stage through the CLI; per stage the wall seconds of training and caching."""
    opts = ["--config", str(base), *(x for s in sets for x in ("--set", s))]
    timed_cli(["status", *opts], console)  # the commands' first-call costs (imports, first kernels), untimed
    rows = []
    for j in range(depth):
        row = {"stage": j}
        if cold and j > 0:
            row["dropped_bytes"] = drop_pages(run / "cache" / f"stage_{j - 1}")
        row["train_s"] = timed_cli(["stage", "--j", str(j), "--no-cache", *opts], console)
        if j in cached:
            if cold and j > 0:
                drop_pages(run / "cache" / f"stage_{j - 1}")
            row["cache_s"] = timed_cli(["cache", "--j", str(j), *opts], console)
        rows.append(row)
        print(f"  stage {j}: {row}", flush=True)
    return rows


def regime(name: str, args, out: Path, console: Console) -> dict:
    base = "imagenet_shaped_cpu"
    jpegs = out / "jpegs"
    if name == "jpeg":
        make_jpegs(jpegs, 10, *((8, 4, (96, 80)) if args.quick else (110, 26, (320, 240))))
    overrides = regime_overrides(name, args.quick, jpegs)
    arms = {"cached": "all", "recompute": "none"} if name != "cold" else {"cached": "all"}
    result = {"regime": name, "overrides": overrides, "arms": {}}
    measured = measure_s = None
    for arm, mode in arms.items():
        run = out / name / arm
        shutil.rmtree(run, ignore_errors=True)  # a fresh run: resumed work would time nothing
        cfg, sets = arm_config(base, [*overrides, f"cache.mode={mode}"], run)
        device = resolve_device(cfg.train.device)
        source = open_dataset(cfg.data, cfg.train.seed, device, cfg.loader.workers)
        if measured is None:  # once a regime: cache.mode changes nothing measured, and both arms get one model
            print(f"{name}: measuring", flush=True)
            t0 = time.perf_counter()
            measured = command.measure_rates(cfg, source, run, device, probe_seconds=0.5 if args.quick else 3.0,
                                             disk_bytes=8 * 2**20 if args.quick else 256 * 2**20)
            measure_s = time.perf_counter() - t0
        dtype = cfg.cache.dtype
        model = command.seconds_model(cfg, dtype, command.Given(), measured, "measured before the run")
        if name == "cold":
            model = replace(model, free_ram_bytes=0)  # every cache read from the disk, cold
        w, num_classes = command.workload(cfg, source)
        costs, notes = command.plan_costs(cfg, input_shape(cfg), num_classes, dtype, command.Given(), measured)
        cached = tuple(range(cfg.model.stages - 1)) if mode == "all" else ()
        predicted = predict(model, costs, w, cached, dtype)
        del source
        print(f"{name}, {arm}: running", flush=True)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        measured_rows = run_arm(base, sets, run, cached, cfg.model.stages, name == "cold", console)
        run_s, load_after = time.perf_counter() - t0, os.getloadavg()[0]
        stages = []
        for p, m in zip(predicted, measured_rows):
            row = {**p, "measured_train_s": m["train_s"], "measured_cache_s": m.get("cache_s")}
            row["ratio_train"] = p["train_s"] / m["train_s"]
            if "cache_s" in p:
                row["ratio_cache"] = p["cache_s"] / m["cache_s"]
            stages.append(row)
        total_p = sum(s["train_s"] + s.get("cache_s", 0.0) for s in stages)
        total_m = sum(s["measured_train_s"] + (s["measured_cache_s"] or 0.0) for s in stages)
        result["arms"][arm] = {"stages": stages, "predicted_s": total_p, "measured_s": total_m,
                               "ratio": total_p / total_m, "measure_seconds": measure_s, "notes": notes,
                               "run_seconds": run_s, "load_average": [load_before, load_after],
                               "rates": {k: v for k, v in measured.__dict__.items()},
                               "workload": w.__dict__, "config": cfg.to_dict()}
        print(f"{name}, {arm}: predicted {total_p:.1f} s, measured {total_m:.1f} s, ratio {total_p / total_m:.3f}",
              flush=True)
        (out / f"{name}_{arm}.json").write_text(json.dumps(result["arms"][arm], indent=2, default=str))  # as it goes
    return result


def table(results: list[dict]) -> list[str]:
    lines = ["| regime | arm | stage | input | bound by | predicted train s | measured | ratio | predicted cache s "
             "| measured | ratio |", "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    totals = ["", "| regime | arm | predicted s | measured s | predicted / measured | within 15% | load average "
              "before, after |", "|---|---|---:|---:|---:|---|---|"]
    for r in results:
        for arm, a in r["arms"].items():
            for s in a["stages"]:
                src = s["input"] + (f" + recompute {s['recompute'][0]}..{s['recompute'][-1]}" if s["recompute"] else "")
                cache = (f"{s['cache_s']:.1f} | {s['measured_cache_s']:.1f} | {s['ratio_cache']:.2f}"
                         if "cache_s" in s else "- | - | -")
                lines.append(f"| {r['regime']} | {arm} | {s['stage']} | {src} | {s['bound']} | {s['train_s']:.1f} | "
                             f"{s['measured_train_s']:.1f} | {s['ratio_train']:.2f} | {cache} |")
            ok = "yes" if abs(a["ratio"] - 1) <= TARGET else "no"
            load = ", ".join(f"{x:.1f}" for x in a["load_average"])
            totals.append(f"| {r['regime']} | {arm} | {a['predicted_s']:.1f} | {a['measured_s']:.1f} | "
                          f"{a['ratio']:.3f} | {ok} | {load} |")
    return lines + totals


# -- the README's ImageNet table: the planner, counted (no run), the same on any machine -----------------------

IMAGENET = ["--samples", "1281167", "--test-samples", "50000"]
DECODE = 2500  # images/s a GPU's input pipeline delivers (see imagenet_table)
TIERS = {"one NVMe (7 GB/s)": {"read": 7e9},
         "4 NVMe, RAID 0 (28 GB/s)": {"read": 28e9},
         "bucket 1.25 GB/s + copies on NVMe": {"read": 7e9, "remote": 1.25e9}}
FORMATS_ROWS = {"float16": ("float16", "none", None), "uint8": ("uint8", "none", None),
                "float16 + zstd": ("float16", "zstd", 2.0), "uint8 + zstd": ("uint8", "zstd", 1.8)}


def imagenet_plan(costs: list, dtype: str, codec: str, ratio: float | None, tier: dict, decode: float | None,
                  budget: float, decompress: float) -> dict:
    """One `cachetrain plan` of the built-in imagenet_k3 with these rates (cachetrain/plan/command.py, as the
    command line runs it), on its stage costs `costs` (counted once: stage_costs runs each stage at 224 px)."""
    sets = [f"cache.codec={codec}"] + (["cache.location=s3://bucket/caches", "cache.remote_copies=/nvme/copies",
                                        "cache.remote_copies_gib=10000"] if "remote" in tier else [])
    cfg = load_config("imagenet_k3", sets)
    given = command.Given(flops_per_s=300e12, read_bytes_per_s=tier["read"], write_bytes_per_s=2e9,
                          decode_samples_per_s=decode, compression_ratio=ratio,
                          decompress_bytes_per_s=decompress if codec == "zstd" else None,
                          remote_read_bytes_per_s=tier.get("remote"), remote_write_bytes_per_s=tier.get("remote"))
    model = command.seconds_model(cfg, dtype, given, None)
    w, classes = command.workload(cfg, None, 1281167, 50000)
    notes = []
    if codec == "zstd":
        costs = with_compression(costs, {dtype: [ratio] * len(costs)})
        notes.append(f"zstd ratio {ratio:g} (raw / stored) given for every stage")
    return command.make_plan(cfg, costs, w, int(budget), dtype, model, notes)


def imagenet_table(decompress_per_thread: dict[str, float], workers: int = 8) -> list[str]:
    """The README's table: every storage format on every tier at the decode rate assumed, and fp16 on NVMe
    with decoding taken to keep up (the model before it counted decoding)."""
    cfg = load_config("imagenet_k3", [])
    costs = stage_costs(cfg, input_shape(cfg), command.workload(cfg, None, 1281167, 50000)[1])
    lines = ["| format | cache on | budget | caches stages | on disk | whole run | recompute everything | "
             "cached / recompute | break-even read rate, stages 0..6 (GB/s; - never pays) |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]

    def row(fmt: str, tier: str, decode, budget: float) -> str:
        dtype, codec, ratio = FORMATS_ROWS[fmt]
        r = imagenet_plan(costs, dtype, codec, ratio, TIERS[tier], decode, budget, decompress_per_thread[dtype] * workers)
        even = ", ".join("-" if s["never_pays"] else f"{s['break_even_read_bytes_per_s'] / 1e9:.1f}"
                         for s in r["stages"][:-1])
        label = fmt if decode else f"{fmt}, decoding keeps up"
        return (f"| {label} | {tier} | {budget / 1e12:g} TB | {', '.join(map(str, r['cached'])) or 'none'} | "
                f"{r['disk_bytes'] / 2**40:.1f} TiB | {r['cost_plan'] / 3600:.1f} h | "
                f"{r['cost_recompute_everything'] / 3600:.1f} h | {100 * r['total_vs_recompute_everything']:.0f}% | "
                f"{even} |")

    lines.append(row("float16", "one NVMe (7 GB/s)", None, 4e12))
    for budget in (4e12, 20e12):
        for fmt in FORMATS_ROWS:
            for tier in TIERS:
                lines.append(row(fmt, tier, DECODE, budget))
    return lines


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy sizes, a smoke run: the figures mean nothing")
    p.add_argument("--regimes", nargs="+", default=["j8", "jpeg", "cold"], choices=["j8", "jpeg", "cold"])
    p.add_argument("--out", default="bench/plan_check")
    p.add_argument("--imagenet-table", action="store_true",
                   help="print the README's ImageNet plan table instead (counted, no run; zstd's decompression "
                        "rate is measured on this machine's one core, times 8 loader workers)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.imagenet_table:
        return imagenet_main(args, out)
    console = Console(quiet=True)  # the commands' own tables; this script prints its own lines
    t0 = time.perf_counter()
    results = [regime(name, args, out, console) for name in args.regimes]
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
                          f"{torch.__version__}",
               "command": " ".join(["python", "benchmarks/plan_check.py", *(argv if argv is not None else sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "seconds": time.perf_counter() - t0,
               "load_average": os.getloadavg(), "results": results}
    lines = [f"{summary['machine']}; {summary['date']}; `{summary['command']}`; load average at the end "
             f"{summary['load_average'][0]:.1f}", "", *table(results)]
    return save_results(out, summary, lines)


def imagenet_main(args, out: Path) -> dict:
    from cachetrain.plan.compression import measure_codec

    # zstd's decompression rate on ReLU outputs (the demo's synthetic data through an initialised J=8 layout)
    cfg = load_config("imagenet_shaped_cpu", ["data.synthetic_train=64"])
    data = open_dataset(cfg.data, 0, torch.device("cpu"))
    codec = measure_codec(cfg, data, torch.device("cpu"), batch_size=32, batches=2)
    per_thread = codec.decompress_bytes_per_s
    lines = [f"decode {DECODE:,} images/s; zstd decompression measured here on one core: "
             + ", ".join(f"{d} {v / 1e6:,.0f} MB/s" for d, v in per_thread.items()) + "; x 8 loader workers", "",
             *imagenet_table(per_thread)]
    summary = {"command": " ".join(["python", "benchmarks/plan_check.py", "--imagenet-table"]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "decode_samples_per_s": DECODE,
               "decompress_bytes_per_s_one_thread": per_thread, "ratios_measured_here": codec.ratios}
    return save_results(out, summary, lines)


if __name__ == "__main__":
    main()
