"""What the user sees: a live progress bar per epoch or caching pass, and the per-stage table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class StageProgress:
    """A rich progress bar with live loss and samples/s; silent when the output is not a terminal."""

    def __init__(self, console: Console, description: str, total: int):
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=console, disable=not console.is_terminal, transient=True)
        self._task = self._progress.add_task(description, total=total, info="")

    def __enter__(self) -> StageProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, stats) -> None:
        """Per training step: stats is the running EpochStats."""
        self._progress.update(self._task, advance=1,
                              info=f"loss {stats.loss:.3f}  {stats.samples_per_s:,.0f} samples/s")

    def advance(self, n: int) -> None:
        self._progress.update(self._task, advance=n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _size(n: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def status_table(rows, title: str = "stages") -> Table:
    table = Table(title=title)
    for col in ("j", "k", "state", "epochs", "train acc", "test acc", "cache", "size", "ratio"):
        table.add_column(col, justify="right" if col not in ("state", "cache") else "left")
    for r in rows:
        ratio = f"{r.raw_bytes / r.cache_bytes:.2f}x" if r.cache_bytes and r.raw_bytes else "-"
        epochs = f"{r.epochs_done}/{r.epochs}" + (f" +{r.batch} batches" if r.batch else "")
        cache = r.cache.value if r.cache else "not cached"
        if r.chunks_missing:
            cache += f" ({r.chunks_missing} chunks {'lost' if r.cache.value == 'damaged' else 'left'})"
        table.add_row(str(r.j), str(r.k or "-"), r.state.value, epochs, _pct(r.train_acc),
                      _pct(r.test_acc), cache,
                      _size(r.cache_bytes) if r.cache_bytes else "-", ratio)
    return table


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds:,.0f} s"


def _rate(n: float | None) -> str:
    """Bytes/s in decimal units, three significant digits: '4.34 GB/s' (disks and networks are sold so)."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}/s"
        n /= 1000
    return f"{n:.3g} TB/s"


def plan_table(plan: dict, title: str) -> Table:
    """Per stage: output shape, store size per storage format, FLOPs, and where its input comes from; in
    seconds also what its input cache must deliver, where its own cache would be read from at what rate, and
    the break-even read rate above which caching it pays. The caption: totals, then the plan's notes."""
    table = Table(title=title)
    formats = list(plan["stages"][0]["store_bytes"]) if plan["stages"] else []  # every format the planner knows
    rates = plan["cost_unit"] != "FLOP"  # measured rates: what each stage must read its input cache at
    timed_cols = ["input read/s needed", "its cache read from", "at", "break-even"] if rates else []
    for col in ("j", "output", "bytes/sample", *(f"{d} store" for d in formats), "GFLOP/sample",
                "cached", "input of stage j", *timed_cols):
        table.add_column(col, justify="left" if col in ("output", "input of stage j", "its cache read from")
                         else "right")
    dtype = plan["dtype"]
    for s in plan["stages"]:
        through = s["recompute_through"]
        span = "" if not through else f"{through[0]}" if len(through) == 1 else f"{through[0]}..{through[-1]}"
        source = s["input"] + (f" + recompute {span}" if through else "")
        stored = s.get("stored_bytes_per_sample", s["sample_bytes"][dtype])
        per_sample = _size(s["sample_bytes"][dtype]) + \
            (f" ({_size(stored)} zstd)" if stored < s["sample_bytes"][dtype] else "")
        timed = []
        if rates:
            timed.append(_rate(s.get("input_bytes_per_s")))
            if "tier" in s:
                first, later = s["tier_first_read_bytes_per_s"], s["tier_read_bytes_per_s"]
                at = _rate(later) if first == later else f"{_rate(first)}, then {_rate(later)}"
                even = "never" if s["never_pays"] else _rate(s["break_even_read_bytes_per_s"])
                timed += [s["tier"], at, even]
            else:
                timed += ["-", "-", "-"]
        table.add_row(str(s["stage"]), "x".join(map(str, s["out_shape"])), per_sample,
                      *(_size(s["store_bytes"][d]) for d in formats), f"{s['forward_flops'] / 1e9:.2f}",
                      "yes" if s["cached"] else "-", source, *timed)
    if plan["cost_unit"] == "FLOP":
        cost = (f"recompute + caching {plan['cost_plan'] / 1e15:,.1f} PFLOP vs "
                f"{plan['cost_recompute_everything'] / 1e15:,.1f} PFLOP recomputing everything "
                f"(saves {plan['cost_saved'] / 1e15:,.1f}); whole run incl. training")
    else:
        r = plan["rates"]
        compute = "measured stage times" if r.get("stage_seconds") else f"{r['flops_per_s'] / 1e12:,.0f} TFLOP/s"
        cost = (f"at {compute}, reads {_size(r['read_bytes_per_s'])}/s, writes "
                f"{_size(r['write_bytes_per_s'])}/s: {_duration(plan['cost_plan'])} vs "
                f"{_duration(plan['cost_recompute_everything'])} recomputing everything; whole run")
    lines = [f"cache {plan['cached'] or 'nothing'}: {_size(plan['disk_bytes'])} on disk (raw); {cost} "
             f"{100 * plan['total_vs_recompute_everything']:.0f}% of the recompute-everything run"]
    if rates and any("tier" in s for s in plan["stages"]):
        lines.append("break-even: the read rate of a stage's cache above which caching it beats recomputing its "
                     "outputs, the rest of the plan as it is")
    table.caption = "\n".join([*lines, *plan.get("notes", [])])
    return table


