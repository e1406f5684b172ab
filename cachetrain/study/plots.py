"""The report's PNG plots, drawn from report.json's run dicts (cachetrain.study.report), one colour per run.

Uses matplotlib's object API (Figure + the Agg canvas), not pyplot: no global figure state and no backend to
switch, so it is safe inside any process that also plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D


def _series(run: dict, get) -> tuple[list[int], np.ndarray]:
    """(stage indices, values) with NaN where a value is missing, so the line breaks there."""
    xs = [s["stage"] for s in run["stages"]]
    ys = [get(s) for s in run["stages"]]
    return xs, np.array([np.nan if v is None else v for v in ys], dtype=float)


def _probe(net: str, pool: str):
    def get(s: dict):
        row = s["probes"].get(net, {}).get(pool)
        return None if not row or row.get("test_acc") is None else 100 * row["test_acc"]
    return get


def _pct(key: str):
    return lambda s: None if s.get(key) is None else 100 * s[key]


def _new(title: str, ylabel: str, runs: list[dict]) -> tuple[Figure, object]:
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    J = max((len(r["stages"]) for r in runs), default=0)
    ax.set(title=title, xlabel="stage j", ylabel=ylabel, xticks=list(range(J)))
    ax.grid(alpha=0.3)
    return fig, ax


def _finish(fig: Figure, ax, path: Path, drawn: bool, style_handles: list | None = None) -> None:
    if not drawn:
        ax.text(0.5, 0.5, "not recorded in any run", transform=ax.transAxes, ha="center", va="center", color="gray")
    else:
        runs_legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="run")
        if style_handles:
            ax.add_artist(runs_legend)
            ax.legend(handles=style_handles, loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _has(ys: np.ndarray) -> bool:
    return bool(np.isfinite(ys).any())


def plot_accuracy(runs: list[dict], path: Path) -> None:
    """Per-stage train (eval mode where recorded, else running) / val / test accuracy of the auxiliary heads;
    the end-to-end test accuracy as a horizontal line in the run's colour."""
    fig, ax = _new("Auxiliary-head accuracy by stage", "accuracy (%)", runs)
    drawn = False
    styles = {"train": ":", "val": "--", "test": "-"}
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        eval_mode = any(s.get("train_eval_acc") is not None for s in run["stages"])
        curves = {"train": _pct("train_eval_acc" if eval_mode else "train_acc"), "val": _pct("val_acc"),
                  "test": _pct("test_acc")}
        labelled = False
        for name, get in curves.items():
            xs, ys = _series(run, get)
            if _has(ys):
                ax.plot(xs, ys, styles[name], marker="o", color=colour, label=None if labelled else run["label"])
                labelled = drawn = True
        e2e = run.get("e2e") or {}
        if e2e.get("test_acc") is not None:
            ax.axhline(100 * e2e["test_acc"], color=colour, linestyle="-.", alpha=0.8,
                       label=None if labelled else run["label"])
            drawn = True
    handles = [Line2D([], [], color="k", linestyle=st, label=name) for name, st in styles.items()]
    handles.append(Line2D([], [], color="k", linestyle="-.", label="end to end (test)"))
    _finish(fig, ax, path, drawn, handles)


def plot_probes(runs: list[dict], path: Path) -> None:
    """Linear-probe test accuracy by depth: greedy solid, end to end dashed; GAP circles, 2x2 squares."""
    fig, ax = _new("Linear-probe test accuracy by depth", "probe test accuracy (%)", runs)
    drawn = False
    for i, run in enumerate(runs):
        labelled = False
        for net, style in (("greedy", "-"), ("e2e", "--")):
            for pool, marker in (("gap", "o"), ("2x2", "s")):
                xs, ys = _series(run, _probe(net, pool))
                if _has(ys):
                    ax.plot(xs, ys, style, marker=marker, color=f"C{i % 10}", alpha=1.0 if pool == "gap" else 0.6,
                            label=None if labelled else run["label"])
                    labelled = drawn = True
    handles = [Line2D([], [], color="k", linestyle="-", label="greedy"),
               Line2D([], [], color="k", linestyle="--", label="end to end"),
               Line2D([], [], color="k", marker="o", linestyle="", label="global average pool"),
               Line2D([], [], color="k", marker="s", linestyle="", label="2x2 pool")]
    _finish(fig, ax, path, drawn, handles)


def plot_gap(runs: list[dict], path: Path) -> None:
    """Generalisation gap (train in eval mode - val) of the auxiliary heads by depth."""
    fig, ax = _new("Generalisation gap by depth", "train - val accuracy (points)", runs)
    drawn = False
    for i, run in enumerate(runs):
        xs, ys = _series(run, _pct("gap"))
        if _has(ys):
            ax.plot(xs, ys, "-", marker="o", color=f"C{i % 10}", label=run["label"])
            drawn = True
    _finish(fig, ax, path, drawn)


