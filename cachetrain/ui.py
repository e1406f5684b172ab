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
        table.add_row(str(r.j), str(r.k or "-"), r.state, epochs, _pct(r.train_acc),
                      _pct(r.test_acc), cache,
                      _size(r.cache_bytes) if r.cache_bytes else "-", ratio)
    return table


def plan_table(plan: dict, title: str) -> Table:
    """Per stage: output shape, store size per dtype, FLOPs, and where its input comes from."""
    table = Table(title=title)
    for col in ("j", "output", "bytes/sample", "fp32 store", "fp16 store", "uint8 store", "GFLOP/sample",
                "cached", "input of stage j"):
        table.add_column(col, justify="left" if col in ("output", "input of stage j") else "right")
    for s in plan["stages"]:
        through = s["recompute_through"]
        span = "" if not through else f"{through[0]}" if len(through) == 1 else f"{through[0]}..{through[-1]}"
        source = s["input"] + (f" + recompute {span}" if through else "")
        table.add_row(str(s["stage"]), "x".join(map(str, s["out_shape"])), _size(s["sample_bytes"][plan["dtype"]]),
                      _size(s["store_bytes"]["float32"]), _size(s["store_bytes"]["float16"]),
                      _size(s["store_bytes"]["uint8"]), f"{s['forward_flops'] / 1e9:.2f}",
                      "yes" if s["cached"] else "-", source)
    if plan["cost_unit"] == "FLOP":
        cost = (f"recompute + caching {plan['cost_plan'] / 1e15:,.1f} PFLOP vs "
                f"{plan['cost_recompute_everything'] / 1e15:,.1f} PFLOP recomputing everything "
                f"(saves {plan['cost_saved'] / 1e15:,.1f}); whole run incl. training")
    else:
        r = plan["rates"]
        cost = (f"at {r['flops_per_s'] / 1e12:,.0f} TFLOP/s, reads {_size(r['read_bytes_per_s'])}/s, writes "
                f"{_size(r['write_bytes_per_s'])}/s: {plan['cost_plan'] / 3600:,.1f} h vs "
                f"{plan['cost_recompute_everything'] / 3600:,.1f} h recomputing everything; whole run")
    table.caption = (f"cache {plan['cached'] or 'nothing'}: {_size(plan['disk_bytes'])} on disk; {cost} "
                     f"{100 * plan['total_vs_recompute_everything']:.0f}% of the recompute-everything run")
    return table
