"""torchrun on one machine: a caching pass and a stage's training with 1 process against N, side by side.

Each round copies one run whose stage 0 is trained (trained once, in one process), then, for each process
count in turn, times `cachetrain cache --j 0` (the whole pass: start-up, forward, writes, manifest) and
`cachetrain stage --j 1 --no-cache` (training from that cache; its samples/s are the steady-state rate of
the metrics rows, every rank's samples over rank 0's time). Every arm runs under torchrun, the 1-process
arm too, so both pay the same start-up; the cores are split evenly (OMP_NUM_THREADS = cores / N). Arms
alternate within a round and the medians of the per-round ratios are reported. It prints a markdown table
and saves OUT/results.json and OUT/results.md.

    python benchmarks/scale_bench.py [--procs 1 2] [--rounds 2] [--out bench/scale] [--set KEY=VALUE ...]

On a 2-core CPU this shows what the data-parallel path costs and keeps (gloo all-reduce, each rank's own
chunks), not what N GPUs gain: two ranks share the same two cores one process would use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from cachetrain.bench.tools import save_results
from cachetrain.config import load_config

CONFIG = "fmnist"  # the built-in config (cachetrain/configs/fmnist.yaml)
SETS = ["data.train_subset=10000", "data.test_subset=2000", "data.val_samples=0", "model.stages=2", "model.downsample=[1]",
        "train.epochs=1", "train.probes=false"]


def command(args: list[str], procs: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
            "-m", "cachetrain", *args]


def run(args: list[str], procs: int, cores: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
    t0 = time.perf_counter()
    r = subprocess.run(command(args, procs), env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(args)} with {procs} processes failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def steady_rate(run_dir: Path, j: int) -> float:
    rows = [json.loads(x) for x in (run_dir / "stages" / f"stage_{j}" / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["steady_samples_per_s"] for r in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench/scale")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "base", ignore_errors=True)  # this script's own run folders only
    cfg = load_config(args.config, [*SETS, *args.set])
    cores = os.cpu_count() or 1
    raw = cfg.to_dict()
    raw["run_dir"] = str(out / "base")
    base_cfg = out / "base.yaml"
    base_cfg.write_text(yaml.safe_dump(raw))
    run(["stage", "--config", str(base_cfg), "--no-cache"], 1, cores)  # stage 0, trained once
    n = None  # samples the pass writes: read from the first cache's stores
    rounds = []
    for r in range(args.rounds):
        row = {}
        for procs in (args.procs if r % 2 == 0 else args.procs[::-1]):
            arm = out / f"r{r}_p{procs}"
            shutil.rmtree(arm, ignore_errors=True)
            shutil.copytree(out / "base", arm)
            raw["run_dir"] = str(arm)
            arm_cfg = out / f"r{r}_p{procs}.yaml"
            arm_cfg.write_text(yaml.safe_dump(raw))
            cache_s = run(["cache", "--config", str(arm_cfg), "--j", "0"], procs, cores)
            n = n or sum(json.loads(z.read_text())["attributes"]["num_samples"]
                         for z in (arm / "cache" / "stage_0").glob("*.zarr/zarr.json"))
            stage_s = run(["stage", "--config", str(arm_cfg), "--j", "1", "--no-cache"], procs, cores)
            row[procs] = {"cache_seconds": cache_s, "cache_samples_per_s": n / cache_s, "stage_seconds": stage_s,
                          "stage_samples_per_s": steady_rate(arm, 1)}
            print(f"round {r + 1}, {procs} process(es): {row[procs]}", flush=True)
            shutil.rmtree(arm)
        rounds.append(row)
    one = args.procs[0]
    summary = {"machine": f"{platform.machine()}, {cores} cores, Python {platform.python_version()}, torch "
                          f"{torch.__version__}",
               "command": " ".join(["python", "benchmarks/scale_bench.py", *(argv if argv is not None else sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d"), "sets": [*SETS, *args.set], "samples_cached": n, "rounds": rounds,
               "medians": {}}
    lines = [f"{summary['machine']}; {summary['date']}; `{summary['command']}`", "",
             "| processes | caching pass s | caching x 1 process | stage 1 samples/s | stage x 1 process |",
             "|---:|---:|---:|---:|---:|"]
    for procs in args.procs:
        med = {key: statistics.median(rr[procs][key] for rr in rounds)
               for key in ("cache_seconds", "stage_samples_per_s")}
        med["cache_speedup"] = statistics.median(rr[one]["cache_seconds"] / rr[procs]["cache_seconds"] for rr in rounds)
        med["stage_speedup"] = statistics.median(rr[procs]["stage_samples_per_s"] / rr[one]["stage_samples_per_s"]
                                                 for rr in rounds)
        summary["medians"][procs] = med
        lines.append(f"| {procs} | {med['cache_seconds']:.1f} | {med['cache_speedup']:.2f} | "
                     f"{med['stage_samples_per_s']:,.0f} | {med['stage_speedup']:.2f} |")
    return save_results(out, summary, lines)


if __name__ == "__main__":
    main()
