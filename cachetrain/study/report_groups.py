"""The aggregated report's markdown: settings (groups of seeds) with means, 95% intervals and differences, from
report.json's "groups" (cachetrain.study.aggregate)."""

from __future__ import annotations

DASH = "—"


def ci(s: dict | None, scale: float = 100.0, digits: int = 2) -> str:
    """`86.70 ± 0.41` (mean ± half-width of the 95% interval), the mean alone for one value."""
    if not s or s.get("mean") is None:
        return DASH
    mean = f"{scale * s['mean']:.{digits}f}"
    return mean if s.get("half") is None else f"{mean} ± {scale * s['half']:.{digits}f}"


def diff(d: dict | None) -> str:
    """`+0.40 [-0.21, +1.01]` in points, then "unresolved" when the interval holds 0."""
    if not d:
        return DASH
    text = f"{100 * d['diff']:+.2f}"
    if d.get("identical"):
        return text + " (identical)"
    if d.get("half") is None:
        return text + " (no interval)"
    text += f" [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
    return text if d["resolved"] else text + " unresolved"


def critical_counts(c: dict) -> str:
    """`4 (2x), 5 (1x)`: how many seeds called each stage the critical layer."""
    counts = c.get("counts", {})
    order = sorted(counts, key=lambda k: (k == "none", int(k) if k.isdigit() else 0))
    return ", ".join(f"{k} ({counts[k]}x)" for k in order) or DASH


def groups_markdown(groups: list[dict]) -> list[str]:
    ref = groups[0]["label"] if groups else ""
    lines = ["## Settings", "",
             f"n: seeds. Greedy: the assembled network (the last stage's head). Differences are from the reference "
             f"({ref}), Welch's interval; \"unresolved\": the interval holds 0, so these seeds cannot tell its sign.",
             "", "| setting | n | greedy test % | e2e test % | greedy - reference (pts) | critical layer (seeds) | "
                 "gap stage 0 -> last (pts) |", "|---|---:|---:|---:|---:|---|---:|"]
    for g in groups:
        st = g["stages"]
        gap = f"{ci(st[0]['gap'])} -> {ci(st[-1]['gap'])}" if st else DASH
        vs = (g["vs_reference"].get("greedy") or {}).get("welch") if g["vs_reference"] else None
        lines.append(f"| {g['label']} | {len(g['runs'])} | {ci(g['summaries'].get('greedy'))} | "
                     f"{ci(g['summaries'].get('e2e'))} | {diff(vs) if g is not groups[0] else 'reference'} | "
                     f"{critical_counts(g['critical'])} | {gap} |")
    lines += ["", "## Outcomes against the reference", "",
              "Every outcome of every setting: its mean and interval, its difference from the reference's same "
              "outcome (Welch; and paired by seed where both ran the same seeds: the same split and initial "
              "weights, and for forks the same first stages), and within the setting its difference from its own "
              "greedy network (paired: the same runs).", "",
              "| setting | outcome | test % | vs reference (Welch) | vs reference (paired) | vs its greedy (paired) |",
              "|---|---|---:|---:|---:|---:|"]
    for g in groups:
        for name, s in g["summaries"].items():
            vs = g["vs_reference"].get(name) or {}
            lines.append(f"| {g['label']} | {name} | {ci(s)} | {diff(vs.get('welch'))} | {diff(vs.get('paired'))} | "
                         f"{diff(g['within'].get(f'{name} - greedy'))} |")
    unresolved = [f"{g['label']} ({name})" for g in groups for name, vs in g["vs_reference"].items()
                  if (vs.get("paired") or vs.get("welch") or {}).get("resolved") is False]
    lines += ["", "Differences from the reference these seeds cannot resolve (the paired interval where there is "
              "one, else Welch's, holds 0): " + ("; ".join(unresolved) or "none") + ".", ""]
    for g in groups:
        lines += _group_section(g)
    return lines


def _group_section(g: dict) -> list[str]:
    lines = [f"### {g['label']}", "", f"Runs: {', '.join(g['runs'])}.", "",
             "| stage | test % | val % | train (eval) % | gap (pts) | probe gap test % | probe 2x2 test % | "
             "e2e probe gap test % | CKA |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in g["stages"]:
        lines.append(f"| {s['stage']} | {ci(s['test_acc'])} | {ci(s['val_acc'])} | {ci(s['train_eval_acc'])} | "
                     f"{ci(s['gap'])} | {ci(s['probe_greedy_gap'])} | {ci(s['probe_greedy_2x2'])} | "
                     f"{ci(s['probe_e2e_gap'])} | {ci(s['cka'], 1, 3)} |")
    per_seed = ", ".join(f"seed {k}: {DASH if v is None else v}" for k, v in g["critical"]["per_seed"].items())
    lines += ["", f"Critical layer per seed: {per_seed}.", ""]
    return lines
