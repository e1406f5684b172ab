"""`cachetrain report`: read run directories, write report.md, report.json and PNG plots.

Reads only plain files a run leaves behind (see cachetrain.run.layout for the layout):

    <run>/config.yaml                      model.stages (J), model.arch, model.k, name; optional
    <run>/stages/stage_<j>/metrics.jsonl   one row per finished epoch of stage j's auxiliary head
    <run>/e2e/metrics.jsonl                the same rows for the end-to-end network; optional
    <run>/probes.jsonl                     linear probes {net, stage, pool, dims, train/val/test_acc, ...}; optional
    <run>/cka.jsonl                        greedy-vs-e2e linear CKA {stage, cka, samples, features, seconds}; optional
    <run>/heads.jsonl                      the last m auxiliary heads averaged {heads, val_acc, test_acc}; optional

A path may also be a sweep's folder (`cachetrain sweep`: its sweep.json lists the runs and their groups).
Runs that differ only in seed are aggregated (cachetrain.study.aggregate: means, 95% t-intervals, the
critical layer per seed, differences from the reference with the ones the seeds cannot resolve); report.md
then shows the groups, and runs.md each run's own tables.

A stage's numbers are those of its metrics row with epoch == E when the last row says "selected_epoch": E
(early stopping kept epoch E's weights), else of its last row; a retrained epoch's last occurrence wins. Runs from
before the validation split and the probes lack most diagnostics: each missing one is null in report.json, "—" in
report.md and named under "Missing"; only a path that is not a run directory at all is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cachetrain.errors import ConfigError
from cachetrain.study.critical import critical_layer

NETS = ("greedy", "e2e")
POOLS = ("gap", "2x2")
DASH = "—"


@dataclass
class StageRecord:
    """One stage's chosen epoch: accuracies are fractions, gap = train_eval_acc - val_acc."""
    stage: int | None  # None for the end-to-end network
    k: int | None = None
    epochs: int | None = None  # epochs trained (the last row's epoch)
    selected_epoch: int | None = None  # set when early stopping kept an earlier epoch's weights
    train_acc: float | None = None  # running accuracy over the augmented batches of the epoch
    train_eval_acc: float | None = None  # eval mode, plain images, a training subset the size of val
    val_acc: float | None = None
    test_acc: float | None = None
    gap: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    test_loss: float | None = None
    probes: dict = field(default_factory=dict)  # net -> pool -> probe row (or None)
    cka: float | None = None


@dataclass
class RunRecord:
    label: str  # the run folder's name; shown on plots and tables
    path: str
    name: str | None = None
    arch: str | None = None
    k: int | None = None
    stages: list[StageRecord] = field(default_factory=list)
    e2e: StageRecord | None = None
    critical: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    heads: dict = field(default_factory=dict)  # m -> {"val_acc", "test_acc"}: the last m heads averaged


