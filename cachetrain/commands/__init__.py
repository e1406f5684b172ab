"""The command table: every `cachetrain` command, in the order `--help` lists them.

Each entry (cachetrain.commands.base.Command) says what run access the command needs, whether torchrun
may run it, its arguments and the function that does its work; cachetrain.cli parses, looks the command
up here, opens the run (cachetrain.run.Run.open), runs it, and turns errors into one line. Suggested
commands (cachetrain.errors.Fix) name entries of this table, and only the CLI spells them.

    module       commands
    training.py  train, stage, cache, e2e
    inspect.py   verify, status, eval
    planning.py  plan
    study.py     probe, report, fork
    sweep.py     sweep
    bench.py     bench
"""

from cachetrain.commands import bench, inspect, planning, study, sweep, training
from cachetrain.commands.base import Command, Invocation

COMMANDS: dict[str, Command] = {c.name: c for module in (training, inspect, planning, study, sweep, bench)
                                for c in module.COMMANDS}

__all__ = ["COMMANDS", "Command", "Invocation"]
