"""`cachetrain` command line: parse, look the command up in the table, open the run, run it, and turn
errors into one line.

Every command is an entry of cachetrain.commands.COMMANDS. Commands that take a config take
`--config FILE` (YAML, or a built-in config's name: `cachetrain configs`) or `--run DIR` (an existing run, which remembers its config) and
any number of `--set section.key=value`. Errors the user can fix are printed as one line and exit with
status 2; a suggested command (cachetrain.errors.Fix) is spelled here, with the options that name the
user's run, so it pastes back as it stands.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

from rich.console import Console

from cachetrain import __version__
from cachetrain import configs as builtin_configs
from cachetrain.cache.location import RemotePath, is_transport_error, transport_failure
from cachetrain.commands import COMMANDS, Command, Invocation
from cachetrain.commands.base import stage_checks
from cachetrain.config import Config, load_config
from cachetrain.dist import Dist, lost_peer
from cachetrain.errors import ConfigError, Fix, UserError, one_line
from cachetrain.redact import redact
from cachetrain.run import Run, RunLayout
from cachetrain.stop import Interrupted, Stopped, raise_interrupted


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachetrain", description="Greedy layerwise CNN training on cached features.",
                                epilog=f"built-in configs (--config NAME): {', '.join(builtin_configs.names())}")
    p.add_argument("--version", action="version", version=f"cachetrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        c = sub.add_parser(command.name, help=command.help, description=command.description or command.help)
        if command.config:
            c.add_argument("--config", help="YAML config file, or a built-in config's name (cachetrain configs)")
            c.add_argument("--run", help="run directory (default: the config's run_dir, else runs/<config name>)")
            c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config key, e.g. --set train.epochs=3 (repeatable)")
        if command.from_stage:
            c.add_argument("--from-stage", type=int, metavar="J", dest="from_stage",
                           help="accept a config that differs from the run's: stages J and later are retrained "
                                "with it, the change is recorded in the run's history")
        command.arguments(c)
    return p


def _config(args: argparse.Namespace) -> tuple[Config, list[str]]:
    """The resolved config, and the options that name this run, to repeat in the commands we suggest."""
    path = args.config
    if path is None and args.run:
        path = Path(args.run) / "config.yaml"  # a run directory remembers its resolved config
    if path is None:
        raise ConfigError("--config: required (or --run DIR of an existing run)")
    overrides = list(args.set) + ([f"run_dir={args.run}"] if args.run else [])
    named = ([f"--config {shlex.quote(args.config)}"] if args.config else []) + \
        ([f"--run {shlex.quote(args.run)}"] if args.run else []) + [f"--set {shlex.quote(a)}" for a in args.set]
    return load_config(path, overrides), named


def spell(fix: Fix, named: list[str]) -> str:
    """A suggested command as the user would type it: the table's command, the options that name the run
    (`named`, or `--run` of the run the fix is for), then the fix's own options."""
    if fix.command not in COMMANDS:  # a Fix names the table's commands only (tests/test_layers.py)
        raise ValueError(f"no command {fix.command!r} to suggest")
    command, *options = fix.words()
    run = [f"--run {shlex.quote(str(fix.run))}"] if fix.run is not None else named
    if not COMMANDS[fix.command].config:
        run = []  # `configs` names no run
    return " ".join(["cachetrain", command, *run, *options])


def _refuse_torchrun(command: Command) -> None:
    """A command that runs in one process, started under torchrun (WORLD_SIZE > 1), is refused on every
    rank before it does anything: N copies of `fork` or `report` would race on the same files."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not command.torchrun:
        allowed = [c.name for c in COMMANDS.values() if c.torchrun]
        raise ConfigError(f"torchrun: the {command.name} command runs in one process; expected it without torchrun, "
                          f"which runs only {', '.join(allowed[:-1])} and {allowed[-1]}")


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    command = COMMANDS[args.command]
    # a failed zarr write (a full disk) fails its sibling chunk writes too; the first error reaches us
    # and is reported in one line, and asyncio would log each of the others as "Task exception was
    # never retrieved" with a traceback, whenever the garbage collector meets it
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # not a terminal (CI logs, pipes): a fixed wide console, so tables do not wrap at 80 columns
    console = console or Console(width=None if sys.stdout.isatty() else 120, soft_wrap=True)
    cfg, named, dist = None, [], Dist()

    def spelled(fix: Fix) -> str:
        return spell(fix, named)

    # SIGTERM ends the command as Ctrl-C does, with one line; a loop that can stop cleanly takes both
    # signals over meanwhile (cachetrain.stop)
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        _refuse_torchrun(command)  # before any command's work, report's and fork's included
        if command.config:
            cfg, named = _config(args)
            from cachetrain.device import resolve_device
            dist = Dist.from_env(resolve_device(cfg.train.device).type)  # joins torchrun's process group
            if not dist.writer:  # rank 0 reports; the others print only their errors
                console = Console(quiet=True)
        inv = Invocation(args, cfg, None, console, dist, spelled)
        if command.access is None:
            return command.work(inv)
        with Run.open(cfg, dist, command.access, console, from_stage=getattr(args, "from_stage", None),
                      checks=stage_checks(args, command)) as inv.run:
            return command.work(inv)
    except UserError as e:
        rank = f"rank {dist.rank}: " if dist.world > 1 else ""
        _err(f"error: {rank}{e.render(spelled)}")
        return 2
    except Stopped as e:  # the loop checkpointed where it stopped
        if dist.writer:
            _err(f"{e}; resume with: cachetrain {shlex.join(argv)}")
        return 128 + e.signum
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if dist.writer:
            _err(f"interrupted by {signal.Signals(signum).name}: what was finished is kept, nothing half-written "
                 f"counts as done; resume with: cachetrain {shlex.join(argv)}")
        return 128 + signum
    except Exception as e:  # noqa: BLE001 - what the OS, an object store and torchrun say, in one line
        if dist.world > 1 and lost_peer(e):
            _err(f"error: rank {dist.rank}: another rank of the job is gone ({type(e).__name__}); torchrun restarts "
                 f"the group from the last checkpoint if --max-restarts allows, else rerun the same command")
            return 2
        line = _system_error(e, cfg)
        if line is None:
            raise
        _err(f"error: {line}")
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.close()


def _err(line: str) -> None:
    """Print a line to stderr as every error line goes out: one line, its locations' secrets redacted (a
    `--set cache.location=s3://KEY:SECRET@...` repeated in a resume command included)."""
    print(one_line(redact(line)), file=sys.stderr)


def _system_error(e: Exception, cfg: Config | None) -> str | None:
    """The one line for an object store's error after its retries, an unwritable folder or a full disk;
    None for anything else (a bug: its traceback is what a report needs)."""
    root = RunLayout.of(cfg.run_path, cfg.cache.location).cache_root if cfg is not None else None
    # a local file's error names its file; the object store's do not
    if isinstance(root, RemotePath) and is_transport_error(e) and not getattr(e, "filename", None):
        return str(transport_failure(e, str(root), "a request to the object store"))
    if not isinstance(e, OSError):
        return None
    from cachetrain.durable import UNWRITABLE, disk_full_message, unwritable_message

    if e.errno in UNWRITABLE:  # a read-only or not-ours run directory or data root
        return unwritable_message(e, cfg and cfg.run_path, cfg and cfg.data.resolved_root)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full_message(e)
    return None


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
