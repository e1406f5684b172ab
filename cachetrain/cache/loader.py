"""The cache loader: batches of cached features in any traversal order, from whole-chunk reads.

Chunks come from a `ChunkFeed` (cachetrain/cache/feeds.py): memory-mapped for uncompressed stores, decoded
by worker processes for compressed ones. Each batch's samples are sorted, so the samples of one chunk
are one contiguous run and each run is a single `index_select` into a reused (pinned, on CUDA)
buffer. Where that gather runs depends on who is idle during the step:
- CUDA: a background thread assembles batches ahead, and the host-to-device copy of the next batch
  is issued before the current one is handed out, so both overlap the step;
- CPU: the step runs on every core, so the gather (a memcpy out of the page cache) runs in the
  consumer's thread between steps. Beside the step, an assembling thread preempted one of the step's
  OpenMP threads, and the whole parallel region waited for it: 1.04-1.23x the step time
  (benchmarks/step_bench.py feed). Only a store this process decodes itself (compressed, workers=0)
  keeps the thread there, for the decode.
Either way the kernel is asked to read the next batch's chunks ahead, and batches are then converted
to float32 on their device. A batch is a set of samples: which samples
form batch b is a pure function of (seed, epoch, b); within a batch they come in index order.

Resume state is (seed, epoch, start_batch): `train_batches(epoch, bs, start_batch)` yields exactly
the batches an uninterrupted epoch would have yielded from that point on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader

from cachetrain.stop import ignore_in_worker
from cachetrain.threads import in_background as _in_background
from cachetrain.cache.feeds import ChunkFeed, ChunkOrder, WorkerFeed, _Chunks, file_feed
from cachetrain.cache.reader import CacheReader

Batch = tuple[torch.Tensor, torch.Tensor]
PARALLEL_BYTES = 32 * 2**20


def batch_plan(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The samples of each batch, sorted (so each chunk's samples are one contiguous run)."""
    return [np.sort(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]


def chunk_runs(idx: np.ndarray, chunk_samples: int) -> list[tuple[int, int, int]]:
    """(chunk, lo, hi) for each run of samples `idx[lo:hi]` (sorted) that lie in one chunk."""
    chunks = idx // chunk_samples
    bounds = (np.flatnonzero(np.diff(chunks)) + 1).tolist()
    return [(int(chunks[lo]), lo, hi) for lo, hi in zip([0, *bounds], [*bounds, len(idx)])]


def gather(feed: ChunkFeed, idx: np.ndarray, chunk_samples: int, out: torch.Tensor,
           pool: ThreadPoolExecutor | None = None, threads: int = 1) -> list[int]:
    """Copy samples `idx` (sorted) into `out`, one index_select per chunk run; returns the chunks used.
    With a `pool`, batches of more than PARALLEL_BYTES are copied by `threads` of its threads, in parts:
    one thread's memcpy out of the page cache moved about 5 GB/s on an H200 host, a fraction of what
    the GPU consumed at stage 1 of the ImageNet layout (3.2 MB per sample)."""
    local = torch.from_numpy(idx % chunk_samples)
    chunks = chunk_runs(idx, chunk_samples)
    runs = [(feed.get(c), lo, hi) for c, lo, hi in chunks]

    def copy(part: list[tuple[torch.Tensor, int, int]]) -> None:
        for src, lo, hi in part:  # index_select releases the GIL: the parts copy in parallel
            torch.index_select(src, 0, local[lo:hi], out=out[lo:hi])

    if pool is None or threads < 2 or out.nbytes < PARALLEL_BYTES or len(runs) < 2:
        copy(runs)
    else:
        parts = np.array_split(np.arange(len(runs)), min(threads, len(runs)))
        list(pool.map(copy, [[runs[i] for i in part] for part in parts]))
    return [c for c, _, _ in chunks]


def in_background(items: Iterator, depth: int) -> Iterator:
    """`items`, produced up to `depth` ahead by a "cache-loader" thread (cachetrain/threads.py): its error
    is raised here, and a consumer that stops early stops the thread promptly."""
    return _in_background(items, depth, name="cache-loader")


def chunk_schedule(plan: list[np.ndarray], chunk_samples: int) -> tuple[list[int], dict[int, int]]:
    """Chunks in order of first use, and the batch of each chunk's last use."""
    first: list[int] = []
    last: dict[int, int] = {}
    for b, idx in enumerate(plan):
        for c in np.unique(idx // chunk_samples).tolist():
            if c not in last:
                first.append(c)
            last[c] = b
    return first, last


class CacheLoader:
    """Batches from one store, or from V views of the same samples (stores of identical layout), in
    which case `view_of` picks the view each chunk is read from."""

    def __init__(self, readers: CacheReader | list[CacheReader], device: torch.device, workers: int = 1,
                 prefetch_chunks: int = 4, prefetch_batches: int = 2, background: bool | None = None):
        self.readers = readers if isinstance(readers, list) else [readers]
        self.reader, self.device = self.readers[0], device
        # who assembles batches (module docstring): a background thread where the host is idle during the
        # step (CUDA) or where this process decodes chunks itself; else the consumer, between steps.
        # `background` overrides the choice (benchmarks/step_bench.py feed measures both)
        self.background = background if background is not None else (
            device.type == "cuda" or (workers == 0 and not self.reader.memmappable))
        self.workers, self.prefetch = workers, prefetch_chunks
        self.depth = prefetch_batches
        self.labels = torch.from_numpy(self.reader.labels)
        # parallel batch assembly only where the host has cores to spare: on CUDA the training step
        # leaves the host idle; a CPU step wants every core itself
        self._copiers = 1 if device.type != "cuda" else max(1, min(8, (os.cpu_count() or 2) // 2))
        self._pool = ThreadPoolExecutor(self._copiers, thread_name_prefix="cache-gather") if self._copiers > 1 else None
        # batch buffers outlive an epoch: pinning a ring of 256-sample batches of a wide early stage
        # (3.2 MB each) took longer than an epoch of a few thousand samples on the H200 host
        self._rings: dict[int, list[torch.Tensor]] = {}
        self._decoders: tuple[DataLoader, ChunkOrder] | None = None  # persistent; None while an epoch uses it

    @contextmanager
    def _decoded(self, need: list[tuple[int, int]]) -> Iterator[WorkerFeed]:
        """Chunks `need` (view, chunk), decoded in that order by the worker processes. The persistent
        workers serve one epoch at a time; an epoch iterated while another holds them gets its own."""
        if self.workers == 0:
            chunks = _Chunks(self.readers)
            yield WorkerFeed(chunks[item] for item in need)
            return
        decoders, self._decoders = self._decoders, None
        if decoders is None:
            order = ChunkOrder()
            decoders = (DataLoader(_Chunks(self.readers), sampler=order, batch_size=None, num_workers=self.workers,
                                   prefetch_factor=self.prefetch, persistent_workers=True,
                                   worker_init_fn=ignore_in_worker), order)
        loader, order = decoders
        order.items = need
        try:
            yield WorkerFeed(iter(loader))  # a new epoch of the same workers: what the last epoch left queued is dropped
        except GeneratorExit:  # the epoch was abandoned: the workers are fine
            self._decoders = decoders
            raise
        # on an error (a worker killed, a chunk that failed to decode) the workers are not reused: the
        # DataLoader is dropped, and shuts them down when collected
        self._decoders = decoders

    def _ring(self, batch_size: int) -> list[torch.Tensor]:
        """A ring of batch buffers no other epoch is using (taken out of the cache while in use)."""
        ring = self._rings.pop(batch_size, None)
        if ring is None:
            pin = self.device.type == "cuda"
            ring = [torch.empty((batch_size, *self.reader.info.sample_shape), dtype=self.reader.torch_dtype,
                                pin_memory=pin) for _ in range(self.depth + 2)]
        return ring

    def _assembled(self, indices: np.ndarray | None, batch_size: int, view_of: np.ndarray | None,
                   copied: dict[int, torch.cuda.Event], plan: list[np.ndarray] | None = None
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(slot, x in the storage dtype, y) in a ring of reused (pinned, on CUDA) buffers, filled by a
        background thread or by the caller's (`self.background`). Slot s is refilled only after the
        consumer is done with it: on the CPU, once it asked for the next batch; on CUDA, once the event
        it put in `copied[s]` (its asynchronous copy out of the buffer) has completed."""
        plan = batch_plan(indices, batch_size) if plan is None else [np.sort(b) for b in plan]
        if not plan:
            return
        # the ring is keyed by the requested batch_size, the same every epoch, so its (pinned) buffers are
        # reused: a given plan's batches (one rank's share of each global batch) are never longer
        if max(len(b) for b in plan) > batch_size:
            raise ValueError(f"a planned batch of {max(len(b) for b in plan)} samples exceeds batch_size {batch_size}")
        cs = self.reader.info.chunk_samples
        first_use, last_use = chunk_schedule(plan, cs)
        view_of = np.zeros(self.reader.info.num_chunks, dtype=np.int64) if view_of is None else view_of
        feeding = file_feed(self.readers, view_of, first_use) if self.reader.memmappable or self.reader.remote else \
            self._decoded([(int(view_of[c]), c) for c in first_use])
        ring = self._ring(batch_size)
        try:
            with feeding as feed:
                slots = self._slots(plan, cs, last_use, feed, ring, copied)
                yield from in_background(slots, self.depth) if self.background else slots
        finally:
            for event in copied.values():  # no copy out of the ring may still be running when it is reused
                event.synchronize()
            copied.clear()
            self._rings[batch_size] = ring

    def _slots(self, plan: list[np.ndarray], cs: int, last_use: dict[int, int], feed: ChunkFeed,
               ring: list[torch.Tensor], copied: dict[int, torch.cuda.Event]
               ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Batch b of `plan` gathered into ring slot b % len(ring), when asked for. Before batch b is
        gathered, the kernel is asked to read ahead the chunks batch b+1 reads, so a cold page cache is
        read from disk while batch b trains; at most about two batches' bytes at a time, since a random
        order touches every chunk in its first batch and asking for a whole store at once would stall."""
        budget = max(1, -(-2 * len(plan[0]) // cs))  # chunks newly asked for per batch

        def read_ahead(b: int) -> None:
            left = budget
            for c in (np.unique(plan[b] // cs).tolist() if b < len(plan) else []):
                if left == 0:
                    return
                left -= feed.will_need(c)

        read_ahead(0)
        for b, idx in enumerate(plan):
            read_ahead(b + 1)
            slot = b % len(ring)
            if slot in copied:
                copied.pop(slot).synchronize()
            x = ring[slot][: len(idx)]
            for c in gather(feed, idx, cs, x, self._pool, self._copiers):
                if last_use[c] == b:
                    feed.release(c)
            yield slot, x, self.labels[torch.from_numpy(idx)]

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the storage dtype -> a new float32 batch in channels-last layout, in one pass. The
        layout matters on the CPU too: oneDNN's convolutions run NHWC, and a step fed NCHW features
        took up to 1.15x as long as the same step fed the NHWC tensors a frozen forward produces
        (benchmarks/step_bench.py layout, 2-core CPU). The store stays C-order NCHW."""
        layout = torch.channels_last if x.dim() == 4 else torch.contiguous_format
        # uint8 stores dequantise in place on the float copy (elementwise ops keep its layout)
        return self.reader.to_float(torch.empty(x.shape, dtype=torch.float32, device=x.device,
                                                memory_format=layout).copy_(x))

    def host_batches(self, indices: np.ndarray | None, batch_size: int, view_of: np.ndarray | None = None,
                     plan: list[np.ndarray] | None = None) -> Iterator[Batch]:
        """(x in the storage dtype, y) on the host; x is a reused buffer, valid until the next batch is drawn."""
        for _, x, y in self._assembled(indices, batch_size, view_of, {}, plan):
            yield x, y

    def batches(self, indices: np.ndarray | None, batch_size: int, view_of: np.ndarray | None = None,
                plan: list[np.ndarray] | None = None) -> Iterator[Batch]:
        """(x float32 (B, C, H, W), y int64 (B,)) on the device, for `indices` taken batch_size at a time, or
        for the batches of `plan` (index arrays) when given."""
        to_float = self._to_float
        if self.device.type != "cuda":
            for x, y in self.host_batches(indices, batch_size, view_of, plan):
                yield to_float(x), y  # a new tensor: the ring buffer x lives in gets refilled
            return
        # CUDA: copy batch b+1 on a side stream while the caller computes on batch b
        copy_stream, compute = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        copied: dict[int, torch.cuda.Event] = {}
        pending = None
        for slot, x, y in self._assembled(indices, batch_size, view_of, copied, plan):
            with torch.cuda.stream(copy_stream):
                xd, yd = x.to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(copy_stream)
            copied[slot] = event  # the assembler refills this buffer only after the copy completed
            if pending is not None:
                yield pending
            compute.wait_stream(copy_stream)
            xd.record_stream(compute)
            yd.record_stream(compute)
            pending = (to_float(xd), yd)
        if pending is not None:
            yield pending