def plot_cka(runs: list[dict], path: Path) -> None:
    """Linear CKA between greedy and end-to-end features at each stage boundary."""
    fig, ax = _new("Greedy vs end-to-end linear CKA by depth", "linear CKA", runs)
    ax.set_ylim(0, 1.05)
    drawn = False
    for i, run in enumerate(runs):
        xs, ys = _series(run, lambda s: s.get("cka"))
        if _has(ys):
            ax.plot(xs, ys, "-", marker="o", color=f"C{i % 10}", label=run["label"])
            drawn = True
    _finish(fig, ax, path, drawn)


PLOTS = {"accuracy": plot_accuracy, "probes": plot_probes, "gap": plot_gap, "cka": plot_cka}


def _write(plots: dict, data: list[dict], out: Path) -> dict[str, str]:
    written = {}
    for name, draw in plots.items():
        draw(data, out / f"{name}.png")
        written[name] = f"{name}.png"
    return written


def write_plots(runs: list[dict], out: Path) -> dict[str, str]:
    """Write every plot in PLOTS as out/<name>.png (a plot no run has data for says so); name -> file name."""
    return _write(PLOTS, runs, out)


# -- seeds aggregated: means with their 95% intervals as bands (report.json's "groups") -------------------------
def _band(ax, group: dict, metric: str, colour: str, style: str, scale: float, label: str | None) -> bool:
    """The mean of `metric` by stage as a line, its interval as a band; whether anything was drawn."""
    xs, mean, low, high = [], [], [], []
    for s in group["stages"]:
        v = s.get(metric) or {}
        xs.append(s["stage"])
        mean.append(np.nan if v.get("mean") is None else scale * v["mean"])
        low.append(np.nan if v.get("low") is None else scale * v["low"])
        high.append(np.nan if v.get("high") is None else scale * v["high"])
    mean = np.array(mean, dtype=float)
    if not _has(mean):
        return False
    ax.plot(xs, mean, style, marker="o", color=colour, label=label)
    ax.fill_between(xs, np.array(low, dtype=float), np.array(high, dtype=float), color=colour, alpha=0.15, linewidth=0)
    return True


def _group_plot(groups: list[dict], path: Path, title: str, ylabel: str, curves: dict, scale: float = 100.0,
                e2e: bool = False, ylim=None) -> None:
    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    J = max((len(g["stages"]) for g in groups), default=0)
    ax.set(title=title + " (mean, 95% interval over seeds)", xlabel="stage j", ylabel=ylabel, xticks=list(range(J)))
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    drawn = False
    for i, g in enumerate(groups):
        colour = f"C{i % 10}"
        labelled = False
        for metric, style in curves.items():
            if _band(ax, g, metric, colour, style, scale, None if labelled else g["label"]):
                labelled = drawn = True
        s = (g.get("summaries") or {}).get("e2e")
        if e2e and s and s.get("mean") is not None:
            ax.axhline(100 * s["mean"], color=colour, linestyle="-.", alpha=0.8, label=None if labelled else g["label"])
            if s.get("half") is not None:
                ax.axhspan(100 * s["low"], 100 * s["high"], color=colour, alpha=0.08)
            drawn = True
    handles = [Line2D([], [], color="k", linestyle=st, label=m) for m, st in curves.items()] if len(curves) > 1 else []
    if e2e:
        handles.append(Line2D([], [], color="k", linestyle="-.", label="end to end (test)"))
    _finish(fig, ax, path, drawn, handles)


GROUP_PLOTS = {
    "accuracy": lambda g, p: _group_plot(g, p, "Auxiliary-head accuracy by stage", "accuracy (%)",
                                         {"test_acc": "-", "val_acc": "--"}, e2e=True),
    "probes": lambda g, p: _group_plot(g, p, "Linear-probe test accuracy by depth", "probe test accuracy (%)",
                                       {"probe_greedy_gap": "-", "probe_e2e_gap": "--"}),
    "gap": lambda g, p: _group_plot(g, p, "Generalisation gap by depth", "train - val accuracy (points)", {"gap": "-"}),
    "cka": lambda g, p: _group_plot(g, p, "Greedy vs end-to-end linear CKA by depth", "linear CKA", {"cka": "-"},
                                    scale=1.0, ylim=(0, 1.05)),
}


def write_group_plots(groups: list[dict], out: Path) -> dict[str, str]:
    """Every plot in GROUP_PLOTS as out/<name>.png, one colour per setting; name -> file name."""
    return _write(GROUP_PLOTS, groups, out)