# -- reading -----------------------------------------------------------------------------------------------------
def _num(v) -> float | None:
    """A finite number, or None (absent keys, null, NaN from an epoch that never evaluated, wrong types)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _int(v) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _read_jsonl(path: Path, missing: list[str], rel: str) -> list[dict]:
    """The JSON-object lines of `path` ([] when absent); a torn or foreign line is skipped and named in `missing`."""
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        missing.append(f"{rel}: {bad} unreadable line(s) skipped")
    return rows


def _stage_record(j: int | None, rows: list[dict], missing: list[str], rel: str) -> StageRecord:
    rec = StageRecord(stage=j)
    rows = [r for r in rows if _int(r.get("epoch")) is not None]
    if not rows:
        return rec
    by_epoch = {r["epoch"]: r for r in rows}  # a retrained epoch's last occurrence wins
    last = rows[-1]
    selected = _int(last.get("selected_epoch"))
    row = by_epoch.get(selected, last) if selected is not None else last
    if selected is not None and selected not in by_epoch:
        missing.append(f"{rel}: selected_epoch {selected} has no row; the last row (epoch {last['epoch']}) is used")
    rec.epochs, rec.k = last["epoch"], _int(row.get("k"))
    rec.selected_epoch = selected if selected in by_epoch else None
    for key in ("train_acc", "train_eval_acc", "val_acc", "test_acc", "train_loss", "val_loss", "test_loss"):
        setattr(rec, key, _num(row.get(key)))
    rec.gap = _num(row.get("gap"))
    if rec.gap is None and rec.train_eval_acc is not None and rec.val_acc is not None:
        rec.gap = rec.train_eval_acc - rec.val_acc
    return rec


def _stage_folders(stages: Path) -> list[int]:
    found = []
    for p in stages.glob("stage_*"):
        suffix = p.name.removeprefix("stage_")
        if p.is_dir() and suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def _read_config(run: Path, missing: list[str]) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        missing.append("config.yaml: absent (stage count taken from the stage folders)")
        return {}
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        cfg = None
    if not isinstance(cfg, dict):
        missing.append("config.yaml: unreadable (stage count taken from the stage folders)")
        return {}
    return cfg


def _at(values: list[int]) -> str:
    return "stage" + ("s " if len(values) > 1 else " ") + ", ".join(map(str, values))


def read_run(path: Path, label: str | None = None) -> RunRecord:
    """Everything the report shows about one run directory; ConfigError when it is not one."""
    run = Path(path)
    if not run.is_dir():
        raise ConfigError(f"run directory {run} does not exist; expected a folder with stages/stage_<j>/metrics.jsonl")
    if not (run / "stages").is_dir():
        raise ConfigError(f"{run} is not a run directory: no stages/ folder (expected stages/stage_<j>/metrics.jsonl)")
    rec = RunRecord(label=label or run.name, path=str(run))
    cfg = _read_config(run, rec.missing)
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    rec.name = cfg.get("name") if isinstance(cfg.get("name"), str) else None
    rec.arch = model.get("arch") if isinstance(model.get("arch"), str) else None
    rec.k = _int(model.get("k"))
    folders = _stage_folders(run / "stages")
    J = max(_int(model.get("stages")) or 0, folders[-1] + 1 if folders else 0)

    for j in range(J):
        rel = f"stages/stage_{j}/metrics.jsonl"
        st = _stage_record(j, _read_jsonl(run / rel, rec.missing, rel), rec.missing, rel)
        st.k = st.k if st.k is not None else rec.k
        rec.stages.append(st)
    if e2e_rows := _read_jsonl(run / "e2e" / "metrics.jsonl", rec.missing, "e2e/metrics.jsonl"):
        rec.e2e = _stage_record(None, e2e_rows, rec.missing, "e2e/metrics.jsonl")
        rec.e2e.k = None
    probes: dict[tuple, dict] = {}
    for r in _read_jsonl(run / "probes.jsonl", rec.missing, "probes.jsonl"):
        if r.get("net") in NETS and r.get("pool") in POOLS and _int(r.get("stage")) is not None:
            probes[(r["net"], r["stage"], r["pool"])] = {
                "train_acc": _num(r.get("train_acc")), "val_acc": _num(r.get("val_acc")),
                "test_acc": _num(r.get("test_acc")), "dims": _int(r.get("dims")),
                "train_samples": _int(r.get("train_samples")), "seconds": _num(r.get("seconds"))}
    cka = {r["stage"]: _num(r.get("cka")) for r in _read_jsonl(run / "cka.jsonl", rec.missing, "cka.jsonl")
           if _int(r.get("stage")) is not None}
    for st in rec.stages:
        st.probes = {net: {pool: probes.get((net, st.stage, pool)) for pool in POOLS} for net in NETS}
        st.cka = cka.get(st.stage)
    for r in _read_jsonl(run / "heads.jsonl", rec.missing, "heads.jsonl"):  # the last row per m wins
        if _int(r.get("heads")) is not None:
            rec.heads[r["heads"]] = {"val_acc": _num(r.get("val_acc")), "test_acc": _num(r.get("test_acc"))}
    _note_missing(rec, run, probes, cka)
    return rec


def _note_missing(rec: RunRecord, run: Path, probes: dict, cka: dict) -> None:
    """Name each diagnostic the run lacks, once, with the stages it lacks it at."""
    m = rec.missing
    if not rec.stages:
        m.append("stages: none found under stages/")
    untrained = [s.stage for s in rec.stages if s.epochs is None]
    if untrained:
        m.append(f"metrics: no finished epoch at {_at(untrained)}")
    trained = [s for s in rec.stages if s.epochs is not None]
    for key, what in (("val_acc", "validation accuracy"), ("train_eval_acc", "train accuracy in eval mode"),
                      ("test_loss", "test loss")):
        lacking = [s.stage for s in trained if getattr(s, key) is None]
        if trained and len(lacking) == len(trained):
            m.append(f"{what} ({key}): not recorded")
        elif lacking:
            m.append(f"{what} ({key}): missing at {_at(lacking)}")
    if rec.e2e is None:
        m.append("end-to-end baseline: no e2e/metrics.jsonl")
    if not (run / "probes.jsonl").is_file():
        m.append("linear probes: no probes.jsonl")
    else:
        for net in NETS:
            for pool in POOLS:
                lacking = [s.stage for s in rec.stages if (net, s.stage, pool) not in probes]
                if len(lacking) == len(rec.stages) and pool == "2x2":
                    m.append(f"{net} probes (2x2): none recorded")
                elif lacking:
                    why = " (2x2 is skipped where a stage's output is under 2x2)" if pool == "2x2" else ""
                    m.append(f"{net} probes ({pool}): missing at {_at(lacking)}{why}")
    if not (run / "cka.jsonl").is_file():
        m.append("CKA: no cka.jsonl")
    elif lacking := [s.stage for s in rec.stages if s.stage not in cka]:
        m.append(f"CKA: missing at {_at(lacking)}")


def _critical(rec: RunRecord, delta: float) -> dict:
    """The critical-layer call on validation accuracy and eval-mode train accuracy (running train accuracy when
    the run did not record eval-mode accuracy at every stage; the reason says so)."""
    val = [s.val_acc for s in rec.stages]
    if all(s.train_eval_acc is not None for s in rec.stages):
        out = critical_layer(val, [s.train_eval_acc for s in rec.stages], delta)
        out["train_source"] = "train_eval_acc"
        return out
    out = critical_layer(val, [s.train_acc for s in rec.stages], delta)
    out["train_source"] = "train_acc"
    out["reason"] += ("; training accuracy here is train_acc (running, augmented batches), since train_eval_acc "
                      "is not recorded at every stage")
    return out


# -- writing -----------------------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return DASH if v is None else f"{100 * v:.2f}"


def _pts(v: float | None) -> str:
    return DASH if v is None else f"{100 * v:+.2f}"


def _probe(st: StageRecord, net: str, pool: str, split: str) -> str:
    row = st.probes.get(net, {}).get(pool)
    return _pct(row.get(f"{split}_acc")) if row else DASH


def _epochs(st: StageRecord) -> str:
    if st.epochs is None:
        return DASH
    return f"{st.selected_epoch} of {st.epochs}" if st.selected_epoch is not None else str(st.epochs)


def _call(c: dict) -> str:
    head = f"stage {c['stage']}" if c["stage"] is not None else "none"
    return f"**Critical layer: {head}** ({c['reason']}). Rule: {c['rule']}."


def _run_markdown(rec: RunRecord) -> list[str]:
    what = ", ".join(x for x in (rec.arch, f"J={len(rec.stages)}", f"k={rec.k}" if rec.k is not None else None) if x)
    lines = [f"## {rec.label}", "", f"`{rec.path}` ({what})", "",
             "| stage | k | epochs | train acc (running) | train acc (eval) | val acc | test acc | gap (pts) | "
             "probe gap val | probe gap test | probe 2x2 val | probe 2x2 test | CKA |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in rec.stages:
        lines.append(f"| {s.stage} | {DASH if s.k is None else s.k} | {_epochs(s)} | {_pct(s.train_acc)} | "
                     f"{_pct(s.train_eval_acc)} | {_pct(s.val_acc)} | {_pct(s.test_acc)} | {_pts(s.gap)} | "
                     f"{_probe(s, 'greedy', 'gap', 'val')} | {_probe(s, 'greedy', 'gap', 'test')} | "
                     f"{_probe(s, 'greedy', '2x2', 'val')} | {_probe(s, 'greedy', '2x2', 'test')} | "
                     f"{DASH if s.cka is None else f'{s.cka:.3f}'} |")
    lines.append("")
    if any(any(v for v in s.probes.get("e2e", {}).values()) for s in rec.stages):
        lines += ["End-to-end network, probed at the same stage boundaries (accuracy %):", "",
                  "| stage | probe gap val | probe gap test | probe 2x2 val | probe 2x2 test |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {s.stage} | {_probe(s, 'e2e', 'gap', 'val')} | {_probe(s, 'e2e', 'gap', 'test')} | "
                  f"{_probe(s, 'e2e', '2x2', 'val')} | {_probe(s, 'e2e', '2x2', 'test')} |" for s in rec.stages]
        lines.append("")
    e = rec.e2e
    lines.append(f"End to end: test accuracy {_pct(e.test_acc)}% after {_epochs(e)} epochs." if e else
                 f"End to end: {DASH} (no end-to-end baseline in this run).")
    lines += ["", _call(rec.critical), "", "Missing:" if rec.missing else "Missing: nothing.", ""]
    lines += [f"- {m}" for m in rec.missing] + ([""] if rec.missing else [])
    return lines


def _summary_markdown(runs: list[RunRecord]) -> list[str]:
    lines = ["| run | arch | J | k | best val acc (stage) | last-stage test acc | e2e test acc | "
             "last stage - e2e (pts) | critical layer |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        vals = [(s.val_acc, s.stage) for s in r.stages if s.val_acc is not None]
        best = f"{_pct(max(vals)[0])} ({max(vals)[1]})" if vals else DASH
        last = r.stages[-1].test_acc if r.stages else None
        e2e = r.e2e.test_acc if r.e2e else None
        diff = _pts(last - e2e) if last is not None and e2e is not None else DASH
        crit = DASH if r.critical["stage"] is None else str(r.critical["stage"])
        lines.append(f"| {r.label} | {r.arch or DASH} | {len(r.stages)} | {DASH if r.k is None else r.k} | {best} | "
                     f"{_pct(last)} | {_pct(e2e)} | {diff} | {crit} |")
    return lines + [""]


def _labels(runs: list[Path]) -> list[str]:
    """Each run's folder name; with the parent folder too where two runs share a name."""
    names = [Path(r).name for r in runs]
    return [f"{Path(r).parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


def _expand(runs: list[Path]) -> tuple[list[Path], list[str | None]]:
    """The run folders, a sweep's folder replaced by its runs; the group name the sweep gave each (or None)."""
    from cachetrain.study.aggregate import read_sweep

    paths: list[Path] = []
    names: list[str | None] = []
    for p in map(Path, runs):
        swept = read_sweep(p) if p.is_dir() else None
        if swept is None:
            paths.append(p)
            names.append(None)
            continue
        if not swept:
            raise ConfigError(f"{p}: a sweep with no run started yet; nothing to report")
        paths += [q for q, _ in swept]
        names += [g for _, g in swept]
    return paths, names


def write_report(runs: list[Path], out: Path, delta: float = 0.3) -> dict:
    """Read `runs` (the first is the main run, the rest are overlaid as comparisons; a sweep's folder stands for
    its runs), write out/report.md, out/report.json and PNG plots (accuracy, probes, gap, cka), and return
    report.json's dict. Runs that differ only in seed are aggregated (the module docstring)."""
    if not runs:
        raise ConfigError("report: no run directory given; expected at least one")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta >= 0):
        raise ConfigError(f"--delta {delta}: expected a number of percentage points >= 0")
    runs, group_names = _expand(runs)
    records = [read_run(Path(p), label) for p, label in zip(runs, _labels(runs))]
    for rec in records:
        rec.critical = _critical(rec, delta)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"delta": delta, "runs": [dataclasses.asdict(r) for r in records]}
    from cachetrain.study import aggregate
    from cachetrain.study.plots import write_group_plots, write_plots  # matplotlib: a dependency (pyproject.toml)

    groups = aggregate.group_runs(records, [_read_config(Path(p), []) for p in runs], group_names)
    seeded = any(len(g.runs) > 1 for g in groups)
    if seeded:
        aggregate.aggregate(groups)
        report["groups"] = [aggregate.to_json(g) for g in groups]
        report["interval"] = "95% Student t-interval over seeds; differences: Welch, and paired by seed"
        report["plots"] = write_group_plots(report["groups"], out)
    else:
        report["plots"] = write_plots(report["runs"], out)

    intro = (f"Accuracies in %, gap = train (eval) - val in points; critical-layer threshold delta = {delta} "
             f"points per stage.")
    runs_md = ["# Layerwise report: every run", "", f"Runs: {', '.join(r.label for r in records)}. {intro}", ""]
    runs_md += _summary_markdown(records)
    for rec in records:
        runs_md += _run_markdown(rec)
    if seeded:
        from cachetrain.study.report_groups import groups_markdown

        md = ["# Layerwise report", "", f"{len(records)} runs in {len(groups)} settings. {intro} "
              f"Each number is a mean over seeds with its 95% Student t-interval; each run's own tables are in "
              f"[runs.md](runs.md).", ""]
        md += groups_markdown(report["groups"])
        (out / "runs.md").write_text("\n".join(runs_md))
    else:
        md = ["# Layerwise report", "", f"Runs: {', '.join(r.label for r in records)}. {intro}", ""]
        md += runs_md[4:]
    md += ["## Plots", ""] + [f"![{name}]({file})" for name, file in report["plots"].items()] + [""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report
