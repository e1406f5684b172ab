"""The layerwise study with seeds: the study's grid through `cachetrain sweep`, then the aggregated summary.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/seeded_study.py --out bench/seeded_study [--seeds 3]

runs `cachetrain sweep` over the base below and the grids of benchmarks/study_grids.yaml (the end-to-end
baseline at 1x and 4x one stage's epochs for every architecture, the gap-closing methods, k, the caching
regime, early stopping), every grid for every seed, sharing stages where runs can; rerun the same command to
resume. Then it writes OUT/study.md and OUT/study.json: the headline numbers with their 95% intervals (from
OUT/report/report.json, `cachetrain report` over the sweep) and the sweep's own cost with and without prefix
sharing (stage trainings, caching passes, wall time from OUT/steps.jsonl). `--report-only` writes them from
the runs there without training anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cachetrain.cli import main as cachetrain  # noqa: E402
from cachetrain.study.report_groups import ci, critical_counts, diff  # noqa: E402

CONFIG = "fmnist"  # the built-in config (cachetrain/configs/fmnist.yaml)
GRIDS = str(ROOT / "benchmarks" / "study_grids.yaml")
# the single-seed study's base (benchmarks/layerwise_study.py) with 2 epochs per stage instead of 3, and the
# probes recorded afterwards for the reference runs only (`cachetrain probe`): what fits the machine's time
BASE = ["data.val_samples=null", "data.train_subset=10000", "model.width=16", "train.epochs=2", "train.batch_size=128",
        "model.arch=layercnn", "model.stages=8", "model.downsample=[1, 3]", "model.k=2", "train.probes=false"]


def sweep_args(out: Path, seeds: int) -> list[str]:
    return ["sweep", "--config", CONFIG, *[a for s in BASE for a in ("--set", s)], "--grids", GRIDS,
            "--seeds", str(seeds), "--out", str(out)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/seeded_study")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--plan", action="store_true", help="print the sweep's plan and stop")
    p.add_argument("--report-only", action="store_true", help="report and summarise the runs there; train nothing")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    if args.plan:
        return cachetrain([*sweep_args(out, args.seeds), "--plan"])
    if not args.report_only:
        rc = cachetrain(sweep_args(out, args.seeds))
        if rc:
            return rc
    else:
        rc = cachetrain(["report", "--run", str(out), "--out", str(out / "report")])
        if rc:
            return rc
    summary = summarise(out)
    command = "OMP_NUM_THREADS=1 nice -n 19 python benchmarks/seeded_study.py " + " ".join(argv or sys.argv[1:])
    meta = {"command": command,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
                       f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
            "date": time.strftime("%Y-%m-%d"), "this_invocation_minutes": (time.time() - t0) / 60}
    summary["meta"] = meta
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    (out / "study.md").write_text(markdown(summary))
    print((out / "study.md").read_text())
    return 0


# -- the summary ----------------------------------------------------------------------------------------------------
def cost(out: Path) -> dict:
    """The sweep's own cost: stage trainings and caching passes with sharing (done) and without it (what the
    same finished runs would have needed alone: the sweep's plan, sweep.json), wall time measured and the wall
    time the shared work would have added (each fork's parent's time on the stages and caches the fork
    reused: its metrics' epoch seconds per stage, and the rest of its training step spread over its caching
    passes)."""
    runs = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    seconds: dict[str, float] = {}
    for r in steps:
        seconds[r["run"]] = seconds.get(r["run"], 0.0) + r["seconds"]
    train_s = {r["run"]: r["seconds"] for r in steps if r["step"] == "train"}
    finished = [r for name, r in runs.items() if name in train_s]

    def stage_seconds(name: str, j: int) -> float:
        path = out / runs[name]["path"] / "stages" / f"stage_{j}" / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        return sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in rows)

    saved_seconds = 0.0
    for r in finished:
        if r["parent"] is None:
            continue
        parent = runs[r["parent"]]
        own = [stage_seconds(parent["name"], j) for j in range(parent["unshared_stage_trainings"])]
        per_cache = max(0.0, train_s[parent["name"]] - sum(own)) / max(1, parent["unshared_caching_passes"])
        reused_caches = r["unshared_caching_passes"] - r["caching_passes"]  # a cache rebuilt (views) is not reused
        saved_seconds += sum(own[:r["at"]]) + reused_caches * per_cache
    wall = sum(seconds.get(r["name"], 0.0) for r in finished)
    return {"runs": len(finished), "wall_seconds": wall,
            "stage_trainings": sum(x.get("stages", 0) for x in steps if x["step"] == "train"),
            "caching_passes": sum(x.get("caches", 0) for x in steps if x["step"] == "train"),
            "stage_trainings_unshared": sum(r["unshared_stage_trainings"] for r in finished),
            "caching_passes_unshared": sum(r["unshared_caching_passes"] for r in finished),
            "wall_seconds_unshared_estimate": wall + saved_seconds}


def memory(out: Path) -> dict | None:
    """Training peak (fp32, batch 128, live tensors counted on fake tensors) of the largest greedy stage and of the
    end-to-end network, which fine-tuning holds as the baseline does (cachetrain.plan.memory)."""
    from cachetrain.config import load_config
    from cachetrain.plan.memory import memory_table, variants_for

    runs = json.loads((out / "sweep.json").read_text())["runs"]
    cfg = load_config(out / runs[0]["path"] / "config.yaml")
    variant = next(v for v in variants_for(cfg) if v.name == "in-place ReLU")
    table = memory_table(cfg, (1, 28, 28), 10, cfg.train.batch_size, 2**40, variants=[variant])
    return table["summary"][variant.name]


def summarise(out: Path) -> dict:
    report = json.loads((out / "report" / "report.json").read_text())
    groups = report.get("groups") or []
    rows = []
    for g in groups:
        st = g["stages"]
        ref = (g.get("vs_reference") or {}).get("greedy") or {}
        rows.append({"setting": g["label"], "n": len(g["runs"]), "greedy": g["summaries"].get("greedy"),
                     "e2e": g["summaries"].get("e2e"), "val_last": st[-1]["val_acc"] if st else None,
                     "vs_reference": ref.get("paired") or ref.get("welch"),
                     "gap_first": st[0]["gap"] if st else None, "gap_last": st[-1]["gap"] if st else None,
                     "critical": g["critical"], "within": g.get("within") or {},
                     "heads": {k: v for k, v in g["summaries"].items() if k.startswith("heads")},
                     "stage_test": [s["test_acc"] for s in st], "cka": [s["cka"] for s in st]})
    try:
        mem = memory(out)
    except Exception as e:  # noqa: BLE001 - the summary does not depend on it
        mem = {"error": repr(e)}
    return {"rows": rows, "cost": cost(out), "memory": mem}


def markdown(summary: dict) -> str:
    lines = ["| setting | n | greedy test % | e2e test % | e2e - greedy (pts, paired) | greedy - reference (pts) | "
             "critical layer (seeds) | gap stage 0 -> last (pts) |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['setting']} | {r['n']} | {ci(r['greedy'])} | {ci(r['e2e'])} | "
                     f"{diff(r['within'].get('e2e - greedy'))} | {diff(r['vs_reference'])} | "
                     f"{critical_counts(r['critical'])} | {ci(r['gap_first'])} -> {ci(r['gap_last'])} |")
    lines += ["", "Averaged heads (test %, and minus the last head alone, paired):", ""]
    for r in summary["rows"]:
        for name, s in r["heads"].items():
            lines.append(f"- {r['setting']}: {name}: {ci(s)}, {diff(r['within'].get(f'{name} - greedy'))}")
    c = summary["cost"]
    lines += ["", f"Sweep cost for the {c['runs']} finished runs: {c['stage_trainings']} stage trainings and "
                  f"{c['caching_passes']} caching passes with prefix sharing, {c['stage_trainings_unshared']} and "
                  f"{c['caching_passes_unshared']} without; {c['wall_seconds'] / 60:.0f} min of wall time, "
                  f"about {c['wall_seconds_unshared_estimate'] / 60:.0f} min without sharing (estimated)."]
    m = summary.get("memory") or {}
    if "e2e_bytes" in m:
        lines.append(f"Memory (fp32, batch 128, live peak): the largest greedy stage ({m['largest_stage']}) "
                     f"{m['largest_stage_bytes'] / 2**20:.1f} MiB, end to end (and fine-tuning) "
                     f"{m['e2e_bytes'] / 2**20:.1f} MiB, {m['e2e_bytes'] / m['largest_stage_bytes']:.1f}x.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
