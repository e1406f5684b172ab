"""The layerwise study: where greedy training saturates and why, on Fashion-MNIST from the Debian package.

One command runs the whole grid, then writes the reports and a summary table:

    python benchmarks/layerwise_study.py [--quick] [--out bench/study]

Each run is an ordinary cachetrain run under OUT/runs/<name> (`cachetrain train`, then `cachetrain e2e`
where the grid asks for the end-to-end baseline, then `cachetrain probe`), so any of them can be inspected,
resumed or reported alone; a rerun of the script skips finished work. The grid:

- layercnn at J=8 (downsampling at stages 1 and 3) with k = 1, 2, 3; vgg (VGG-11's 5 groups) and resnet
  (stem + 4 groups) at k=2; each greedy, and end to end with the same network (for layercnn, at k=2) for
  as many epochs as one greedy stage; and the layercnn end to end for 4x those epochs.
- Mitigations of early-layer overfitting, on layercnn k=2 (the reference run): train early stages less
  (`train.slowdown` of epochs, and of the learning rate) and early stopping on validation loss
  (`train.patience`). They change stage 0, so they are trained from scratch.
- The regime question only a caching trainer raises: stages after stage 0 see fixed features (one view),
  where recomputing re-augments every batch. Forks of the reference run at stage 1 (its stage 0 and
  its cache are reused through hard links, `cachetrain fork`): feature-space crop + flip, recomputing
  stage 0 for every batch (`cache.mode: none`, which re-augments the images every batch), and two views
  of every cache (`cache.views: 2`: the plain pass and one augmented pass, drawn per chunk each epoch).

Writes OUT/study.json and OUT/study.md (the table for the README: per run, the greedy and end-to-end test
accuracy, the critical layer, the train - val gap at stage 0 and at the last stage, probe accuracy at the
last stage, wall time) and OUT/report_<group>/ (cachetrain report: markdown, JSON and plots) for the
groups k, arch, mitigations and regime. `--quick` is a tiny version of the same grid for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from cachetrain.cli import main as cachetrain

CONFIG = "fmnist"  # the built-in config (cachetrain/configs/fmnist.yaml)


@dataclass
class Run:
    name: str
    sets: list[str]
    e2e: bool = False
    fork: tuple[str, int] | None = None  # (parent run name, stage J)
    what: str = ""


def grid(quick: bool) -> tuple[list[str], list[Run], dict[str, list[str]]]:
    if quick:
        base = ["data.val_samples=null", "data.train_subset=600", "data.test_subset=300", "model.width=4", "train.epochs=1",
                "train.batch_size=64", "cache.chunk_mib=0.0625"]
        lc = ["model.arch=layercnn", "model.stages=3", "model.downsample=[1]"]
        runs = [Run("layercnn_k2", lc + ["model.k=2"], e2e=True, what="reference"),
                Run("feature_aug", ["train.feature_crop_padding=1", "train.feature_flip=true"],
                    fork=("layercnn_k2", 1), what="fork at 1: feature crop + flip")]
        groups = {"regime": ["layercnn_k2", "feature_aug"]}
        return base, runs, groups
    base = ["data.val_samples=null", "data.train_subset=10000", "model.width=16", "train.epochs=3", "train.batch_size=128"]
    lc = ["model.arch=layercnn", "model.stages=8", "model.downsample=[1, 3]"]
    k2 = lc + ["model.k=2"]
    runs = [
        Run("layercnn_k2", k2, e2e=True, what="reference: layercnn J=8, k=2"),
        Run("layercnn_k1", lc + ["model.k=1"], what="k=1"),
        Run("layercnn_k3", lc + ["model.k=3"], what="k=3"),
        Run("vgg_k2", ["model.arch=vgg", "model.stages=5", "model.k=2"], e2e=True, what="VGG-11 groups, J=5"),
        Run("resnet_k2", ["model.arch=resnet", "model.stages=5", "model.k=2"], e2e=True, what="ResNet-18 groups, J=5"),
        Run("slowdown_epochs", k2 + ["train.slowdown=0.8", "train.slowdown_of=epochs"],
            what="epochs x 0.8^(J-1-j)"),
        Run("patience", k2 + ["train.epochs=5", "train.patience=1"],
            what="5 epochs, early stop on val loss (patience 1)"),
        Run("feature_aug", ["train.feature_crop_padding=1", "train.feature_flip=true"], fork=("layercnn_k2", 1),
            what="fork at 1: feature-space crop + flip"),
        Run("recompute", ["cache.mode=none"], fork=("layercnn_k2", 1),
            what="fork at 1: recompute, re-augment every batch"),
        Run("views2", ["cache.views=2"], fork=("layercnn_k2", 1), what="fork at 1: 2 views of each cache"),
        Run("slowdown_lr", k2 + ["train.slowdown=0.7", "train.slowdown_of=lr"], what="lr x 0.7^(J-1-j)"),
        # the baseline above trains as many epochs as one greedy stage (the bench's rule); this one, 4x that
        Run("e2e_long", ["train.e2e_epochs=12"], fork=("layercnn_k2", 7), e2e=True,
            what="fork at 7: end to end for 12 epochs"),
    ]
    groups = {"k": ["layercnn_k2", "layercnn_k1", "layercnn_k3", "e2e_long"],
              "arch": ["layercnn_k2", "vgg_k2", "resnet_k2"],
              "mitigations": ["layercnn_k2", "slowdown_epochs", "slowdown_lr", "patience"],
              "regime": ["layercnn_k2", "feature_aug", "recompute", "views2"]}
    return base, runs, groups


def call(*argv: str) -> None:
    rc = cachetrain(list(argv))
    if rc:
        raise SystemExit(f"study: `cachetrain {' '.join(argv)}` failed with exit status {rc}")


def run_one(run: Run, base: list[str], out: Path) -> float:
    path = out / "runs" / run.name
    t0 = time.perf_counter()
    # data.val_samples=null: the default split (1/12 of the training split), where the demo config holds none out
    sets = [a for s in base + run.sets for a in ("--set", s)]
    if run.fork and not (path / "config.yaml").exists():
        parent, at = run.fork
        call("fork", "--run", str(out / "runs" / parent), "--at", str(at), "--to", str(path),
             *[a for s in run.sets for a in ("--set", s)])
    if run.fork:
        call("train", "--run", str(path))
    else:
        call("train", "--config", CONFIG, "--run", str(path), *sets)
    if run.e2e:
        call("e2e", "--run", str(path))
    call("probe", "--run", str(path))
    return time.perf_counter() - t0


def summarise(out: Path, runs: list[Run], groups: dict[str, list[str]], seconds: dict[str, float]) -> dict:
    from cachetrain.study.report import write_report

    done = {r.name for r in runs if (out / "runs" / r.name / "stages").is_dir()}
    runs = [r for r in runs if r.name in done]
    for group, names in groups.items():
        names = [n for n in names if n in done]
        if names:
            write_report([out / "runs" / n for n in names], out / f"report_{group}")
    main = write_report([out / "runs" / r.name for r in runs], out / "report_all")
    rows = []
    for r, rep in zip(runs, main["runs"]):
        rows.append({"run": r.name, "what": r.what, "seconds": round(seconds.get(r.name, 0.0), 1), **_row(rep)})
    return {"runs": rows, "groups": {g: str(out / f"report_{g}") for g in groups}}


def _row(rep: dict) -> dict:
    """The summary numbers of one run from its report JSON (cachetrain.study.report)."""
    stages = rep.get("stages", [])
    last = stages[-1] if stages else {}
    first = stages[0] if stages else {}
    probe_last = (last.get("probes") or {}).get("greedy", {}).get("gap", {}) if last else {}
    return {"stages": len(stages), "greedy_test_acc": last.get("test_acc"), "greedy_val_acc": last.get("val_acc"),
            "e2e_test_acc": rep.get("e2e", {}).get("test_acc") if rep.get("e2e") else None,
            "critical_layer": (rep.get("critical") or {}).get("stage"),
            "gap_stage0": first.get("gap"), "gap_last": last.get("gap"),
            "probe_last_test_acc": probe_last.get("test_acc") if isinstance(probe_last, dict) else None}


def markdown(summary: dict, meta: dict) -> str:
    def pct(v):
        return "—" if v is None else f"{100 * v:.2f}"

    lines = ["| run | what | J | greedy test % | e2e test % | critical layer | gap stage 0 (pts) | gap last (pts) "
             "| probe last (gap, test %) | wall |", "|" + "---|" * 10]
    for r in summary["runs"]:
        crit = "—" if r["critical_layer"] is None else str(r["critical_layer"])
        lines.append(f"| {r['run']} | {r['what']} | {r['stages']} | {pct(r['greedy_test_acc'])} | "
                     f"{pct(r['e2e_test_acc'])} | {crit} | {pct(r['gap_stage0'])} | {pct(r['gap_last'])} | "
                     f"{pct(r['probe_last_test_acc'])} | {r['seconds'] / 60:.1f} min |")
    lines.append("")
    lines.append(f"`{meta['command']}` on {meta['machine']}, {meta['date']}: {meta['wall_minutes']:.0f} min in all.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny grid (the test suite's)")
    p.add_argument("--out", default="bench/study")
    p.add_argument("--only", nargs="+", help="run only these runs of the grid (their parents must exist)")
    p.add_argument("--report-only", action="store_true", help="write the reports and the table from the runs there")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, runs, groups = grid(args.quick)
    seconds_path = out / "seconds.json"
    seconds = json.loads(seconds_path.read_text()) if seconds_path.exists() else {}
    t0 = time.perf_counter()
    for run in runs:
        if (args.only and run.name not in args.only) or args.report_only:
            continue
        print(f"== {run.name}: {run.what}", flush=True)
        took = run_one(run, base, out)
        # a rerun that only skips finished work keeps the first run's wall time
        seconds[run.name] = max(took, seconds.get(run.name, 0.0))
        seconds_path.write_text(json.dumps(seconds, indent=1))
    summary = summarise(out, runs, groups, seconds)
    meta = {"command": "python benchmarks/layerwise_study.py" + (" --quick" if args.quick else ""),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"), "wall_minutes": sum(seconds.values()) / 60,
            "this_invocation_minutes": (time.perf_counter() - t0) / 60, "base": base}
    summary["meta"] = meta
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    (out / "study.md").write_text(markdown(summary, meta))
    print((out / "study.md").read_text())
    return summary


if __name__ == "__main__":
    main()
