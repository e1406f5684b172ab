"""Runs that differ only in seed, aggregated: per-stage means and 95% t-intervals, the critical layer per seed,
and each setting's outcomes against the reference's (cachetrain.study.stats).

A *group* is the runs whose configs agree on every result key but the seeds' (train.seed, data.split_seed).
`cachetrain sweep` names the groups (sweep.json); otherwise a group is labelled by the keys in which it
differs from the first group, the reference. What is aggregated, per stage: test, validation and
eval-mode training accuracy of the auxiliary heads, the gap (train - val), the linear probes' test accuracy
(greedy and end to end, both pools) and greedy-vs-e2e CKA; per group: the end-to-end test accuracy, the
averaged heads' accuracy (cachetrain.train.ensemble) and the critical layer of every seed with how often
each stage is called.

A group's *outcomes* are per-seed numbers: "greedy" (the last stage's test accuracy: the assembled
network's), "e2e" (the end-to-end network's) and "heads m" (the last m heads averaged). Each is compared
with the reference group's same outcome (Welch; paired by seed where both ran it), and within a group
"e2e" and "heads m" with "greedy" (paired: the same runs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cachetrain.run.identity import result_keys
from cachetrain.study.stats import Difference, paired, summarise, welch
from cachetrain.sweep.spec import SEED_KEYS
STAGE_METRICS = ("test_acc", "val_acc", "train_eval_acc", "gap", "cka", "probe_greedy_gap", "probe_greedy_2x2",
                 "probe_e2e_gap")


@dataclass
class Group:
    label: str
    runs: list  # RunRecord (cachetrain.study.report), one per seed
    seeds: list[int]
    stages: list[dict] = field(default_factory=list)  # per stage: metric -> Summary dict
    outcomes: dict = field(default_factory=dict)  # name -> {seed: value}
    summaries: dict = field(default_factory=dict)  # name -> Summary dict
    critical: dict = field(default_factory=dict)
    vs_reference: dict = field(default_factory=dict)  # outcome -> {"welch": .., "paired": ..}
    within: dict = field(default_factory=dict)  # "e2e - greedy", "heads m - greedy" -> paired Difference dict


def result_dict(cfg: dict) -> dict:
    """A run's config.yaml, flattened and read through the current schema (a key added since counts at its
    default), without the keys that change no result and without the seeds."""
    return {k: v for k, v in result_keys(cfg).items() if k not in SEED_KEYS}


def seed_of(cfg: dict) -> int | None:
    t = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    return t.get("seed") if isinstance(t.get("seed"), int) else None


def group_runs(records: list, configs: list[dict], names: list[str | None]) -> list[Group]:
    """Group `records` (in order; the first's group is the reference) by config without seeds; `names`: a group
    name per record where the sweep gave one (None: labelled by its differences from the reference)."""
    keyed: dict[str, Group] = {}
    dicts: dict[str, dict] = {}
    for rec, cfg, name in zip(records, configs, names):
        d = result_dict(cfg)
        key = json.dumps(d, sort_keys=True, default=str)
        if key not in keyed:
            keyed[key] = Group(name or "", [], [])
            dicts[key] = d
        keyed[key].runs.append(rec)
        keyed[key].seeds.append(seed_of(cfg))
    groups = list(keyed.values())
    ref = next(iter(dicts.values()), {})
    for g, d in zip(groups, dicts.values()):
        if not g.label:
            diff = [k for k in sorted(d.keys() | ref.keys()) if d.get(k) != ref.get(k)]
            g.label = ", ".join(f"{k}={_show(d.get(k))}" for k in diff) or "reference"
    return groups


def _show(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v)


def _stage_value(st, metric: str):
    if metric.startswith("probe_"):
        _, net, pool = metric.split("_", 2)
        row = (st.probes.get(net) or {}).get(pool)
        return None if not row else row.get("test_acc")
    return getattr(st, metric)


def _seed_key(g: Group, i: int):
    return g.seeds[i] if g.seeds[i] is not None else f"run{i}"


def aggregate(groups: list[Group]) -> None:
    """Fill every group's stage summaries, outcomes, critical-layer counts and comparisons."""
    for g in groups:
        depth = max((len(r.stages) for r in g.runs), default=0)
        g.stages = []
        for j in range(depth):
            per = {m: summarise([_stage_value(r.stages[j], m) if j < len(r.stages) else None for r in g.runs])
                   for m in STAGE_METRICS}
            g.stages.append({"stage": j, **{m: s.to_dict() for m, s in per.items()}})
        g.outcomes = _outcomes(g)
        g.summaries = {name: summarise(list(values.values())).to_dict() for name, values in g.outcomes.items()}
        calls = [r.critical.get("stage") for r in g.runs]
        counts: dict[str, int] = {}
        for c in calls:
            counts["none" if c is None else str(c)] = counts.get("none" if c is None else str(c), 0) + 1
        g.critical = {"per_seed": {str(_seed_key(g, i)): c for i, c in enumerate(calls)}, "counts": counts}
        g.within = {}
        for name in g.outcomes:
            if name != "greedy":
                d = paired(g.outcomes[name], g.outcomes.get("greedy", {}))
                if d is not None:
                    g.within[f"{name} - greedy"] = d.to_dict()
    ref = groups[0] if groups else None
    for g in groups[1:]:
        g.vs_reference = {}
        for name, values in g.outcomes.items():
            theirs = ref.outcomes.get(name)
            if not theirs:
                continue
            w: Difference | None = welch(list(values.values()), list(theirs.values()))
            p = paired(values, theirs) if set(values) == set(theirs) else None
            g.vs_reference[name] = {"welch": w.to_dict() if w else None, "paired": p.to_dict() if p else None}


def _outcomes(g: Group) -> dict[str, dict]:
    out: dict[str, dict] = {"greedy": {}}
    for i, r in enumerate(g.runs):
        s = _seed_key(g, i)
        if r.stages and r.stages[-1].test_acc is not None:
            out["greedy"][s] = r.stages[-1].test_acc
        if r.e2e is not None and r.e2e.test_acc is not None:
            out.setdefault("e2e", {})[s] = r.e2e.test_acc
        for m, row in sorted((r.heads or {}).items()):
            if m > 1 and row.get("test_acc") is not None:
                out.setdefault(f"heads {m}", {})[s] = row["test_acc"]
    return {k: v for k, v in out.items() if v}


def to_json(g: Group) -> dict:
    return {"label": g.label, "runs": [r.label for r in g.runs], "seeds": g.seeds, "stages": g.stages,
            "outcomes": {k: {str(s): v for s, v in vals.items()} for k, vals in g.outcomes.items()},
            "summaries": g.summaries, "critical": g.critical, "vs_reference": g.vs_reference, "within": g.within}


def read_sweep(path: Path) -> list[tuple[Path, str]] | None:
    """(run folder, group name) of every run of the sweep in folder `path` that has started, in the sweep's
    order; None when `path` holds no sweep.json."""
    meta = Path(path) / "sweep.json"
    if not meta.is_file():
        return None
    from cachetrain.errors import ConfigError

    try:
        runs = json.loads(meta.read_text())["runs"]
        found = [(Path(path) / r["path"], r["group"]) for r in runs]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{meta}: unreadable; expected the sweep description a sweep writes") from None
    return [(p, name) for p, name in found if (p / "stages").is_dir()]
