"""`cachetrain` command line: a thin layer over cachetrain.greedy.

Every command takes `--config FILE` (YAML; see configs/) and any number of `--set section.key=value`
overrides. Errors the user can fix are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cachetrain.cache import CacheError
from cachetrain.config import ConfigError, load_config, save_config
from cachetrain.dali import DaliMissing
from cachetrain.data import DataError
from cachetrain.greedy import Greedy, StageError
from cachetrain.report import status_table
from cachetrain.rundir import CheckpointError, RunLocked

USER_ERRORS = (ConfigError, DataError, CacheError, StageError, CheckpointError, RunLocked, DaliMissing)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachetrain", description="Greedy layerwise CNN training on cached features.")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--config", help="YAML config (configs/*.yaml)")
        c.add_argument("--run", help="run directory (default: the config's run_dir, else runs/<config name>)")
        c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.epochs=3 (repeatable)")
        return c

    command("train", "train all J stages greedily (train, then cache, each), skipping finished ones")
    stage = command("stage", "train one stage: by default the first unfinished one, on the cache of the one before")
    stage.add_argument("--k", type=int, help="auxiliary depth for this stage (default: model.k)")
    stage.add_argument("--j", type=int, help="train this stage (from scratch if it was already trained)")
    stage.add_argument("--no-cache", action="store_true", help="do not cache the stage's outputs afterwards")
    cache = command("cache", "(re)build the cache of a trained stage; only missing chunks are computed")
    cache.add_argument("--j", type=int, required=True)
    cache.add_argument("--repair", action="store_true",
                       help="verify every chunk first and recompute only the corrupt or missing ones")
    verify = command("verify", "read every chunk of every cache store; exit status 1 if any is corrupt or missing")
    verify.add_argument("--j", type=int, help="only this stage's stores")
    command("status", "show each stage: trained epochs, k, accuracy, cache state, size on disk")
    command("eval", "test accuracy of the assembled network on the raw test images")
    command("e2e", "train the same network end to end with backprop (the baseline); resumes like a stage")
    plan = command("plan", "choose which stage outputs to cache under a disk budget; saves <run>/plan.json")
    plan.add_argument("--samples", type=int, help="training samples (default: the configured dataset's)")
    plan.add_argument("--test-samples", type=int, help="test samples (default: the configured dataset's, or 0 "
                      "with --samples)")
    plan.add_argument("--image-size", type=int, help="input height = width (default: the configured data's)")
    plan.add_argument("--disk-budget", default="inf", help="e.g. 2TB, 500GB, 1.5TiB (default: unlimited)")
    plan.add_argument("--dtype", choices=["float16", "bfloat16", "float32", "uint8"],
                      help="storage dtype (default: cache.dtype)")
    plan.add_argument("--flop-rate", help="plan in seconds, not FLOPs: the training FLOP/s of the target machine "
                      "(e.g. 300T); needs --read-rate and --write-rate too")
    plan.add_argument("--read-rate", help="bytes/s the cache loader delivers while a stage trains (e.g. 20GB)")
    plan.add_argument("--write-rate", help="bytes/s a caching pass writes (e.g. 150MB)")
    bench = command("bench", "greedy-cached vs greedy-recompute vs end-to-end: time, memory, accuracy, plots")
    bench.add_argument("--quick", action="store_true", help="small subsets and one epoch per stage (a smoke test)")
    bench.add_argument("--out", help="output folder (default: bench/<config name>)")
    return p


def _config(args: argparse.Namespace):
    path = args.config
    if path is None and args.run:
        path = Path(args.run) / "config.yaml"  # a run directory remembers its resolved config
    if path is None:
        raise ConfigError("--config: required (or --run DIR of an existing run)")
    overrides = list(args.set) + ([f"run_dir={args.run}"] if args.run else [])
    return load_config(path, overrides), str(args.config or path)


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    args = _parser().parse_args(argv)
    # a failed zarr write (a full disk) fails its sibling chunk writes too; the first error reaches us
    # and is reported in one line, and asyncio would log each of the others as "Task exception was
    # never retrieved" with a traceback, whenever the garbage collector meets it
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # not a terminal (CI logs, pipes): a fixed wide console, so tables do not wrap at 80 columns
    console = console or Console(width=None if sys.stdout.isatty() else 120, soft_wrap=True)
    greedy = None
    try:
        cfg, config_arg = _config(args)
        greedy = Greedy(cfg, console, config_arg)
        if args.command == "status":
            console.print(status_table(greedy.status(), title=f"{cfg.run_path}"))
            console.print(f"next: {greedy.next_action()}")
            return 0
        if args.command == "verify":
            return _verify(greedy, args.j, console)
        if args.command == "bench":
            from cachetrain.bench import run_bench
            out = Path(args.out or f"bench/{cfg.name}")
            results = run_bench(cfg, out, console, quick=args.quick)
            console.print(results_markdown_note(out))
            return 0
        if args.command == "plan":
            return _plan(greedy, args, console)
        greedy.run.lock()
        save_config(cfg, greedy.run.path / "config.yaml")
        if args.command == "train":
            rows = greedy.train_all()
            console.print(status_table(rows, title=f"{cfg.run_path}: per-stage test accuracy"))
        elif args.command == "stage":
            j = args.j if args.j is not None else greedy.next_stage()
            if j is None:
                console.print(f"all {greedy.depth} stages are trained; retrain one with --j J")
                return 0
            if not 0 <= j < greedy.depth:
                raise ConfigError(f"--j {j}: expected a stage index in [0, {greedy.depth - 1}]")
            greedy.train_stage(j, k=args.k, restart=args.j is not None and greedy.stage_state(j) == "trained")
            if j in greedy.cached_stages() and not args.no_cache:
                greedy.cache_stage(j)
            console.print(status_table(greedy.status(), title=f"{cfg.run_path}"))
        elif args.command == "cache":
            if not 0 <= args.j < greedy.depth:
                raise ConfigError(f"--j {args.j}: expected a stage index in [0, {greedy.depth - 1}]")
            computed = greedy.cache_stage(args.j, repair=args.repair)
            console.print(f"stage {args.j} cache: computed {computed['train']} train and {computed['test']} test samples")
        elif args.command == "e2e":
            from cachetrain.e2e import train_e2e
            acc = train_e2e(cfg, console, data=greedy.data)
            console.print(f"end-to-end test accuracy: {100 * acc:.2f}%")
        elif args.command == "eval":
            r = greedy.evaluate_network()
            table = Table(title=f"{cfg.run_path}: assembled network, stages 0..{r['stages'] - 1}")
            table.add_column("path")
            table.add_column("test acc", justify="right")
            table.add_row("raw test images", f"{100 * r['test_acc']:.2f}%")
            if r["agreement"] is not None:
                table.add_row("cached features (last stage)", f"{100 * r['cached_test_acc']:.2f}%")
                table.add_row("prediction agreement", f"{100 * r['agreement']:.2f}%")
            console.print(table)
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: disk full while writing {e.filename or 'the run directory'}: free some space and rerun the same "
              f"command; finished checkpoints and cache chunks are kept, nothing half-written is marked complete",
              file=sys.stderr)
        return 2
    finally:
        if greedy is not None:
            greedy.run.unlock()


def results_markdown_note(out: Path) -> str:
    return (out / "results.md").read_text() + f"\nwrote {out}/results.json, results.md, accuracy.png, memory.png, " \
        f"throughput.png"


def _plan(greedy: Greedy, args: argparse.Namespace, console: Console) -> int:
    import json

    from cachetrain import planner
    from cachetrain.report import plan_table

    cfg = greedy.cfg
    if args.samples is None:
        n_train, n_test = greedy.data.num_samples("train"), greedy.data.num_samples("test")
        num_classes = greedy.data.num_classes
    else:
        n_train, n_test = args.samples, args.test_samples or 0
        num_classes = cfg.data.num_classes if cfg.data.name == "synthetic" else 1000 if n_train > 10**6 else 10
    budget = (2**63 - 1) if args.disk_budget == "inf" else _size(args.disk_budget)
    dtype = args.dtype or cfg.cache.dtype
    workload = planner.Workload(n_train, n_test, cfg.train.epochs, cfg.cache.views)
    costs = planner.stage_costs(cfg, planner.input_shape(cfg, args.image_size), num_classes)
    model = _rates(args)
    chosen = planner.plan(costs, workload, budget, dtype, model)
    result = {**planner.describe(costs, workload, chosen, dtype, model), "budget_bytes": budget}
    console.print(plan_table(result, title=f"{cfg.name}: cache plan for {n_train:,} + {n_test:,} samples, "
                                           f"budget {args.disk_budget}, {dtype}"))
    greedy.run.path.mkdir(parents=True, exist_ok=True)
    (greedy.run.path / "plan.json").write_text(json.dumps(result, indent=2))
    console.print(f"saved {greedy.run.path / 'plan.json'}; train with it: --set cache.mode=plan")
    return 0


def _size(text: str, option: str = "--disk-budget", example: str = "a size like 2TB, 500GB or 1.5TiB") -> int:
    from cachetrain.planner import parse_size

    try:
        return parse_size(text, option, example)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _rates(args: argparse.Namespace):
    """The planner's seconds model when all three rates are given, else its FLOP model."""
    from cachetrain.planner import FLOPS, Rates

    given = {"--flop-rate": args.flop_rate, "--read-rate": args.read_rate, "--write-rate": args.write_rate}
    if not any(given.values()):
        return FLOPS
    if not all(given.values()):
        missing = " ".join(k for k, v in given.items() if not v)
        raise ConfigError(f"plan: planning in seconds needs --flop-rate, --read-rate and --write-rate; missing {missing}")
    values = {k: _size(v, k, "a rate like 300T (FLOP/s) or 20GB (bytes/s)") for k, v in given.items()}
    if not all(values.values()):
        raise ConfigError(f"plan: rates must be above zero, got {given}")
    return Rates(values["--flop-rate"], values["--read-rate"], values["--write-rate"])


def _verify(greedy: Greedy, j: int | None, console: Console) -> int:
    if j is not None and not 0 <= j < greedy.depth:
        raise ConfigError(f"--j {j}: expected a stage index in [0, {greedy.depth - 1}]")
    stages = [j] if j is not None else list(range(greedy.depth))
    bad = 0
    for (stage, split), problems in greedy.verify(stages).items():
        if problems is None:
            continue
        for p in problems:
            console.print(str(p), markup=False, highlight=False)
        bad += len(problems)
        if not problems:
            console.print(f"stage {stage} {split}: every chunk verified", highlight=False)
    if bad:
        console.print(f"{bad} corrupt or missing chunks; fix with: cachetrain cache --config {greedy.config_arg} "
                      f"--j J --repair", markup=False, highlight=False)
    return 1 if bad else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
