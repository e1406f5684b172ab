"""What fits in a GPU's memory: the peak of one training step of each greedy stage and of the whole
network, at a batch, and the largest batch (or width) that fits a budget.

A unit is what one training run holds at once: stage j's block with its auxiliary head, trained alone
on a cached input (`StageModel`), or the whole network end to end (`e2e_network`). Two regimes:

- CPU (any machine): one steady-state training step (last step's gradients and the optimizer's state
  allocated first, as in training) on meta tensors, or fake ones where CPU autocast must act
  (FakeTensorMode): shapes only, nothing allocated whatever the size; accounted by
  `cachetrain.plan.profile.step_memory`:
  - the live peak, the most bytes live tensors held at once: what the table calls the peak and what
    the largest batch is read from. It is the allocator's peak less its rounding and the scratch some
    kernels allocate inside themselves; on an H200 (bf16) the allocator's peak was 0.95-1.01x of it for
    15 of 18 units of the ImageNet layout and up to 1.28x for the other 3 (`CPU_NOTE`);
  - the count: tensors saved for the backward + parameters + gradients + optimizer state (SGD momentum:
    one buffer per parameter; AdamW: two) + the input batch. It leaves out the gradients the backward
    makes and frees as it goes and what recomputation brings back, so it is below the live peak, by
    up to half on a shallow stage with checkpointing: its ratios flatter checkpointing.
  Both are in fp32 (the CPU trains in fp32) and measured at the batch itself; a line through it and
  half of it guesses the largest batch, which steps at the guess and one above it confirm (or a search
  corrects: the peak is linear in the batch only once activations dominate it).
- CUDA: the allocator's peak (torch.cuda.max_memory_allocated) over a few real steps at the batch and
  half of it, as training runs them (autocast and channels_last as configured), above what was
  allocated before the model and the batch were; the count and the live peak are taken beside it, on
  fake CPU tensors under CPU autocast when amp is on, so the table says how far they were apart.

Options that lower a unit's peak are applied the same way to every unit, greedy and end to end, so
the comparison stays fair (`VARIANTS`, each adding one to the one before): in-place ReLU, recomputing
BN -> ReLU pairs and space-to-depth in the backward (train.checkpoint_activations;
cachetrain.models.chain) and the space-reducing `sr` head (model.aux; it changes the model, the two
others do not). What each costs in time is a step-time ratio measured side by side on the CPU at a
small size (`step_time_ratios`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from cachetrain.config import Config
from cachetrain.models import build_network, configure
from cachetrain.models.factory import e2e_network, network, stage_model
from cachetrain.plan.profile import StepMemory, step_memory
from cachetrain.step import make_optimizer, train_step

E2E = "e2e"
FAKE = "fake"  # the device name for fake CPU tensors: shapes, dtypes and autocast, no memory
# how the CPU figures compared with a GPU's, for the table's caption (benchmarks/memory_bench.py, its
# `h200_check` against benchmarks/figures/h200_results.json)
CPU_NOTE = ("; on an H200 (bf16, batch 256, the k=3 ImageNet layout, 18 units) the allocator's peak was 0.95-1.01x "
            "the live peak counted this way for 15 units and 1.20-1.28x for 3 (sr head after space-to-depth), and "
            "0.98-2.06x the saved-tensor count")


@dataclass(frozen=True)
class Variant:
    """A set of options that lower the memory a training step holds."""

    name: str
    inplace_relu: bool
    checkpoint_activations: bool
    aux: str | None = None  # None: the config's own head

    def apply(self, cfg: Config) -> Config:
        """The config with this variant's options (in-place ReLU is not a config key: always on in training)."""
        model = replace(cfg.model, aux=self.aux) if self.aux else cfg.model
        return replace(cfg, model=model, train=replace(cfg.train, checkpoint_activations=self.checkpoint_activations))


# each adds one option to the one before; "+ sr head" is only shown for a config with the conv head
VARIANTS = (Variant("plain", inplace_relu=False, checkpoint_activations=False),
            Variant("in-place ReLU", inplace_relu=True, checkpoint_activations=False),
            Variant("+ checkpointing", inplace_relu=True, checkpoint_activations=True),
            Variant("+ sr head", inplace_relu=True, checkpoint_activations=True, aux="sr"))


def variants_for(cfg: Config) -> list[Variant]:
    """The variants worth showing for `cfg` (the sr step only when its head is not sr already)."""
    return [v for v in VARIANTS if v.aux is None or v.aux != cfg.model.aux]


