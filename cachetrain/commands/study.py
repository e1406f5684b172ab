"""The commands of the layerwise study: probe, report, fork."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING
from pathlib import Path

from cachetrain.commands.base import Command, Invocation
from cachetrain.errors import Fix, StageError
from cachetrain.run import Access, StageState
from cachetrain.train.greedy import Greedy

if TYPE_CHECKING:
    from cachetrain.train.diagnostics import Diagnostics


def probe(inv: Invocation) -> int:
    """The probes each trained stage lacks (or stage --j's again), then the end-to-end network's probes and
    greedy-vs-e2e CKA once it is trained."""
    from cachetrain.train.diagnostics import Diagnostics

    diag, j = Diagnostics(Greedy(inv.run)), inv.args.j
    if j is not None:
        state = inv.run.state.stage_state(j)
        if state is not StageState.TRAINED:
            raise StageError(f"--j {j}: stage {j} is {state.value}", Fix.of("stage", j=j))
        diag.probe_stage(j)
        return 0
    for i in diag.missing_stages():
        diag.probe_stage(i)
    probe_e2e(inv, diag)
    return 0


def probe_e2e(inv: Invocation, diag: Diagnostics) -> None:
    """The end-to-end network's probes and CKA, where they are missing for its weights."""
    if not diag.catch_up_e2e():
        inv.say(f"no trained end-to-end network: its probes and CKA come after: {inv.spell(Fix.of('e2e'))}")


def report(inv: Invocation) -> int:
    from cachetrain.study.report import write_report

    args = inv.args
    runs = [Path(args.run), *map(Path, args.vs)]
    out = Path(args.out or Path(args.run) / "report")
    write_report(runs, out, delta=args.delta)
    inv.say((out / "report.md").read_text())
    inv.say(f"wrote {out}/report.md, report.json and the plots")
    return 0


def fork(inv: Invocation) -> int:
    from cachetrain.train.fork import fork_run

    args = inv.args
    fork_run(Path(args.run), args.at, Path(args.to), args.set, inv.console)
    inv.say(f"next: {inv.spell(Fix.of('train', run=Path(args.to)))}")
    return 0


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--j", type=int, help="only this stage (its probes are fitted again)")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the run to report")
    p.add_argument("--vs", nargs="+", default=[], metavar="RUN", help="runs to overlay on the same plots")
    p.add_argument("--delta", type=float, default=0.3,
                   help="critical layer: validation gains below this many points per stage (default 0.3)")
    p.add_argument("--out", help="output folder (default: <run>/report)")


def _fork_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the run to fork")
    p.add_argument("--at", type=int, required=True, metavar="J", help="the first stage the new run trains")
    p.add_argument("--to", required=True, help="the new run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config change for stages J.. (repeatable), e.g. --set stages.3.lr=0.01")


COMMANDS = [
    Command("probe", "fit the linear probes each trained stage lacks, and the end-to-end network's probes and "
                     "greedy-vs-e2e CKA once it is trained; written to <run>/probes.jsonl and cka.jsonl", probe,
            Access.WRITE, arguments=_probe_arguments),
    Command("report", "markdown + JSON report and plots of one or more runs", report, config=False,
            arguments=_report_arguments,
            description="per-stage train/val/test accuracy, probes, gap and CKA by depth, and the critical layer, "
                        "for a run and the runs it is compared with (--vs)"),
    Command("fork", "a new run reusing another run's stages 0..J-1 and their caches (hard links)", fork,
            config=False, arguments=_fork_arguments,
            description="make run --to from run --run: stages 0..J-1 and their caches are reused without copying; "
                        "stages J.. train with the --set changes"),
]
