"""`sweep`: a grid of runs from one base config, seeds included, sharing the stages they have in common
(cachetrain.sweep), then `report` over all of them."""

from __future__ import annotations

import argparse
from pathlib import Path

from cachetrain.commands.base import Command, Invocation
from cachetrain.errors import ConfigError


def sweep(inv: Invocation) -> int:
    from cachetrain.sweep.runner import Sweep
    from cachetrain.sweep.spec import make_spec

    args = inv.args
    if not args.config:
        raise ConfigError("--config: required (the base config every run of the sweep starts from)")
    spec = make_spec(args.config, args.set, args.grid, args.grids, args.seeds, args.e2e)
    out = Path(args.out or f"sweeps/{spec.base().name}")
    s = Sweep(spec, out, inv.console)
    if args.plan:
        s.check_folder()
        for line in s.plan_lines():
            inv.say(line)
        return 0
    result = s.run(report=not args.no_report)
    if "report" in result:
        inv.say(f"wrote {result['report']}/report.md, report.json and the plots")
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the base config (YAML) every run starts from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a change to the base config for every run (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values of a config key; several --grid options make a product (repeatable), e.g. "
                        "--grid model.k=1,2,3 --grid stages.3.lr=0.05,0.1")
    p.add_argument("--grids", metavar="FILE", help="a YAML list of grids whose runs are joined (cachetrain.sweep.spec)")
    p.add_argument("--seeds", type=int, default=1, help="runs per point: seed i sets train.seed and data.split_seed "
                                                        "to the base's + i (default 1)")
    p.add_argument("--e2e", action="store_true", help="train the end-to-end baseline of every run too")
    p.add_argument("--out", help="the sweep's folder (default: sweeps/<config name>)")
    p.add_argument("--plan", action="store_true", help="print the plan (runs, forks, stage trainings and caching "
                                                       "passes with and without sharing) and stop")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")


COMMANDS = [
    Command("sweep", "train a grid of runs x seeds, sharing the stages runs have in common; then report", sweep,
            config=False, arguments=_arguments,
            description="runs of a grid that agree on everything stages 0..j-1 depend on (seed included) train "
                        "those stages once: the others fork there (hard links). Prints the plan first; rerun "
                        "the same command to resume."),
]
