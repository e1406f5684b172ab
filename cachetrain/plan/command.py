"""What `cachetrain plan` does, as functions of plain arguments: the CLI parses options and calls these.

    given = parse_given(flop_rate=..., read_rate=..., ..., decode_rate=...)      # the command line's rates
    measured = measure_rates(cfg, source, run_path, device, trained=...)         # --measure (then rates.save)
    model = seconds_model(cfg, dtype, given, measured, source_text)              # Rates, or FLOPS
    w, num_classes = workload(cfg, source, samples, test_samples)
    costs, notes = plan_costs(cfg, in_shape, num_classes, dtype, given, measured)
    result = make_plan(cfg, costs, w, budget, dtype, model, notes)               # what plan.json holds

`seconds_model` merges the rates: all three of --flop-rate, --read-rate and --write-rate describe a
target machine; without them the rates measured here (now, or saved by an earlier --measure) are used;
--decode-rate, --decompress-rate and the object-store rates replace the matching figure of either. A
rate that needs a seconds model (--decode-rate alone) is refused without one.

`plan_costs` sets each stage's bytes on disk: the storage format's raw bytes, over zstd's ratio when
`cache.codec` is zstd and a ratio is known (--compression-ratio for every stage, else the ratios
measured on this run's data). `notes` are what the plan assumed, in words, printed under its table:
an image folder's decoding taken to keep up (no rate given or measured), zstd ratios not measured,
ratios measured on untrained stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from cachetrain.cache.location import RemotePath
from cachetrain.config import Config
from cachetrain.errors import ConfigError
from cachetrain.plan import planner
from cachetrain.plan.costs import (StageCost, Workload, input_shape, stage_costs, with_compression,  # noqa: F401
                                   workload_of)
from cachetrain.plan.rates import MachineRates, measure
from cachetrain.plan.seconds import Rates
from cachetrain.plan.tiers import cache_root, local_folder
from cachetrain.source import Source

RATE_EXAMPLE = "a rate like 300T (FLOP/s) or 20GB (bytes/s)"


@dataclass(frozen=True)
class Given:
    """Rates given on the command line (None: not given)."""

    flops_per_s: float | None = None  # --flop-rate
    read_bytes_per_s: float | None = None  # --read-rate
    write_bytes_per_s: float | None = None  # --write-rate
    decode_samples_per_s: float | None = None  # --decode-rate
    compression_ratio: float | None = None  # --compression-ratio
    decompress_bytes_per_s: float | None = None  # --decompress-rate
    remote_read_bytes_per_s: float | None = None  # --remote-read-rate
    remote_write_bytes_per_s: float | None = None  # --remote-write-rate

    @property
    def machine(self) -> bool:
        """Whether a whole target machine is described (the three base rates)."""
        return None not in (self.flops_per_s, self.read_bytes_per_s, self.write_bytes_per_s)


OPTIONS = {"flops_per_s": "--flop-rate", "read_bytes_per_s": "--read-rate", "write_bytes_per_s": "--write-rate",
           "decode_samples_per_s": "--decode-rate", "compression_ratio": "--compression-ratio",
           "decompress_bytes_per_s": "--decompress-rate", "remote_read_bytes_per_s": "--remote-read-rate",
           "remote_write_bytes_per_s": "--remote-write-rate"}
BASE = ("flops_per_s", "read_bytes_per_s", "write_bytes_per_s")


def parse_given(**texts: str | None) -> Given:
    """The command line's rate options as numbers, keyed by `Given`'s field names: `parse_given(flops_per_s=
    "300T", decode_samples_per_s="2.5k")`. A bad or non-positive value is one ConfigError line naming it."""
    values = {}
    for name, text in texts.items():
        if name not in OPTIONS:
            raise TypeError(f"parse_given: unknown rate {name!r}")
        if text is None:
            continue
        option = OPTIONS[name]
        if name == "compression_ratio":
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{option} {text!r}: expected a ratio of raw to stored bytes like 2.0") from None
            if not value >= 1.0:
                raise ConfigError(f"{option} {text!r}: expected a ratio of raw to stored bytes >= 1, like 2.0")
        else:
            example = "a rate like 2500 or 2.5K (images/s)" if name == "decode_samples_per_s" else RATE_EXAMPLE
            value = planner.parse_size(text, option, example)
            if value <= 0:
                raise ConfigError(f"{option} {text!r}: expected {example}, above zero")
        values[name] = float(value)
    return Given(**values)


def measure_rates(cfg: Config, source: Source | None, run_path: Path, device: torch.device,
                  trained: Callable[[int], nn.Module | None] | None = None, image_size: int | None = None,
                  report=lambda what, value: None, disk_bytes: int | None = None,
                  probe_seconds: float = 3.0) -> MachineRates:
    """`plan --measure`: every rate of this machine for this run (cachetrain/plan/rates.py `measure`), the disk
    measured where its caches (or their local copies) are read from, the object store when cache.location is
    one; with `source` (the run's dataset) also each stage's seconds, the stage-0 pipeline and zstd on the
    stages' outputs, through `trained(j)` where the run has stage j trained (else None)."""
    root = cache_root(cfg.cache.location, run_path)
    folder = local_folder(cfg.cache.location, cfg.cache.remote_copies, run_path)
    return measure(cfg, input_shape(cfg, image_size), folder, device, report=report, source=source, trained=trained,
                   remote=root if isinstance(root, RemotePath) else None, probe_seconds=probe_seconds,
                   **({"disk_bytes": disk_bytes} if disk_bytes else {}))


def seconds_model(cfg: Config, dtype: str, given: Given, measured: MachineRates | None, source_text: str = ""):
    """The cost model a plan uses: `Rates` from the given machine or the measured one, with the given decode,
    codec and object-store rates in place of theirs; FLOPS when neither."""
    partial = [OPTIONS[k] for k in BASE if getattr(given, k) is not None]
    if partial and not given.machine:
        missing = " ".join(OPTIONS[k] for k in BASE if getattr(given, k) is None)
        raise ConfigError(f"plan: planning in seconds needs --flop-rate, --read-rate and --write-rate; missing {missing}")
    remote = isinstance(cache_root(cfg.cache.location, Path(".")), RemotePath)
    copies = int(cfg.cache.remote_copies_gib * 2**30) if cfg.cache.remote_copies else None
    if given.machine:
        model = Rates(given.flops_per_s, given.read_bytes_per_s, given.write_bytes_per_s,
                      source=source_text or "given on the command line")
    elif measured is not None:
        model = measured.to_rates(source_text or f"measured {measured.measured_at} on {measured.device}", dtype,
                                  codec_threads=max(1, cfg.loader.workers), remote=remote, copies_bytes=copies)
    else:
        extra = [OPTIONS[f.name] for f in fields(given) if f.name not in BASE and f.name != "compression_ratio"
                 and getattr(given, f.name) is not None]
        if extra:
            raise ConfigError(f"plan: {' and '.join(extra)} count{'s' if len(extra) == 1 else ''} in a plan in "
                              f"seconds; give --flop-rate, --read-rate and --write-rate too, or measure this "
                              f"machine with --measure")
        return planner.FLOPS
    for key in ("remote_read_bytes_per_s", "remote_write_bytes_per_s"):
        if getattr(given, key) is not None and not remote:
            raise ConfigError(f"{OPTIONS[key]}: cache.location {cfg.cache.location!r} is not an object store; "
                              f"expected an s3:// URL there (--set cache.location=s3://bucket/prefix)")
    overlay = {}
    if given.decode_samples_per_s is not None:
        overlay.update(decode_samples_per_s=given.decode_samples_per_s, decode_eval_samples_per_s=None)
    # each given rate replaces its measured one, alone: a read rate given leaves a measured PUT rate in force
    for key in ("decompress_bytes_per_s", "remote_read_bytes_per_s", "remote_write_bytes_per_s"):
        if getattr(given, key) is not None:
            overlay[key] = getattr(given, key)
    if given.remote_read_bytes_per_s is not None:
        overlay["copies_bytes"] = copies
    return replace(model, **overlay)


def workload(cfg: Config, source: Source | None, samples: int | None = None,
             test_samples: int | None = None) -> tuple[Workload, int]:
    """The run's workload and number of classes: from its dataset, or from --samples (and --test-samples)
    for a dataset described, not opened (then 1,000 classes above a million samples, as ImageNet)."""
    if samples is None:
        if source is None:
            raise ValueError("workload: neither a dataset nor --samples")
        return (workload_of(cfg, source.num_samples("train"), source.num_samples("test"), source.num_samples("val")),
                source.num_classes)
    num_classes = cfg.data.num_classes if cfg.data.name == "synthetic" else 1000 if samples > 10**6 else 10
    return workload_of(cfg, samples, test_samples or 0), num_classes


def plan_costs(cfg: Config, in_shape: tuple[int, int, int], num_classes: int, dtype: str, given: Given,
               measured: MachineRates | None) -> tuple[list[StageCost], list[str]]:
    """Each stage's cost table with its bytes on disk for `dtype`, and what was assumed about them."""
    costs = stage_costs(cfg, in_shape, num_classes)
    if cfg.cache.codec != "zstd":
        return costs, []
    if given.compression_ratio is not None:
        ratio = given.compression_ratio
        return (with_compression(costs, {dtype: [ratio] * len(costs)}),
                [f"zstd ratio {ratio:g} (raw / stored) given for every stage (--compression-ratio)"])
    ratios = (measured.zstd_ratios or {}).get(dtype) if measured is not None else None
    if ratios and len(ratios) == len(costs):
        shown = ", ".join(f"{r:.2f}" for r in ratios[:-1])
        return (with_compression(costs, {dtype: ratios}),
                [f"zstd ratio per stage {shown} (raw / stored, {dtype}), measured: {measured.zstd_note}"])
    return costs, ["zstd's ratio was neither measured (--measure with the dataset) nor given (--compression-ratio): "
                   "caches are counted and read at their raw size"]


def decode_notes(cfg: Config, model) -> list[str]:
    """What the plan assumed about decoding the images."""
    if cfg.data.name != "imagefolder":
        return []
    if isinstance(model, Rates) and model.decode_samples_per_s:
        return []
    if isinstance(model, Rates):
        return ["decoding the images is assumed to keep up with every pass that reads them (no --decode-rate, "
                "none measured: --measure)"]
    return ["the FLOP model counts no decoding, reading or writing: give rates (or --measure) to plan in seconds"]


def tier_notes(cfg: Config, model) -> list[str]:
    """What the plan assumed about where the caches live, where the config and the rates disagree."""
    remote = isinstance(cache_root(cfg.cache.location, Path(".")), RemotePath)
    if remote and isinstance(model, Rates) and not model.remote:
        return [f"cache.location {cfg.cache.location} is an object store, but its rates were neither measured "
                f"(--measure) nor given (--remote-read-rate): the caches are planned as if on local storage"]
    return []


def make_plan(cfg: Config, costs: list[StageCost], w: Workload, budget: int, dtype: str, model,
              notes: list[str] = ()) -> dict:
    """The plan of least cost within `budget` bytes, described as <run>/plan.json holds it; its notes are
    `notes` and what the plan assumed about decoding and the caches' storage (`decode_notes`, `tier_notes`)."""
    chosen = planner.plan(costs, w, budget, dtype, model)
    assumed = tuple([*notes, *decode_notes(cfg, model), *tier_notes(cfg, model)])
    result = planner.describe(costs, w, chosen, dtype, model, notes=assumed)
    return {**result, "budget_bytes": budget}
