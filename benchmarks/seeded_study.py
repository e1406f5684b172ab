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

CONFIG = str(ROOT / "configs" / "fmnist.yaml")
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
    meta = {"command": "OMP_NUM_THREADS=1 nice -n 19 python benchmarks/seeded_study.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
                       f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
            "date": time.strftime("%Y-%m-%d"), "this_invocation_minutes": (time.time() - t0) / 60}
    (out / "study_meta.json").write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
