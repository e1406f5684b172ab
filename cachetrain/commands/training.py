"""The commands that train and cache: train, stage, cache, e2e. Each runs under torchrun too."""

from __future__ import annotations

import argparse

from cachetrain.commands.base import Command, Invocation
from cachetrain.config import K_RANGE
from cachetrain.errors import ConfigError
from cachetrain.run import Access, E2E, Run, StageState
from cachetrain.train.greedy import Greedy
from cachetrain.train.unit import EndToEnd, train_unit
from cachetrain.ui import status_table


def probes_after(greedy: Greedy):
    """after_stage(j) for Greedy.train_all: stage j's probes, unless they exist for its weights or are off."""
    if not greedy.cfg.train.probes:
        return None
    from cachetrain.train.diagnostics import Diagnostics

    return Diagnostics(greedy).after_stage


def train(inv: Invocation) -> int:
    greedy = Greedy(inv.run)
    rows = greedy.train_all(after_stage=probes_after(greedy))
    inv.console.print(status_table(rows, title=f"{inv.cfg.run_path}: per-stage test accuracy"))
    if inv.run.layout.tb.is_dir():  # written as it trained (cachetrain.run.events), unless tensorboard is missing
        inv.say(f"curves: tensorboard --logdir {inv.cfg.run_path.parent} (every run under it, side by side)")
    return 0


def stage(inv: Invocation) -> int:
    args, run = inv.args, inv.run
    greedy = Greedy(run)
    j = args.j if args.j is not None else run.state.first_unfinished()
    if j is None:
        inv.say(f"all {run.depth} stages are trained; retrain one with --j J")
        return 0
    restart = args.j is not None and run.state.stage_state(j) is StageState.TRAINED
    greedy.train_stage(j, k=args.k, restart=restart)
    if j in run.state.cached_stages() and not args.no_cache:
        greedy.cache_stage(j)
    after = probes_after(greedy)
    if after is not None and inv.dist.writer:
        after(j)
    inv.dist.barrier()
    inv.console.print(status_table(run.state.status(), title=f"{inv.cfg.run_path}"))
    return 0


def cache(inv: Invocation) -> int:
    j = inv.args.j
    computed = Greedy(inv.run).cache_stage(j, repair=inv.args.repair)
    inv.say(f"stage {j} cache: computed {computed['train']} train, {computed.get('val', 0)} val and "
            f"{computed['test']} test samples")
    return 0


def e2e(inv: Invocation) -> int:
    run = inv.run
    acc = train_unit(run, EndToEnd(run))
    inv.say(f"end-to-end test accuracy: {100 * acc:.2f}%")
    if run.cfg.train.probes and inv.dist.writer:
        from cachetrain.commands.study import probe_e2e
        from cachetrain.train.diagnostics import Diagnostics
        probe_e2e(inv, Diagnostics(Greedy(run)))
    inv.dist.barrier()
    return 0


def _check_cached(args: argparse.Namespace, run: Run) -> None:
    """`cache --j J`: stage J must be one whose outputs are cached."""
    last = run.depth - 1
    cached = sorted(run.state.cached_stages())
    if args.j not in cached:
        which = f"the stages that have one are {', '.join(map(str, cached))}" if cached else \
            f"no stage has one with cache.mode {run.cfg.cache.mode!r}"
        why = " (the last stage is never cached: nothing reads it)" if args.j == last else ""
        raise ConfigError(f"--j {args.j}: stage {args.j} has no cache{why}; {which}")


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, help=f"auxiliary depth for this stage, {K_RANGE[0]}..{K_RANGE[1]} "
                                         f"(default: model.k)")
    p.add_argument("--j", type=int, help="train this stage (from scratch if it was already trained)")
    p.add_argument("--no-cache", action="store_true", help="do not cache the stage's outputs afterwards")


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--j", type=int, required=True)
    p.add_argument("--repair", action="store_true",
                   help="verify every chunk first and recompute only the corrupt or missing ones")


COMMANDS = [
    Command("train", "train all J stages greedily (train, then cache, each), skipping finished ones", train,
            Access.WRITE, torchrun=True, from_stage=True),
    Command("stage", "train one stage: by default the first unfinished one, on the cache of the one before", stage,
            Access.WRITE, torchrun=True, from_stage=True, arguments=_stage_arguments),
    Command("cache", "(re)build the cache of a trained stage; only missing chunks are computed", cache,
            Access.WRITE, torchrun=True, arguments=_cache_arguments, check=_check_cached),
    Command(E2E, "train the same network end to end with backprop (the baseline); resumes like a stage", e2e,
            Access.WRITE, torchrun=True, from_stage=True),
]
