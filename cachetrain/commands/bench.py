"""`bench`: greedy-cached vs greedy-recompute vs end to end, side by side (cachetrain.bench.compare)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cachetrain.commands.base import Command, Invocation


def bench(inv: Invocation) -> int:
    from cachetrain.bench.compare import run_bench

    out = Path(inv.args.out or f"bench/{inv.cfg.name}")
    run_bench(inv.cfg, out, inv.console, quick=inv.args.quick)
    inv.console.print((out / "results.md").read_text() + f"\nwrote {out}/results.json, results.md, accuracy.png, "
                                                         f"memory.png, throughput.png")
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small subsets and one epoch per stage (a smoke test)")
    p.add_argument("--out", help="output folder (default: bench/<config name>)")


COMMANDS = [Command("bench", "greedy-cached vs greedy-recompute vs end-to-end: time, memory, accuracy, plots", bench,
                    arguments=_arguments)]
