"""The commands that look at a run without training (status, verify, eval), and the built-in configs (configs)."""

from __future__ import annotations

import argparse

from rich.table import Table

from cachetrain import configs as builtin_configs
from cachetrain.commands.base import Command, Invocation
from cachetrain.errors import ConfigError, Fix
from cachetrain.run import Access
from cachetrain.run.identity import config_hash, describe
from cachetrain.train.greedy import Greedy
from cachetrain.ui import status_table


def status(inv: Invocation) -> int:
    run = inv.run
    rows = run.state.status()
    inv.console.print(status_table(rows, title=f"{run.cfg.run_path}"))
    started = run.identity.started()
    forked = run.identity.meta().get("forked_from") if started else None
    if forked:
        inv.say(f"forked from {forked['run']} at stage {forked['at']} (stages 0..{forked['at'] - 1} and their caches "
                f"are hard links to its files)")
    for r in rows:
        if r.reason:
            inv.say(f"stage {r.j} is stale: {r.reason}")
    inv.say(f"config {config_hash(run.cfg)}" + ("" if started else " (run not started)"))
    for change in run.state.history:
        inv.say(f"  {change['time']}: from stage {change['from_stage']}: "
                f"{describe({k: tuple(v) for k, v in change['changes'].items()})}")
    action = run.state.next_action()
    if action.summary:
        inv.say(f"next: {action.summary}: {inv.spell(action.fix)} {action.does}")
    else:  # `train` itself: what it will do, in words
        inv.say(f"next: {action.fix.command} {action.does}")
    return 0


def verify(inv: Invocation) -> int:
    j = inv.args.j
    stages = [j] if j is not None else list(range(inv.run.depth))
    bad = 0
    results = Greedy(inv.run).verify(stages)
    for (stage, split), problems in results.items():
        if problems is None:
            continue
        for p in problems:
            inv.say(str(p))
        bad += len(problems)
        if not problems:
            inv.say(f"stage {stage} {split}: every chunk verified")
    if bad:
        broken = sorted({stage for (stage, _), problems in results.items() if problems})
        fixes = "; ".join(inv.spell(Fix.of("cache", j=stage, repair=True)) for stage in broken)
        inv.say(f"{bad} corrupt or missing chunks; fix with: {fixes}")
    return 1 if bad else 0


def evaluate(inv: Invocation) -> int:
    greedy = Greedy(inv.run)
    r = greedy.evaluate_network()
    table = Table(title=f"{inv.cfg.run_path}: assembled network, stages 0..{r['stages'] - 1}")
    table.add_column("path")
    table.add_column("test acc", justify="right")
    table.add_row("raw test images", f"{100 * r['test_acc']:.2f}%")
    if r["agreement"] is not None:
        table.add_row("cached features (last stage)", f"{100 * r['cached_test_acc']:.2f}%")
        table.add_row("prediction agreement", f"{100 * r['agreement']:.2f}%")
    inv.console.print(table)
    if inv.args.heads:
        from cachetrain.train.ensemble import HeadEnsemble

        rows = HeadEnsemble(greedy).record(inv.args.heads)
        heads = Table(title="auxiliary heads of the last m stages, class probabilities averaged")
        for name in ("m", "stages", "val acc", "test acc"):
            heads.add_column(name, justify="right")
        for r in rows:
            val = "—" if r["val_acc"] is None else f"{100 * r['val_acc']:.2f}%"
            heads.add_row(str(r["heads"]), f"{r['stages'][0]}..{r['stages'][-1]}", val, f"{100 * r['test_acc']:.2f}%")
        inv.console.print(heads)
        inv.say(f"recorded in {inv.run.layout.heads}")
    return 0


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--j", type=int, help="only this stage's stores")


def _check_heads(args: argparse.Namespace, run) -> None:
    if args.heads < 0:
        raise ConfigError(f"--heads {args.heads}: expected a number of heads >= 1 (0: none)")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", type=int, default=0, metavar="M",
                   help="also average the auxiliary heads of the last 1..M stages (free: no training) and record "
                        "their accuracy in <run>/heads.jsonl")


def configs(inv: Invocation) -> int:
    inv.say(builtin_configs.listing())
    return 0


COMMANDS = [
    Command("configs", "list the built-in configs, which --config takes by name (fmnist, ...)", configs,
            config=False),
    Command("verify", "read every chunk of every cache store; exit status 1 if any is corrupt or missing", verify,
            Access.READ, arguments=_verify_arguments),
    Command("status", "show each stage: trained epochs, k, accuracy, cache state, size on disk", status, Access.READ),
    Command("eval", "test accuracy of the assembled network on the raw test images", evaluate, Access.WRITE,
            arguments=_eval_arguments, check=_check_heads),
]