def configured(cfg: Config, v: Variant) -> bool:
    """Whether variant `v` is what `cfg` trains with (in-place ReLU is always on in training)."""
    return v.inplace_relu and v.checkpoint_activations == cfg.train.checkpoint_activations and \
        (v.aux or cfg.model.aux) == cfg.model.aux


@dataclass(frozen=True)
class Line:
    """Bytes of one training step as a function of the batch: fixed + per_sample * batch."""

    fixed: float
    per_sample: float

    @classmethod
    def through(cls, b1: int, bytes1: float, b2: int, bytes2: float) -> Line:
        per_sample = (bytes2 - bytes1) / (b2 - b1)
        return cls(bytes1 - per_sample * b1, per_sample)

    def at(self, batch: int) -> int:
        return int(round(self.fixed + self.per_sample * batch))

    def largest_batch(self, budget: int) -> int:
        """The largest batch whose step fits `budget` bytes on this line (0: not even one sample)."""
        if self.per_sample <= 0:
            return 0 if self.fixed > budget else 2**31
        return max(0, math.floor((budget - self.fixed) / self.per_sample))


Unit = tuple[str, Callable[[], nn.Module], tuple[int, ...]]


def units(cfg: Config, in_shape: tuple[int, int, int], num_classes: int, variant: Variant) -> list[Unit]:
    """(name, builder, input shape) of each stage (block + head, as greedy trains it) and of the whole
    network, under `variant`. A builder builds under whatever mode or default device is current."""
    cfg = variant.apply(cfg)
    opts = {"checkpoint_activations": variant.checkpoint_activations, "inplace_relu": variant.inplace_relu}
    seed, out = cfg.train.seed, []
    with torch.device("meta"):
        shapes = build_network(cfg.model, in_shape, seed).in_shapes
    for j, shape in enumerate(shapes):
        def stage(j: int = j) -> nn.Module:
            return stage_model(cfg, network(cfg, in_shape, **opts), j, cfg.model.k, num_classes, **opts)
        out.append((f"stage {j}", stage, tuple(shape)))
    out.append((E2E, lambda: configure(e2e_network(cfg, tuple(in_shape), num_classes, **opts), **opts),
                tuple(in_shape)))
    return out


def measure(build: Callable[[], nn.Module], in_shape: tuple[int, ...], num_classes: int, cfg: Config,
            batch: int, device: str | torch.device = FAKE, amp_dtype: torch.dtype | None = None) -> StepMemory:
    """Count and live peak of one steady-state training step of build() at `batch` on `device` (FAKE:
    fake CPU tensors, nothing allocated). With `amp_dtype`, under autocast to it (on the CPU too)."""
    fake = str(device) == FAKE
    kind = "cpu" if fake else torch.device(device).type
    # meta tensors are the same shapes, faster, but autocast does not act on them: fake CPU tensors then
    mode = (_fake_mode() if amp_dtype else torch.device("meta")) if fake else torch.device(device)
    with mode:
        model = build()
        x = torch.randn(batch, *in_shape)
        y = torch.randint(0, num_classes, (batch,))
        optimizer = make_optimizer(model.parameters(), cfg.train)
        with torch.autocast(kind, dtype=amp_dtype) if amp_dtype else nullcontext():
            return step_memory(model, x, y, optimizer, warmup=True)


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode  # private, but the supported way to trace shapes

    return FakeTensorMode()


