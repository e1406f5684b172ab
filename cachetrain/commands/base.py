"""What every command is: an entry of the command table (`Command`), and what it is handed (`Invocation`).

A command is a name, a help line, the run access it needs (cachetrain.run.Access; None: it opens no run),
whether torchrun may run it, the arguments it adds to the parser, the checks its arguments need against
the run (before anything is touched), and the function that does its work. cachetrain.cli builds the
parser from the table, opens the run as the entry says, calls the function and turns errors into lines.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rich.console import Console

from cachetrain.config import Config, K_RANGE
from cachetrain.dist import Dist
from cachetrain.errors import ConfigError, Fix
from cachetrain.run import Access, Run


@dataclass
class Invocation:
    """One command as run: its parsed arguments, its config and opened run (None for commands that open
    none), the console, this process's place in a torchrun job, and `spell`, which turns a Fix into the
    command line to suggest (with the options that name this run)."""

    args: argparse.Namespace
    cfg: Config | None
    run: Run | None
    console: Console
    dist: Dist
    spell: Callable[[Fix], str]

    def say(self, text: str) -> None:
        """A plain line (no rich markup or highlighting: paths and commands print as they are)."""
        self.console.print(text, markup=False, highlight=False)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    work: Callable[[Invocation], int]
    access: Access | None = None  # None: no run is opened (the command reads or writes run folders itself)
    config: bool = True  # takes --config / --run / --set
    torchrun: bool = False  # may run under torchrun, every rank together
    from_stage: bool = False  # takes --from-stage J (a changed config, retrained from stage J)
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    check: Callable[[argparse.Namespace, Run], None] | None = None  # against the run, before anything is touched
    description: str = ""


def stage_checks(args: argparse.Namespace, command: Command) -> Iterable[Callable[[Run], None]]:
    """The checks Run.open runs first: every stage index and k the command takes, against this run, then the
    command's own."""

    def ranges(run: Run) -> None:
        last = run.depth - 1
        if getattr(args, "k", None) is not None and not K_RANGE[0] <= args.k <= K_RANGE[1]:
            raise ConfigError(f"--k {args.k}: expected an auxiliary depth in [{K_RANGE[0]}, {K_RANGE[1]}] (as "
                              f"model.k)")
        for option in ("j", "from_stage"):
            value = getattr(args, option, None)
            if value is not None and not 0 <= value <= last:
                raise ConfigError(f"--{option.replace('_', '-')} {value}: expected a stage index in [0, {last}] "
                                  f"(model.stages is {run.depth})")

    yield ranges
    if command.check is not None:
        yield lambda run: command.check(args, run)
