"""`plan`: which stage outputs to cache under a disk budget (cachetrain.plan.planner), in FLOPs or in seconds
from a machine's rates, and what fits in GPU memory (cachetrain.plan.memory)."""

from __future__ import annotations

import argparse

from rich.console import Console

from cachetrain.cache.formats import FORMATS
from cachetrain.commands.base import Command, Invocation
from cachetrain.config import Config
from cachetrain.errors import ConfigError
from cachetrain.run import Access, Run, StageState
from cachetrain.train.inputs import StageInputs


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, help="training samples (default: the configured dataset's)")
    p.add_argument("--test-samples", type=int, help="test samples (default: the configured dataset's, or 0 "
                   "with --samples)")
    p.add_argument("--image-size", type=int, help="input height = width (default: the configured data's)")
    p.add_argument("--disk-budget", default="inf", help="e.g. 2TB, 500GB, 1.5TiB (default: unlimited)")
    p.add_argument("--dtype", choices=list(FORMATS),
                   help="storage dtype (default: cache.dtype)")
    p.add_argument("--flop-rate", help="plan in seconds, not FLOPs: the training FLOP/s of the target machine "
                   "(e.g. 300T); needs --read-rate and --write-rate too")
    p.add_argument("--read-rate", help="bytes/s the cache loader delivers while a stage trains (e.g. 20GB)")
    p.add_argument("--write-rate", help="bytes/s a caching pass writes (e.g. 150MB)")
    p.add_argument("--decode-rate", help="images/s the stage-0 input pipeline delivers (decode + augmentation + "
                   "transfer), e.g. 2500; every pass that reads the images is capped by it (default: measured by "
                   "--measure, else assumed to keep up)")
    p.add_argument("--compression-ratio", help="zstd's raw / stored bytes for every stage's cache, e.g. 2.0 "
                   "(default: measured by --measure on the stages' outputs, else 1)")
    p.add_argument("--decompress-rate", help="raw bytes/s the loader decompresses zstd chunks at (e.g. 8GB; "
                   "default: measured by --measure)")
    p.add_argument("--remote-read-rate", help="bytes/s the object store at cache.location delivers to the loader "
                   "(e.g. 2GB; default: measured by --measure); with cache.remote_copies only the first epoch")
    p.add_argument("--remote-write-rate", help="bytes/s a caching pass writes to the object store")
    p.add_argument("--measure", action="store_true",
                   help="plan in seconds from this machine's rates, measured now and saved to <run>/rates.json, "
                        "which later plans of the run use unless rates are given: forward FLOP/s and each "
                        "stage's step times, the disk the caches are read from, the object store at "
                        "cache.location, host-to-device copies, the stage-0 input pipeline's images/s and zstd's "
                        "ratio and rates on the stages' outputs (trained ones where the run has them)")
    p.add_argument("--gpu-memory", help="also show what fits in this much GPU memory (e.g. 24GiB, 80GB): each "
                   "stage's and the end-to-end network's training peak and the largest batch, with and without "
                   "the options that lower it")
    p.add_argument("--batch", type=int, help="batch for --gpu-memory (default: train.batch_size)")


def plan(inv: Invocation) -> int:
    from cachetrain.plan import command, rates as machine
    from cachetrain.plan.planner import parse_size
    from cachetrain.ui import plan_table

    args, run, console = inv.args, inv.run, inv.console
    cfg = run.cfg
    gpu_budget = _gpu_budget(args, cfg)  # a bad --gpu-memory or --batch fails before any work
    budget = (2**63 - 1) if args.disk_budget == "inf" else parse_size(args.disk_budget)
    dtype = args.dtype or cfg.cache.dtype
    given = command.parse_given(flops_per_s=args.flop_rate, read_bytes_per_s=args.read_rate,
                                write_bytes_per_s=args.write_rate, decode_samples_per_s=args.decode_rate,
                                compression_ratio=args.compression_ratio, decompress_bytes_per_s=args.decompress_rate,
                                remote_read_bytes_per_s=args.remote_read_rate,
                                remote_write_bytes_per_s=args.remote_write_rate)
    # the validation split is cached once and evaluated every epoch, like the test split (Workload.test)
    source = run.data if args.samples is None or args.measure else None
    workload, num_classes = command.workload(cfg, source, args.samples, args.test_samples)
    measured, source_text = _rates(args, run, console, given, source)
    model = command.seconds_model(cfg, dtype, given, measured, source_text)
    in_shape = command.input_shape(cfg, args.image_size)
    costs, notes = command.plan_costs(cfg, in_shape, num_classes, dtype, given, measured)
    result = command.make_plan(cfg, costs, workload, budget, dtype, model, notes)
    table = plan_table(result, title=f"{cfg.name}: cache plan for {workload.train:,} + {workload.test:,} samples, "
                                     f"budget {args.disk_budget}, {dtype}")
    if model is not command.planner.FLOPS:  # which rates, from where, and which caches they read from the disk
        table.caption = f"{table.caption}\n{machine.caption(model, result)}"
    console.print(table)
    run.layout.path.mkdir(parents=True, exist_ok=True)
    run.records.save_plan(result)  # atomic and durable (cachetrain.durable)
    console.print(f"saved {run.layout.plan}; train with it: --set cache.mode=plan")
    if gpu_budget is not None:
        _memory_plan(cfg, args, console, in_shape, num_classes, gpu_budget, run.device)
    return 0


def _gpu_budget(args: argparse.Namespace, cfg: Config) -> int | None:
    if args.batch is not None and args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: expected a batch size >= 1")
    if args.gpu_memory is None:
        return None
    from cachetrain.plan.planner import parse_size

    budget = parse_size(args.gpu_memory, "--gpu-memory", "a memory size like 24GiB or 80GB")
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


def _rates(args: argparse.Namespace, run: Run, console: Console, given, source):
    """(this machine's rates, where they came from): measured now (--measure, saved to <run>/rates.json), or
    saved by an earlier --measure unless rates are given; (None, "") when neither."""
    from cachetrain.plan import command, rates as machine

    path = run.layout.path
    if args.measure:
        if any(getattr(given, k) is not None for k in command.BASE):
            raise ConfigError("plan: --measure measures the rates that --flop-rate, --read-rate and --write-rate "
                              "give; pass one or the other")
        console.print(f"measuring {run.device} and the disk of {path}:", highlight=False)
        trained = None
        if run.identity.started():  # zstd's ratio on a trained stage's outputs where the run has one
            inputs = StageInputs(run)
            trained = lambda j: inputs.trained_stage(j) if run.state.stage_state(j) is StageState.TRAINED else None  # noqa: E731
        measured = command.measure_rates(run.cfg, source, path, run.device, trained, args.image_size,
                                         report=lambda what, value: console.print(f"  {what}: {value:,.4g}",
                                                                                  highlight=False))
        saved = machine.save(measured, path)
        console.print(f"saved {saved}; later plans of this run use these rates", highlight=False)
        return measured, f"measured now on {measured.device} ({saved})"
    if given.machine:
        return None, ""
    saved = machine.load(path)
    if saved is None:
        return None, ""
    return saved, f"measured {saved.measured_at} on {saved.device} ({machine.rates_path(path)})"


COMMANDS = [
    Command("plan", "choose which stage outputs to cache under a disk budget; saves <run>/plan.json", plan,
            Access.CONFIG, arguments=_arguments),
]
