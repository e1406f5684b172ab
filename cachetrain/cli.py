"""`cachetrain` command line: a thin layer over cachetrain.train.greedy.

Every command takes `--config FILE` (YAML; see configs/) and any number of `--set section.key=value`
overrides. Errors the user can fix are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cachetrain.cache.formats import FORMATS
from cachetrain.cache.location import RemotePath, is_transport_error, transport_failure
from cachetrain.config import Config, K_RANGE, load_config
from cachetrain.dist import Dist
from cachetrain.errors import USER_ERRORS, ConfigError, StageError
from cachetrain.train.identity import config_hash, describe
from cachetrain.train.greedy import Greedy
from cachetrain.ui import status_table

LOCKED = ("train", "stage", "cache", "e2e", "eval", "probe")  # commands that take the run's lock (and may start it)
DISTRIBUTED = ("train", "stage", "cache", "e2e")  # commands that run under torchrun, every rank together


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

    def from_stage(c: argparse.ArgumentParser) -> argparse.ArgumentParser:
        c.add_argument("--from-stage", type=int, metavar="J", dest="from_stage",
                       help="accept a config that differs from the run's: stages J and later are retrained with "
                            "it, the change is recorded in the run's history")
        return c

    from_stage(command("train", "train all J stages greedily (train, then cache, each), skipping finished ones"))
    stage = from_stage(command("stage", "train one stage: by default the first unfinished one, on the cache of the "
                                        "one before"))
    stage.add_argument("--k", type=int, help=f"auxiliary depth for this stage, {K_RANGE[0]}..{K_RANGE[1]} "
                                             f"(default: model.k)")
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
    from_stage(command("e2e", "train the same network end to end with backprop (the baseline); resumes like a "
                              "stage"))
    plan = command("plan", "choose which stage outputs to cache under a disk budget; saves <run>/plan.json")
    plan.add_argument("--samples", type=int, help="training samples (default: the configured dataset's)")
    plan.add_argument("--test-samples", type=int, help="test samples (default: the configured dataset's, or 0 "
                      "with --samples)")
    plan.add_argument("--image-size", type=int, help="input height = width (default: the configured data's)")
    plan.add_argument("--disk-budget", default="inf", help="e.g. 2TB, 500GB, 1.5TiB (default: unlimited)")
    plan.add_argument("--dtype", choices=list(FORMATS),
                      help="storage dtype (default: cache.dtype)")
    plan.add_argument("--flop-rate", help="plan in seconds, not FLOPs: the training FLOP/s of the target machine "
                      "(e.g. 300T); needs --read-rate and --write-rate too")
    plan.add_argument("--read-rate", help="bytes/s the cache loader delivers while a stage trains (e.g. 20GB)")
    plan.add_argument("--write-rate", help="bytes/s a caching pass writes (e.g. 150MB)")
    plan.add_argument("--decode-rate", help="images/s the stage-0 input pipeline delivers (decode + augmentation + "
                      "transfer), e.g. 2500; every pass that reads the images is capped by it (default: measured by "
                      "--measure, else assumed to keep up)")
    plan.add_argument("--compression-ratio", help="zstd's raw / stored bytes for every stage's cache, e.g. 2.0 "
                      "(default: measured by --measure on the stages' outputs, else 1)")
    plan.add_argument("--decompress-rate", help="raw bytes/s the loader decompresses zstd chunks at (e.g. 8GB; "
                      "default: measured by --measure)")
    plan.add_argument("--remote-read-rate", help="bytes/s the object store at cache.location delivers to the loader "
                      "(e.g. 2GB; default: measured by --measure); with cache.remote_copies only the first epoch")
    plan.add_argument("--remote-write-rate", help="bytes/s a caching pass writes to the object store")
    plan.add_argument("--measure", action="store_true",
                      help="plan in seconds from this machine's rates, measured now and saved to <run>/rates.json, "
                           "which later plans of the run use unless rates are given: forward FLOP/s and each "
                           "stage's step times, the disk the caches are read from, the object store at "
                           "cache.location, host-to-device copies, the stage-0 input pipeline's images/s and zstd's "
                           "ratio and rates on the stages' outputs (trained ones where the run has them)")
    plan.add_argument("--gpu-memory", help="also show what fits in this much GPU memory (e.g. 24GiB, 80GB): each "
                      "stage's and the end-to-end network's training peak and the largest batch, with and without "
                      "the options that lower it")
    plan.add_argument("--batch", type=int, help="batch for --gpu-memory (default: train.batch_size)")
    probe = command("probe", "fit the linear probes each trained stage lacks, and the end-to-end network's probes and "
                             "greedy-vs-e2e CKA once it is trained; written to <run>/probes.jsonl and cka.jsonl")
    probe.add_argument("--j", type=int, help="only this stage (its probes are fitted again)")
    report = sub.add_parser("report", help="markdown + JSON report and plots of one or more runs",
                            description="per-stage train/val/test accuracy, probes, gap and CKA by depth, and the "
                                        "critical layer, for a run and the runs it is compared with (--vs)")
    report.add_argument("--run", required=True, help="the run to report")
    report.add_argument("--vs", nargs="+", default=[], metavar="RUN", help="runs to overlay on the same plots")
    report.add_argument("--delta", type=float, default=0.3,
                        help="critical layer: validation gains below this many points per stage (default 0.3)")
    report.add_argument("--out", help="output folder (default: <run>/report)")
    fork = sub.add_parser("fork", help="a new run reusing another run's stages 0..J-1 and their caches (hard links)",
                          description="make run --to from run --run: stages 0..J-1 and their caches are reused "
                                      "without copying; stages J.. train with the --set changes")
    fork.add_argument("--run", required=True, help="the run to fork")
    fork.add_argument("--at", type=int, required=True, metavar="J", help="the first stage the new run trains")
    fork.add_argument("--to", required=True, help="the new run directory")
    fork.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config change for stages J.. (repeatable), e.g. --set stages.3.lr=0.01")
    bench = command("bench", "greedy-cached vs greedy-recompute vs end-to-end: time, memory, accuracy, plots")
    bench.add_argument("--quick", action="store_true", help="small subsets and one epoch per stage (a smoke test)")
    bench.add_argument("--out", help="output folder (default: bench/<config name>)")
    return p


def _config(args: argparse.Namespace) -> tuple[Config, str]:
    """The resolved config, and the options that name this run, to repeat in the commands we suggest."""
    path = args.config
    if path is None and args.run:
        path = Path(args.run) / "config.yaml"  # a run directory remembers its resolved config
    if path is None:
        raise ConfigError("--config: required (or --run DIR of an existing run)")
    overrides = list(args.set) + ([f"run_dir={args.run}"] if args.run else [])
    named = ([f"--config {shlex.quote(args.config)}"] if args.config else []) + \
        ([f"--run {shlex.quote(args.run)}"] if args.run else []) + [f"--set {shlex.quote(a)}" for a in args.set]
    return load_config(path, overrides), " ".join(named)


HINT = re.compile(r"\bcachetrain (train|stage|cache|verify|status|eval|e2e|plan|probe)\b")


def with_run_options(text: str, named: str) -> str:
    """Suggested commands in `text` ("run: cachetrain cache --j 0 --repair") completed with the options that
    name this run, so they point at the same run when pasted. Only the CLI knows how the user named it."""
    return HINT.sub(lambda m: f"{m.group(0)} {named}", text) if named else text


def check_ranges(args: argparse.Namespace, greedy: Greedy) -> None:
    """Every stage index and k a command takes, checked in one place against this run."""
    last = greedy.depth - 1
    if getattr(args, "k", None) is not None and not K_RANGE[0] <= args.k <= K_RANGE[1]:
        raise ConfigError(f"--k {args.k}: expected an auxiliary depth in [{K_RANGE[0]}, {K_RANGE[1]}] (as model.k)")
    for option in ("j", "from_stage"):
        value = getattr(args, option, None)
        if value is not None and not 0 <= value <= last:
            raise ConfigError(f"--{option.replace('_', '-')} {value}: expected a stage index in [0, {last}] "
                              f"(model.stages is {greedy.depth})")
    if args.command == "cache":
        cached = sorted(greedy.cached_stages())
        if args.j not in cached:
            which = f"the stages that have one are {', '.join(map(str, cached))}" if cached else \
                f"no stage has one with cache.mode {greedy.cfg.cache.mode!r}"
            why = " (the last stage is never cached: nothing reads it)" if args.j == last else ""
            raise ConfigError(f"--j {args.j}: stage {args.j} has no cache{why}; {which}")


def _identity(args: argparse.Namespace, greedy: Greedy, console: Console) -> None:
    """Start the run (its config.yaml, written once) or check that this command's config is the run's
    (cachetrain.train.identity); called with the run locked, so two commands cannot race on it."""
    cfg, identity = greedy.cfg, greedy.identity
    from_stage = getattr(args, "from_stage", None)
    if not identity.started():
        describe_data = getattr(greedy.data, "metadata", None)
        identity.start(cfg, describe_data() if describe_data else None)
        return
    changes = identity.check(cfg, from_stage)
    if from_stage is None:
        return
    if not changes:
        console.print(f"--from-stage {from_stage}: the config is the run's own; nothing is retrained for it")
        return
    identity.record_change(cfg, from_stage, changes)
    greedy.history = identity.history()
    console.print(f"config changed from stage {from_stage}: {describe(changes)}; stages {from_stage}.. are retrained")


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    args = _parser().parse_args(argv)
    # a failed zarr write (a full disk) fails its sibling chunk writes too; the first error reaches us
    # and is reported in one line, and asyncio would log each of the others as "Task exception was
    # never retrieved" with a traceback, whenever the garbage collector meets it
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # not a terminal (CI logs, pipes): a fixed wide console, so tables do not wrap at 80 columns
    console = console or Console(width=None if sys.stdout.isatty() else 120, soft_wrap=True)
    greedy, named, dist = None, "", Dist()
    try:
        _refuse_torchrun(args.command)  # before any command's work, report's and fork's included
        if args.command == "report":
            return _report(args, console)
        if args.command == "fork":
            from cachetrain.train.fork import fork_run
            fork_run(Path(args.run), args.at, Path(args.to), args.set, console)
            console.print(f"next: cachetrain train --run {shlex.quote(args.to)}", markup=False, highlight=False)
            return 0
        cfg, named = _config(args)
        dist = _dist(cfg)
        if not dist.writer:  # rank 0 reports; the others print only their errors
            console = Console(quiet=True)
        greedy = Greedy(cfg, console, dist)
        check_ranges(args, greedy)
        if args.command not in ("plan", "bench"):  # before any work: the caches' place is usable, and ours
            writes = args.command in LOCKED and dist.writer
            if isinstance(greedy.run.cache_root, RemotePath):
                greedy.run.cache_root.check_bucket(write=writes)
            greedy.run.claim_caches(write=writes)
        if args.command not in ("bench",) and args.command not in LOCKED and greedy.identity.started():
            greedy.identity.check(cfg, None)  # reading a run with another config would misreport it
        if args.command == "status":
            return _status(greedy, console, named)
        if args.command == "verify":
            return _verify(greedy, args.j, console, named)
        if args.command == "bench":
            from cachetrain.bench.compare import run_bench
            out = Path(args.out or f"bench/{cfg.name}")
            run_bench(cfg, out, console, quick=args.quick)
            console.print(results_markdown_note(out))
            return 0
        if args.command == "plan":
            return _plan(greedy, args, console)
        if dist.writer:  # one lock and one identity check for the whole torchrun job
            greedy.run.lock()
            _identity(args, greedy, console)
        dist.barrier()
        if args.command == "train":
            rows = greedy.train_all(after_stage=_probes_after(greedy))
            console.print(status_table(rows, title=f"{cfg.run_path}: per-stage test accuracy"))
        elif args.command == "stage":
            j = args.j if args.j is not None else greedy.next_stage()
            if j is None:
                console.print(f"all {greedy.depth} stages are trained; retrain one with --j J")
                return 0
            greedy.train_stage(j, k=args.k, restart=args.j is not None and greedy.stage_state(j) == "trained")
            if j in greedy.cached_stages() and not args.no_cache:
                greedy.cache_stage(j)
            if cfg.train.probes and dist.writer:
                _probes_after(greedy)(j)
            dist.barrier()
            console.print(status_table(greedy.status(), title=f"{cfg.run_path}"))
        elif args.command == "cache":
            computed = greedy.cache_stage(args.j, repair=args.repair)
            console.print(f"stage {args.j} cache: computed {computed['train']} train, {computed.get('val', 0)} val and "
                          f"{computed['test']} test samples")
        elif args.command == "e2e":
            from cachetrain.train.e2e import train_e2e
            acc = train_e2e(cfg, console, data=greedy.data, dist=dist)
            console.print(f"end-to-end test accuracy: {100 * acc:.2f}%")
            if cfg.train.probes and dist.writer:
                _probe(greedy, None, console, stages=False)
            dist.barrier()
        elif args.command == "probe":
            _probe(greedy, args.j, console)
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
        rank = f"rank {dist.rank}: " if dist.world > 1 else ""
        print(f"error: {rank}{with_run_options(str(e), named)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - an object store's errors, after their retries, are one line
        root = greedy.run.cache_root if greedy is not None else None
        # a local file's error names its file; the object store's do not
        if isinstance(root, RemotePath) and is_transport_error(e) and not getattr(e, "filename", None):
            print(f"error: {transport_failure(e, str(root), 'a request to the object store')}", file=sys.stderr)
            return 2
        if not isinstance(e, OSError):
            raise
        from cachetrain.durable import UNWRITABLE, unwritable_message

        if e.errno in UNWRITABLE:  # a read-only or not-ours run directory or data root
            cfg = greedy.cfg if greedy is not None else None
            print(f"error: {unwritable_message(e, cfg and cfg.run_path, cfg and cfg.data.resolved_root)}",
                  file=sys.stderr)
            return 2
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: disk full while writing {e.filename or 'the run directory'}: free some space and rerun the same "
              f"command; finished checkpoints and cache chunks are kept, nothing half-written is marked complete",
              file=sys.stderr)
        return 2
    finally:
        if greedy is not None:
            greedy.run.unlock()
        dist.close()


def results_markdown_note(out: Path) -> str:
    return (out / "results.md").read_text() + f"\nwrote {out}/results.json, results.md, accuracy.png, memory.png, " \
        f"throughput.png"


def _plan(greedy: Greedy, args: argparse.Namespace, console: Console) -> int:
    from cachetrain.plan import command, rates as machine
    from cachetrain.ui import plan_table

    cfg = greedy.cfg
    gpu_budget = _gpu_budget(args, cfg)  # a bad --gpu-memory or --batch fails before any work
    budget = (2**63 - 1) if args.disk_budget == "inf" else _size(args.disk_budget)
    dtype = args.dtype or cfg.cache.dtype
    given = command.parse_given(flops_per_s=args.flop_rate, read_bytes_per_s=args.read_rate,
                                write_bytes_per_s=args.write_rate, decode_samples_per_s=args.decode_rate,
                                compression_ratio=args.compression_ratio, decompress_bytes_per_s=args.decompress_rate,
                                remote_read_bytes_per_s=args.remote_read_rate,
                                remote_write_bytes_per_s=args.remote_write_rate)
    source = greedy.data if args.samples is None or args.measure else None
    workload, num_classes = command.workload(cfg, source, args.samples, args.test_samples)
    measured, source_text = _rates(args, greedy, console, given, source)
    model = command.seconds_model(cfg, dtype, given, measured, source_text)
    in_shape = command.input_shape(cfg, args.image_size)
    costs, notes = command.plan_costs(cfg, in_shape, num_classes, dtype, given, measured)
    result = command.make_plan(cfg, costs, workload, budget, dtype, model, notes)
    table = plan_table(result, title=f"{cfg.name}: cache plan for {workload.train:,} + {workload.test:,} samples, "
                                     f"budget {args.disk_budget}, {dtype}")
    if model is not command.planner.FLOPS:
        table.caption = f"{table.caption}\n{machine.caption(model, result)}"
    console.print(table)
    greedy.run.path.mkdir(parents=True, exist_ok=True)
    greedy.run.save_plan(result)  # atomic and durable (cachetrain.durable)
    console.print(f"saved {greedy.run.path / 'plan.json'}; train with it: --set cache.mode=plan")
    if gpu_budget is not None:
        _memory_plan(cfg, args, console, in_shape, num_classes, gpu_budget, greedy.device)
    return 0


def _gpu_budget(args: argparse.Namespace, cfg: Config) -> int | None:
    if args.batch is not None and args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: expected a batch size >= 1")
    if args.gpu_memory is None:
        return None
    budget = _size(args.gpu_memory, "--gpu-memory", "a memory size like 24GiB or 80GB")
    if budget <= 0:
        raise ConfigError(f"--gpu-memory {args.gpu_memory!r}: expected a memory size above zero, like 24GiB")
    return budget


def _memory_plan(cfg: Config, args: argparse.Namespace, console: Console, in_shape, num_classes: int, budget: int,
                 device) -> None:
    """The memory table of `plan --gpu-memory` (cachetrain.plan.memory): CUDA's allocator peak on a CUDA
    machine, else the live-tensor peak counted on fake tensors; step-time costs measured on the CPU."""
    from cachetrain.plan import memory
    from cachetrain.ui import memory_fit_table

    batch = args.batch or cfg.train.batch_size
    mem = memory.memory_table(cfg, in_shape, num_classes, batch, budget, device)
    name = mem["configured"][0] if mem["configured"] else mem["variants"][0]["name"]
    times = memory.step_time_ratios(cfg, in_shape, num_classes, mem["summary"][name]["largest_stage_index"])
    console.print(memory_fit_table(mem, title=f"{cfg.name}: training memory per stage and end to end, "
                                              f"{'x'.join(map(str, in_shape))} input", times=times,
                                   note="" if mem["regime"] == "cuda_peak" else memory.CPU_NOTE))


def _size(text: str, option: str = "--disk-budget", example: str = "a size like 2TB, 500GB or 1.5TiB") -> int:
    from cachetrain.plan.planner import parse_size

    try:
        return parse_size(text, option, example)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _rates(args: argparse.Namespace, greedy: Greedy, console: Console, given, source):
    """(this machine's rates, where they came from): measured now (--measure, saved to <run>/rates.json), or
    saved by an earlier --measure unless rates are given; (None, "") when neither."""
    from cachetrain.plan import command, rates as machine

    run = greedy.run.path
    if args.measure:
        if given.machine or given.flops_per_s or given.read_bytes_per_s or given.write_bytes_per_s:
            raise ConfigError("plan: --measure measures the rates that --flop-rate, --read-rate and --write-rate "
                              "give; pass one or the other")
        console.print(f"measuring {greedy.device} and the disk of {run}:", highlight=False)
        trained = (lambda j: greedy.trained_stage(j) if greedy.stage_state(j) == "trained" else None) \
            if greedy.identity.started() else None
        measured = command.measure_rates(greedy.cfg, source, run, greedy.device, trained, args.image_size,
                                         report=lambda what, value: console.print(f"  {what}: {value:,.4g}",
                                                                                  highlight=False))
        path = machine.save(measured, run)
        console.print(f"saved {path}; later plans of this run use these rates", highlight=False)
        return measured, f"measured now on {measured.device} ({path})"
    if given.machine:
        return None, ""
    saved = machine.load(run)
    if saved is None:
        return None, ""
    return saved, f"measured {saved.measured_at} on {saved.device} ({machine.rates_path(run)})"


def _refuse_torchrun(command: str) -> None:
    """A command that runs in one process, started under torchrun (WORLD_SIZE > 1), is refused on every
    rank before it does anything: N copies of `fork` or `report` would race on the same files."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and command not in DISTRIBUTED:
        raise ConfigError(f"torchrun: the {command} command runs in one process; expected it without torchrun, "
                          f"which runs only {', '.join(DISTRIBUTED[:-1])} and {DISTRIBUTED[-1]}")


def _dist(cfg) -> Dist:
    """This process's place in a torchrun job (joining its process group), or a single process; only for
    the DISTRIBUTED commands (main refuses the others under torchrun first)."""
    from cachetrain.device import resolve_device

    return Dist.from_env(resolve_device(cfg.train.device).type)


def _probes_after(greedy: Greedy):
    """after_stage(j) for Greedy.train_all: stage j's probes, unless they exist for its weights or are off."""
    if not greedy.cfg.train.probes:
        return None
    from cachetrain.train.diagnostics import Diagnostics

    diag = Diagnostics(greedy)
    return lambda j: diag.probe_stage(j) if j in diag.missing_stages() else None


def _probe(greedy: Greedy, j: int | None, console: Console, stages: bool = True) -> None:
    """`cachetrain probe`: what is missing (or stage j's probes again), then e2e probes and CKA if it is trained."""
    from cachetrain.train.diagnostics import Diagnostics

    diag = Diagnostics(greedy)
    if j is not None:
        if greedy.stage_state(j) != "trained":
            raise StageError(f"--j {j}: stage {j} is {greedy.stage_state(j)}; run: {Greedy.command('stage', j)}")
        diag.probe_stage(j)
        return
    for i in diag.missing_stages() if stages else []:
        diag.probe_stage(i)
    model = diag.e2e_model()
    if model is None:
        console.print("no trained end-to-end network: its probes and CKA come after: cachetrain e2e", markup=False)
        return
    if diag.e2e_missing(model):
        diag.probe_e2e(model)
    if diag.cka_missing(model):
        diag.cka(model)


def _report(args: argparse.Namespace, console: Console) -> int:
    from cachetrain.study.report import write_report

    runs = [Path(args.run), *map(Path, args.vs)]
    out = Path(args.out or Path(args.run) / "report")
    write_report(runs, out, delta=args.delta)
    console.print((out / "report.md").read_text(), markup=False, highlight=False)
    console.print(f"wrote {out}/report.md, report.json and the plots", markup=False, highlight=False)
    return 0


def _status(greedy: Greedy, console: Console, named: str) -> int:
    rows = greedy.status()
    console.print(status_table(rows, title=f"{greedy.cfg.run_path}"))
    forked = greedy.identity.meta().get("forked_from") if greedy.identity.started() else None
    if forked:
        console.print(f"forked from {forked['run']} at stage {forked['at']} (stages 0..{forked['at'] - 1} and their "
                      f"caches are hard links to its files)", markup=False, highlight=False)
    for r in rows:
        if r.reason:
            console.print(f"stage {r.j} is stale: {r.reason}", markup=False, highlight=False)
    console.print(f"config {config_hash(greedy.cfg)}" + ("" if greedy.identity.started() else " (run not started)"),
                  highlight=False)
    for change in greedy.history:
        console.print(f"  {change['time']}: from stage {change['from_stage']}: "
                      f"{describe({k: tuple(v) for k, v in change['changes'].items()})}", markup=False, highlight=False)
    console.print(with_run_options(f"next: {greedy.next_action()}", named), markup=False, highlight=False)
    return 0


def _verify(greedy: Greedy, j: int | None, console: Console, named: str) -> int:
    stages = [j] if j is not None else list(range(greedy.depth))
    bad = 0
    results = greedy.verify(stages)
    for (stage, split), problems in results.items():
        if problems is None:
            continue
        for p in problems:
            console.print(str(p), markup=False, highlight=False)
        bad += len(problems)
        if not problems:
            console.print(f"stage {stage} {split}: every chunk verified", highlight=False)
    if bad:
        broken = sorted({stage for (stage, _), problems in results.items() if problems})
        fixes = "; ".join(with_run_options(f"cachetrain cache --j {stage} --repair", named) for stage in broken)
        console.print(f"{bad} corrupt or missing chunks; fix with: {fixes}", markup=False, highlight=False)
    return 1 if bad else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
