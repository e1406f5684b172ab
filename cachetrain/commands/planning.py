"""`plan`: which stage outputs to cache under a disk budget (cachetrain.plan.planner), in FLOPs or in seconds
from a machine's rates, and what fits in GPU memory (cachetrain.plan.memory)."""

from __future__ import annotations

import argparse

from rich.console import Console

from cachetrain.cache.formats import FORMATS
from cachetrain.commands.base import Command, Invocation
from cachetrain.config import Config
from cachetrain.errors import ConfigError
from cachetrain.run import Access, Run


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
    p.add_argument("--measure", action="store_true",
                   help="plan in seconds from this machine's rates, measured now (a few seconds each: forward "
                        "FLOP/s of the first stage, the run directory's disk, host-to-device copies) and saved to "
                        "<run>/rates.json, which later plans of the run use unless rates are given")
    p.add_argument("--gpu-memory", help="also show what fits in this much GPU memory (e.g. 24GiB, 80GB): each "
                   "stage's and the end-to-end network's training peak and the largest batch, with and without "
                   "the options that lower it")
    p.add_argument("--batch", type=int, help="batch for --gpu-memory (default: train.batch_size)")


def plan(inv: Invocation) -> int:
    from cachetrain.plan import planner
    from cachetrain.ui import plan_table

    args, run, console = inv.args, inv.run, inv.console
    cfg = run.cfg
    gpu_budget = _gpu_budget(args, cfg)  # a bad --gpu-memory or --batch fails before any work
    if args.samples is None:
        # the validation split is cached once and evaluated every epoch, like the test split (Workload.test)
        n_train = run.data.num_samples("train")
        n_test = run.data.num_samples("test") + run.data.num_samples("val")
        num_classes = run.data.num_classes
    else:
        n_train, n_test = args.samples, args.test_samples or 0
        num_classes = cfg.data.num_classes if cfg.data.name == "synthetic" else 1000 if n_train > 10**6 else 10
    budget = (2**63 - 1) if args.disk_budget == "inf" else _size(args.disk_budget)
    dtype = args.dtype or cfg.cache.dtype
    workload = planner.Workload(n_train, n_test, cfg.train.epochs, cfg.cache.views)
    costs = planner.stage_costs(cfg, planner.input_shape(cfg, args.image_size), num_classes)
    model = _rates(args, run, console)
    chosen = planner.plan(costs, workload, budget, dtype, model)
    result = {**planner.describe(costs, workload, chosen, dtype, model), "budget_bytes": budget}
    table = plan_table(result, title=f"{cfg.name}: cache plan for {n_train:,} + {n_test:,} samples, "
                                     f"budget {args.disk_budget}, {dtype}")
    if isinstance(model, planner.Rates):  # which rates, from where, and which caches they read from the disk
        from cachetrain.plan.rates import caption

        table.caption = f"{table.caption}\n{caption(model, result)}"
    console.print(table)
    run.layout.path.mkdir(parents=True, exist_ok=True)
    run.records.save_plan(result)  # atomic and durable (cachetrain.durable)
    console.print(f"saved {run.layout.plan}; train with it: --set cache.mode=plan")
    if gpu_budget is not None:
        _memory_plan(cfg, args, console, planner.input_shape(cfg, args.image_size), num_classes, gpu_budget,
                     run.device)
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


def _rates(args: argparse.Namespace, run: Run, console: Console):
    """The planner's seconds model from this machine's rates measured now (--measure, then saved to
    <run>/rates.json), from all three rates given, or from the rates an earlier --measure saved; else
    its FLOP model."""
    from cachetrain.plan import rates as machine
    from cachetrain.plan.planner import FLOPS, Rates, input_shape

    given = {"--flop-rate": args.flop_rate, "--read-rate": args.read_rate, "--write-rate": args.write_rate}
    if args.measure:
        if any(given.values()):
            raise ConfigError("plan: --measure measures the rates that --flop-rate, --read-rate and --write-rate "
                              "give; pass one or the other")
        cfg, path = run.cfg, run.layout.path
        console.print(f"measuring {run.device} and the disk of {path}:", highlight=False)
        measured = machine.measure(cfg, input_shape(cfg, args.image_size), path, run.device,
                                   report=lambda what, value: console.print(f"  {what}: {value:,.4g}", highlight=False))
        path = machine.save(measured, path)
        console.print(f"saved {path}; later plans of this run use these rates", highlight=False)
        return measured.to_rates(f"measured now on {measured.device} ({path})")
    if not any(given.values()):
        saved = machine.load(run.layout.path)
        if saved is None:
            return FLOPS
        return saved.to_rates(f"measured {saved.measured_at} on {saved.device} ({machine.rates_path(run.layout.path)})")
    if not all(given.values()):
        missing = " ".join(k for k, v in given.items() if not v)
        raise ConfigError(f"plan: planning in seconds needs --flop-rate, --read-rate and --write-rate; missing {missing}")
    values = {k: _size(v, k, "a rate like 300T (FLOP/s) or 20GB (bytes/s)") for k, v in given.items()}
    if not all(values.values()):
        raise ConfigError(f"plan: rates must be above zero, got {given}")
    return Rates(values["--flop-rate"], values["--read-rate"], values["--write-rate"],
                 source="given on the command line")


COMMANDS = [
    Command("plan", "choose which stage outputs to cache under a disk budget; saves <run>/plan.json", plan,
            Access.CONFIG, arguments=_arguments),
]