def memory_fit_table(mem: dict, title: str, times: dict | None = None, note: str = "") -> Table:
    """Per unit (each greedy stage, end to end) and memory variant: the peak of a training step at the
    batch and the largest batch within the budget (cachetrain.plan.memory.memory_table's result); the
    caption says where the figures come from, what each option costs in step time (`times`:
    step_time_ratios' result) and how greedy compares with end to end."""
    table = Table(title=title)
    table.add_column("unit")
    table.add_column("input", justify="left")
    names = [v["name"] for v in mem["variants"]]
    short = {"plain": "plain", "in-place ReLU": "in-place", "+ checkpointing": "+ckpt", "+ sr head": "+sr"}
    for name in names:
        mark = "*" if name in mem["configured"] else ""
        table.add_column(f"{short.get(name, name)}{mark}\npeak", justify="right")
        table.add_column("max\nbatch", justify="right")
    budget = mem["budget_bytes"]
    for r in mem["units"]:
        cells = []
        for name in names:
            c = r["variants"][name]
            cells += [_size(c["peak_bytes"]) + ("" if c["fits"] else " !"), f"{c['largest_batch']:,}"]
        table.add_row(r["unit"], "x".join(map(str, r["in_shape"])), *cells)
    lo, hi = mem["live_over_count"] or (0, 0)
    if mem["regime"] == "cuda_peak":
        clo, chi = mem.get("cuda_over_live") or (0, 0)
        source = (f"CUDA allocator peak over 3 real steps ({mem['precision']}); it was {clo:.2f}-{chi:.2f}x the "
                  f"live-tensor peak counted on the CPU, which was {lo:.2f}-{hi:.2f}x the saved-tensor count")
    else:
        source = (f"CPU count, {mem['precision']}, on fake tensors (nothing allocated): the live-tensor peak of "
                  f"one steady-state step; the saved-tensor count (saved + parameters + gradients + "
                  f"{mem['optimizer']} state + input) is {1 / hi:.2f}-{1 / lo:.2f}x of it")
    lines = [f"batch {mem['batch']:,}, budget {_size(budget)} (! = over it, * = configured); variants add one option "
             f"each: in-place ReLU, checkpointing (train.checkpoint_activations), sr head (model.aux); {source}{note}"]
    for name in names:
        s = mem["summary"][name]
        lines.append(f"{name}: largest stage ({s['largest_stage']}) / end to end = {s['largest_stage_over_e2e']:.2f} "
                     f"(count: {s['largest_stage_over_e2e_count']:.2f}); largest batch greedy "
                     f"{s['largest_batch_greedy']:,} vs end to end {s['largest_batch_e2e']:,}")
    if times:
        cost = ", ".join(f"{n} {r:.2f}x" for n, r in list(times["over_previous"].items())[1:])
        lines.append(f"step time of {times['unit']} vs the variant before, measured side by side on the CPU (one "
                     f"thread's CPU seconds) at a {'x'.join(map(str, times['in_shape']))} input, width "
                     f"{times['width']}, batch {times['batch']}: {cost}")
    table.caption = "\n".join(lines)
    return table