def cuda_peak(build: Callable[[], nn.Module], in_shape: tuple[int, ...], num_classes: int, cfg: Config,
              batch: int, steps: int = 3) -> int | None:
    """The allocator's peak over `steps` real training steps at `batch` on CUDA, as training runs them,
    above what was allocated before the model and the batch were: what the step itself needs. None when
    the batch does not fit the device."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    model = x = y = optimizer = None
    try:
        with torch.device("cuda"):
            model = build()
            x = torch.randn(batch, *in_shape)
            y = torch.randint(0, num_classes, (batch,))
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model.parameters(), cfg.train)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model.train()
        for _ in range(steps):
            train_step(model, x, y, optimizer, amp=cfg.train.amp, channels_last=cfg.train.channels_last)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model, x, y, optimizer
        torch.cuda.empty_cache()


def _fits(peak_at: Callable[[int], int], line: Line, budget: int) -> int:
    """The largest batch whose step fits `budget`: the line's answer, checked by stepping at it and one
    more (a peak is linear in the batch only once activations dominate it); when a check fails, steps of
    1, 2, 4, ... away from the guess find the answer's bracket and halving finds the answer."""
    fits = lambda b: peak_at(b) <= budget  # noqa: E731
    guess, step = max(1, line.largest_batch(budget)), 1
    if fits(guess):
        lo = guess
        while lo + step <= 2**31 and fits(lo + step):
            lo, step = lo + step, 2 * step
        hi = lo + step
    else:
        hi = guess
        while hi - step >= 1 and not fits(hi - step):
            hi, step = hi - step, 2 * step
        lo = max(0, hi - step)  # 0: not even one sample
    while hi - lo > 1:  # lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memory_table(cfg: Config, in_shape: tuple[int, int, int], num_classes: int, batch: int, budget: int,
                 device: torch.device | str = "cpu", variants: list[Variant] | None = None) -> dict:
    """Per unit and variant: the peak at `batch` and the largest batch within `budget` bytes (module
    docstring: CPU, the live peak on fake tensors; CUDA, the allocator's peak)."""
    cuda = torch.device(device).type == "cuda"
    variants = variants or variants_for(cfg)
    amp_dtype = torch.bfloat16 if cuda and cfg.train.amp else None  # the precision CUDA training runs in
    half = max(2, batch // 2)
    rows: list[dict] = []
    for v in variants:
        vcfg = v.apply(cfg)
        for i, (name, build, shape) in enumerate(units(cfg, in_shape, num_classes, v)):
            if len(rows) <= i:
                rows.append({"unit": name, "in_shape": list(shape), "variants": {}})
            at = {b: measure(build, shape, num_classes, vcfg, b, FAKE, amp_dtype) for b in {half, batch}}
            count = Line.through(half, at[half].total_bytes, batch, at[batch].total_bytes) if half != batch else \
                Line(0, at[batch].total_bytes / batch)
            live = Line.through(half, at[half].live_peak, batch, at[batch].live_peak) if half != batch else \
                Line(0, at[batch].live_peak / batch)
            cell = {"count_bytes": at[batch].total_bytes, "live_peak_bytes": at[batch].live_peak,
                    "saved_bytes": at[batch].saved_bytes, "count_line": asdict(count), "live_line": asdict(live)}
            if cuda:
                peaks = {b: cuda_peak(build, shape, num_classes, vcfg, b) for b in (half, batch)}
                cell["cuda_peaks"] = {str(b): p for b, p in peaks.items()}
                if peaks[batch] is not None and peaks[half] is not None and half != batch:
                    line = Line.through(half, peaks[half], batch, peaks[batch])
                    cell.update(peak_bytes=peaks[batch], largest_batch=line.largest_batch(budget))
                else:  # out of the device's memory: the live line, for want of a measured one
                    cell.update(peak_bytes=peaks[batch] or live.at(batch), largest_batch=live.largest_batch(budget))
            else:
                def peak_at(b: int, build=build, shape=shape) -> int:
                    return measure(build, shape, num_classes, vcfg, b, FAKE, amp_dtype).live_peak
                cell.update(peak_bytes=at[batch].live_peak, largest_batch=_fits(peak_at, live, budget))
            cell["fits"] = cell["peak_bytes"] <= budget
            rows[i]["variants"][v.name] = cell
    result = {"regime": "cuda_peak" if cuda else "cpu_live_peak", "batch": batch, "budget_bytes": budget,
              "precision": "bf16 autocast" if amp_dtype else "fp32", "optimizer": cfg.train.optimizer,
              "variants": [asdict(v) for v in variants],
              "configured": [v.name for v in variants if configured(cfg, v)], "units": rows,
              "summary": {v.name: summarise(rows, v.name) for v in variants}}
    cells = [c for r in rows for c in r["variants"].values()]
    result["live_over_count"] = _span(c["live_peak_bytes"] / c["count_bytes"] for c in cells)
    if cuda:
        result["cuda_over_live"] = _span(c["cuda_peaks"][str(batch)] / c["live_peak_bytes"] for c in cells
                                         if c["cuda_peaks"][str(batch)] is not None)
    return result


def summarise(rows: list[dict], name: str) -> dict:
    """Greedy against end to end for variant `name` of a memory table's rows."""
    greedy = [r for r in rows if r["unit"] != E2E]
    e2e = next(r for r in rows if r["unit"] == E2E)["variants"][name]
    top = max(greedy, key=lambda r: r["variants"][name]["peak_bytes"])
    top_count = max(r["variants"][name]["count_bytes"] for r in greedy)
    return {"largest_stage": top["unit"], "largest_stage_index": greedy.index(top),
            "largest_stage_bytes": top["variants"][name]["peak_bytes"],
            "e2e_bytes": e2e["peak_bytes"], "largest_stage_over_e2e": top["variants"][name]["peak_bytes"]
            / e2e["peak_bytes"], "largest_stage_over_e2e_count": top_count / e2e["count_bytes"],
            "largest_batch_greedy": min(r["variants"][name]["largest_batch"] for r in greedy),
            "largest_batch_e2e": e2e["largest_batch"]}


def _span(values) -> list[float] | None:
    values = list(values)
    return [min(values), max(values)] if values else None


def largest_width(cfg: Config, in_shape: tuple[int, int, int], num_classes: int, batch: int, budget: int,
                  variant: Variant, greedy: bool, step: int = 8, hi: int = 8192, key: str = "live_peak") -> int:
    """The largest model.width (a multiple of `step`, at most `hi`) at which every greedy stage
    (greedy=True) or the whole network fits `budget` bytes at `batch`, by the live peak on fake tensors
    (key="total_bytes": by the count). 0: not even `step` fits."""
    def fits(width: int) -> bool:
        wide = replace(cfg, model=replace(cfg.model, width=width))
        found = units(wide, in_shape, num_classes, variant)
        chosen = found[:-1] if greedy else found[-1:]
        return all(getattr(measure(build, shape, num_classes, variant.apply(wide), batch), key) <= budget
                   for _, build, shape in chosen)

    lo, top = 0, hi // step  # lo * step fits (or lo = 0); top * step is not known to fit
    if fits(top * step):
        return top * step
    while top - lo > 1:
        mid = (lo + top) // 2
        lo, top = (mid, top) if fits(mid * step) else (lo, mid)
    return lo * step


def step_time_ratios(cfg: Config, in_shape: tuple[int, int, int], num_classes: int, unit: int,
                     variants: list[Variant] | None = None, size: int = 64, width: int = 32, batch: int = 8,
                     rounds: int = 5, round_s: float = 0.25) -> dict:
    """Step time of unit `unit` (a stage index, or -1 for end to end) under each variant, measured side by
    side on the CPU at a small size (input at most `size` px, model.width at most `width`, `batch`):
    `rounds` rounds of every variant in turn, each round as many steps as take about `round_s` seconds;
    the fastest round of each, and its ratio to the variant before it (what adding that option costs) and
    to the first. Steps run on one thread and are timed in that thread's CPU seconds: on a shared machine
    wall time mostly measures the neighbours (rounds of one arm varied 6x with two threads)."""
    variants = variants or variants_for(cfg)
    small = replace(cfg, model=replace(cfg.model, width=min(width, cfg.model.width)))
    shape = (in_shape[0], min(size, in_shape[1]), min(size, in_shape[2]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time_arms(small, shape, num_classes, unit, variants, batch, rounds, round_s)
    finally:
        torch.set_num_threads(threads)


def _time_arms(small: Config, shape, num_classes: int, unit: int, variants: list[Variant], batch: int, rounds: int,
               round_s: float) -> dict:
    arms = []
    for v in variants:
        name, build, unit_shape = units(small, shape, num_classes, v)[unit]
        torch.manual_seed(0)
        model = build().train()
        x, y = torch.randn(batch, *unit_shape), torch.randint(0, num_classes, (batch,))
        optimizer = make_optimizer(model.parameters(), v.apply(small).train)
        train_step(model, x, y, optimizer)  # warm-up: allocator, thread pool, optimizer state
        arms.append((v.name, model, x, y, optimizer))

    def one_round(arm, steps: int) -> float:
        _, model, x, y, optimizer = arm
        t0 = time.thread_time()
        for _ in range(steps):
            train_step(model, x, y, optimizer)
        return (time.thread_time() - t0) / steps

    steps = max(1, round(round_s / max(one_round(arms[0], 1), 1e-6)))
    seconds: dict[str, list[float]] = {arm[0]: [] for arm in arms}
    for _ in range(rounds):
        for arm in arms:
            seconds[arm[0]].append(one_round(arm, steps))
    best = {arm: min(s) for arm, s in seconds.items()}
    names = list(best)
    return {"device": "cpu", "clock": "CPU seconds of the one thread that runs the step", "unit": name,
            "in_shape": list(shape), "width": small.model.width, "batch": batch, "rounds": rounds, "steps_per_round": steps, "seconds": best, "every_round": seconds,
            "over_previous": {n: 1.0 if i == 0 else best[n] / best[names[i - 1]] for i, n in enumerate(names)},
            "over_first": {n: best[n] / best[names[0]] for n in names}}
