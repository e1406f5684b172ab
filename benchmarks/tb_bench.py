"""What writing TensorBoard events (cachetrain.run.events) costs an epoch: the same epoch with and without.

Each round trains stage 0 of a config for one epoch from scratch (`cachetrain.train.unit.train_unit`: the
steps, the per-epoch evaluation, the checkpoints) twice in fresh run folders, once writing the run's
curves and once with them off (the run's events as on a rank that does not write), the arm that goes
first alternating by round. Two figures per round:

- `epoch_s`: the epoch's wall seconds in each arm (`train_unit` whole). Their ratio is noisy on a shared
  machine (a 1% effect needs many rounds), so also:
- `events_s`: the seconds spent inside the event calls themselves during the "on" arm (step rows, the
  epoch row, the flushes before checkpoints, closing, the by-stage summary), timed around each call;
  `events_pct`: that over the "on" epoch.

It prints one line per round and a summary, and saves OUT/results.json, OUT/results.md. The default epoch
is a 10,000-image subset of Fashion-MNIST: step rows are ~100 per epoch whatever its length, so a shorter
epoch is the harder case for the 1% budget.

    python benchmarks/tb_bench.py [--config fmnist] [--rounds 3] [--train-subset 10000]
                                  [--checkpoint-steps 0] [--out bench/tb] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import functools
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cachetrain.bench.tools import save_results
from cachetrain.config import load_config
from cachetrain.run import Run
from cachetrain.run.events import RunEvents, UnitCurves
from cachetrain.train.inputs import StageInputs
from cachetrain.train.unit import Stage, train_unit

TIMED = [(UnitCurves, ("step", "epoch", "flush", "close")), (RunEvents, ("unit_finished",))]


class EventTimer:
    """Seconds spent inside the event calls while installed (the calls' own wall time)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self.by_call: dict[str, float] = {}  # seconds per method ("UnitCurves.step", ...)
        self.saved = []

    def __enter__(self) -> EventTimer:
        for cls, names in TIMED:
            for name in names:
                original = getattr(cls, name)
                self.saved.append((cls, name, original))
                setattr(cls, name, self.wrap(original))
        return self

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                self.seconds += seconds
                self.calls += 1
                self.by_call[fn.__qualname__] = self.by_call.get(fn.__qualname__, 0.0) + seconds
        return timed

    def __exit__(self, *exc) -> None:
        for cls, name, original in self.saved:
            setattr(cls, name, original)


def one_epoch(cfg_path: str, overrides: list[str], run_dir: Path, events: bool) -> tuple[float, EventTimer, int]:
    """(epoch seconds, the event calls' timer, event file bytes) of stage 0 trained for one epoch in a fresh
    `run_dir`."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(cfg_path, [*overrides, f"run_dir={run_dir}", "train.epochs=1", "train.probes=false"])
    from rich.console import Console

    run = Run(cfg, console=Console(quiet=True))
    if not events:  # as on a rank that does not write: every call returns at once
        run.events = RunEvents(run.layout, cfg, run.records, writer=False, say=print)
    run.data  # open the dataset before the clock starts (both arms alike)
    stage = Stage(run, StageInputs(run), 0)
    with EventTimer() as timer:
        t0 = time.perf_counter()
        train_unit(run, stage)
        seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in run.layout.tb.glob("events.out.tfevents.*")) if events else 0
    return seconds, timer, size


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="fmnist")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=10_000, help="training images (0: all)")
    p.add_argument("--checkpoint-steps", type=int, default=0, help="train.checkpoint_steps (each flushes events)")
    p.add_argument("--out", default="bench/tb")
    p.add_argument("--set", action="append", default=[], help="config overrides, KEY=VALUE")
    args = p.parse_args(argv)
    overrides = [f"data.train_subset={args.train_subset}", f"train.checkpoint_steps={args.checkpoint_steps}",
                 *args.set]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one_epoch(args.config, overrides, Path(tmp) / "warmup", True)  # imports, dataset unpacking, allocator
        for r in range(args.rounds):
            arms = ["on", "off"] if r % 2 == 0 else ["off", "on"]
            got = {arm: one_epoch(args.config, overrides, Path(tmp) / arm, arm == "on") for arm in arms}
            (on_s, timer, size), off_s = got["on"], got["off"][0]
            row = {"round": r, "first": arms[0], "epoch_on_s": on_s, "epoch_off_s": off_s, "events_s": timer.seconds,
                   "event_calls": timer.calls, "event_bytes": size, "events_pct": 100 * timer.seconds / on_s,
                   "on_over_off": on_s / off_s, "events_s_by_call": timer.by_call}
            rows.append(row)
            split = ", ".join(f"{name} {1000 * s:.1f}" for name, s in sorted(timer.by_call.items()))
            print(f"round {r} ({arms[0]} first): epoch {on_s:.2f} s with events, {off_s:.2f} s without "
                  f"(x{row['on_over_off']:.3f}); inside {timer.calls} event calls {1000 * timer.seconds:.1f} ms = "
                  f"{row['events_pct']:.3f}% of the epoch ({split} ms); {size / 1024:.1f} KiB of events", flush=True)
    median = {key: float(np.median([row[key] for row in rows]))
              for key in ("epoch_on_s", "epoch_off_s", "events_s", "events_pct", "on_over_off")}
    summary = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, Python "
                          f"{platform.python_version()}, torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d"), "config": args.config, "overrides": overrides,
               "rounds": rows, "median": median}
    lines = ["| round | first | epoch with events (s) | without (s) | with / without | inside events (ms) | "
             "% of the epoch |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {row['round']} | {row['first']} | {row['epoch_on_s']:.2f} | {row['epoch_off_s']:.2f} | "
              f"{row['on_over_off']:.3f} | {1000 * row['events_s']:.1f} | {row['events_pct']:.3f} |" for row in rows]
    lines += [f"| median | | {median['epoch_on_s']:.2f} | {median['epoch_off_s']:.2f} | {median['on_over_off']:.3f} | "
              f"{1000 * median['events_s']:.1f} | {median['events_pct']:.3f} |", "",
              "inside events, median ms per epoch by call: " + ", ".join(
                  f"{name} {1000 * float(np.median([row['events_s_by_call'].get(name, 0.0) for row in rows])):.1f}"
                  for name in sorted({n for row in rows for n in row["events_s_by_call"]})),
              "", f"{args.config} {' '.join(overrides)}, stage 0, one epoch; {summary['machine']}"]
    return save_results(out, summary, lines)


if __name__ == "__main__":
    main()
