"""The planner's seconds model: how long each pass of a greedy run takes on a machine, from its rates.

A pass (a stage's training epoch, its evaluations, a caching pass) moves every sample through three
resources, which work at once: the device computes (the stage's step, the frozen stages it recomputes
through), the host prepares the input (decoding and augmenting images when the pass starts from them;
decompressing zstd chunks when it reads a compressed cache; compressing when a caching pass writes
one), and the storage reads the input cache and writes the output one. The loader and the writer
overlap them, so a sample takes the longest of the three; where the device is the host's own CPU
(`host_shares_compute`), computing and preparing take the same cores and add up instead.

What each term comes from:
- compute: a stage's own seconds per sample where they were measured on this device (`stage_seconds`,
  `cachetrain plan --measure`), else its FLOPs at `flops_per_s`;
- decoding: `decode_samples_per_s` (images/s of the configured stage-0 pipeline: decode, augmentation,
  transfer; `--decode-rate`, or measured). Every pass that starts from the images is capped by it: a
  stage trained on them or recomputing from them, a caching pass with no cache before it, evaluations.
  None: decoding is taken to keep up (say so where it matters: image folders). Each such pass also
  pays the pipeline's start (`decode_start_seconds`, its worker processes; measured), which a run of a
  few thousand images notices and an ImageNet epoch does not;
- compression: bytes a sample takes on disk come from the storage format and, for zstd, the measured
  ratio (cachetrain/plan/costs.py `StageCost.stored`); the codec's own work from
  `decompress_bytes_per_s` / `compress_bytes_per_s` (raw bytes a second; None: free);
- the storage tier a cache lives on (`read_rate`): a local cache is read from the page cache while its
  stores fit in free RAM and from the disk (cold) otherwise; a cache on an object store
  (`remote_read_bytes_per_s` given) is fetched from it every epoch, or, with `cache.remote_copies`
  (`copies_bytes`, the copies' size limit), in the first epoch only and from the local copies after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from cachetrain.plan.costs import StageCost, Workload, recompute_flops


@dataclass(frozen=True)
class Rates:
    """A machine's rates (see the module docstring). The first six fields are the model as it was before
    decoding, compression and tiers were counted: left at their defaults, the new terms cost nothing."""

    flops_per_s: float  # what the training steps reach
    read_bytes_per_s: float  # what the cache loader lands on the device while a stage trains (page cache)
    write_bytes_per_s: float  # what a caching pass writes
    disk_read_bytes_per_s: float | None = None  # the same from the disk, cold (None: read_bytes_per_s always)
    free_ram_bytes: int | None = None  # a cache whose stores are bigger is read from the disk
    source: str = "given"  # where the rates came from, for the plan's caption
    decode_samples_per_s: float | None = None  # stage-0 input pipeline, augmented training images (None: keeps up)
    decode_eval_samples_per_s: float | None = None  # the same, plain images (None: decode_samples_per_s)
    decompress_bytes_per_s: float | None = None  # raw bytes/s zstd chunks are decoded to (None: free)
    compress_bytes_per_s: float | None = None  # raw bytes/s a caching pass compresses (None: free)
    remote_read_bytes_per_s: float | None = None  # the caches live on an object store: what its GETs deliver
    remote_write_bytes_per_s: float | None = None  # ... and what its PUTs take (None: write_bytes_per_s)
    copies_bytes: int | None = None  # cache.remote_copies: local copies up to this size (None: no copies)
    host_shares_compute: bool = False  # the device is the host's CPU: decoding and codecs take its cores
    # measured on this device, per stage: seconds a sample of a training step, an evaluation, a block forward
    stage_seconds: tuple[tuple[float, float, float], ...] | None = None
    # seconds the stage-0 pipeline takes to start a pass over the images (worker processes), before its rate
    decode_start_seconds: float = 0.0
    unit = "s"

    # -- the storage tier -------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        return self.remote_read_bytes_per_s is not None

    def from_disk(self, store_bytes: float) -> bool:
        """Whether a local cache of `store_bytes` (all its stores: every view and the test split) is read from
        the disk every epoch: it does not fit in free RAM, and the disk's rate is known."""
        return self.disk_read_bytes_per_s is not None and self.free_ram_bytes is not None \
            and store_bytes > self.free_ram_bytes

    def local_rate(self, store_bytes: float) -> float:
        return self.disk_read_bytes_per_s if self.from_disk(store_bytes) else self.read_bytes_per_s

    def from_copies(self, store_bytes: float) -> bool:
        """Whether a remote cache is read from its local copies after its first epoch."""
        return self.remote and self.copies_bytes is not None and store_bytes <= self.copies_bytes

    def read_rate(self, store_bytes: float, epoch: int = 1) -> float:
        """Bytes/s a cache of `store_bytes` is read at in its `epoch`-th read (0: the first after its caching
        pass wrote it, when an object store's chunks are fetched and copied)."""
        if not self.remote:
            return self.local_rate(store_bytes)
        if self.from_copies(store_bytes) and epoch >= 1:
            return self.local_rate(store_bytes)
        return self.remote_read_bytes_per_s

    def write_rate(self) -> float:
        return self.remote_write_bytes_per_s if self.remote and self.remote_write_bytes_per_s else \
            self.write_bytes_per_s

    def tier(self, store_bytes: float) -> str:
        """Where a cache of `store_bytes` is read from, in words."""
        local = "the disk" if self.from_disk(store_bytes) else "the page cache" \
            if self.free_ram_bytes is not None else "local storage"
        if not self.remote:
            return local
        if self.from_copies(store_bytes):
            return f"the object store, then copies on {local}"
        return "the object store"

    # -- compute and host work, seconds per sample --------------------------------------------------------
    def _step(self, costs: list[StageCost], j: int) -> float:
        return self.stage_seconds[j][0] if self.stage_seconds else costs[j].train_flops / self.flops_per_s

    def _eval(self, costs: list[StageCost], j: int) -> float:
        return self.stage_seconds[j][1] if self.stage_seconds else costs[j].eval_flops / self.flops_per_s

    def _forward(self, costs: list[StageCost], a: int, j: int) -> float:
        """Producing stage j's input from stage a's output (a = -1: the images) through the frozen stages."""
        if self.stage_seconds:
            return sum(self.stage_seconds[i][2] for i in range(a + 1, j))
        return recompute_flops(costs, a, j) / self.flops_per_s

    def decode_seconds(self, train: bool) -> float:
        rate = self.decode_samples_per_s if train else (self.decode_eval_samples_per_s or self.decode_samples_per_s)
        return 1.0 / rate if rate else 0.0

    def _decompress(self, c: StageCost, dtype: str) -> float:
        rate = self.decompress_bytes_per_s
        return c.sample_bytes[dtype] / rate if rate and c.compressed(dtype) else 0.0

    def _compress(self, c: StageCost, dtype: str) -> float:
        rate = self.compress_bytes_per_s
        return c.sample_bytes[dtype] / rate if rate and c.compressed(dtype) else 0.0

    def _input_host(self, costs: list[StageCost], a: int, dtype: str, train: bool) -> float:
        """Host seconds a sample to prepare an input from stage a's cache (a = -1: decode an image)."""
        return self.decode_seconds(train) if a < 0 else self._decompress(costs[a], dtype)

    def _read(self, costs: list[StageCost], w: Workload, a: int, dtype: str, epoch: int = 1) -> float:
        if a < 0:
            return 0.0
        per_sample = costs[a].stored(dtype)
        return per_sample / self.read_rate((w.train * w.views + w.test) * per_sample, epoch)

    def sample_seconds(self, compute: float, host: float, read: float, write: float = 0.0) -> float:
        """One sample of a pass: the slowest of device, host and storage (device and host add up on a CPU)."""
        cpu = compute + host if self.host_shares_compute else max(compute, host)
        return max(cpu, read, write)

    # -- the planner's interface (cachetrain/plan/planner.py) ---------------------------------------------
    def train(self, costs: list[StageCost], w: Workload, a: int, j: int, dtype: str) -> float:
        """Stage j's epochs (training and each epoch's evaluations) on inputs from stage a's cache."""
        recompute = self._forward(costs, a, j)
        step, evaluation = self._step(costs, j) + recompute, self._eval(costs, j) + recompute
        host_train, host_eval = self._input_host(costs, a, dtype, True), self._input_host(costs, a, dtype, False)
        total = 0.0
        for epoch in range(w.epochs):
            read = self._read(costs, w, a, dtype, epoch)
            total += w.train * self.sample_seconds(step, host_train, read) + \
                (w.test + w.train_eval) * self.sample_seconds(evaluation, host_eval, read)
        if a < 0:  # every pass over the images starts the pipeline: training and each evaluation, every epoch
            total += w.epochs * (1 + w.eval_passes) * self.decode_start_seconds
        return total

    def build(self, costs: list[StageCost], w: Workload, a: int, j: int, dtype: str) -> float:
        """Stage j's caching pass over every store, forwarding from stage a's cache (or the images)."""
        host = self._input_host(costs, a, dtype, False) + self._compress(costs[j], dtype)
        per_sample = self.sample_seconds(self._forward(costs, a, j + 1), host, self._read(costs, w, a, dtype, w.epochs),
                                         costs[j].stored(dtype) / self.write_rate())
        start = w.stores * self.decode_start_seconds if a < 0 else 0.0
        return (w.train * w.views + w.test) * per_sample + start

    def constant(self, costs: list[StageCost], w: Workload) -> float:
        return 0.0  # the stages' own training is inside `train`: it overlaps the reads

    def input_rate(self, costs: list[StageCost], a: int, j: int, dtype: str) -> float:
        """Bytes/s stage j must read from stage a's cache to keep its training steps busy: its stored bytes a
        sample over the seconds a sample of compute and host work takes (cachetrain.plan.planner.describe)."""
        host = self._decompress(costs[a], dtype)
        busy = self.sample_seconds(self._step(costs, j) + self._forward(costs, a, j), host, 0.0)
        return costs[a].stored(dtype) / busy


@dataclass(frozen=True)
class PinnedRead(Rates):
    """`Rates` with one stage's cache read at a fixed rate, whatever its tier: the break-even search varies it."""

    pinned_stage: int = -1
    pinned_rate: float = math.inf

    @classmethod
    def of(cls, rates: Rates, stage: int, rate: float) -> PinnedRead:
        return cls(**{f.name: getattr(rates, f.name) for f in fields(rates)}, pinned_stage=stage, pinned_rate=rate)

    def _read(self, costs: list[StageCost], w: Workload, a: int, dtype: str, epoch: int = 1) -> float:
        if a == self.pinned_stage:
            return costs[a].stored(dtype) / self.pinned_rate
        return super()._read(costs, w, a, dtype, epoch)
