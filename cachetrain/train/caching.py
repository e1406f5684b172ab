"""Caching a trained stage: which stores it writes, what each is computed from, and their repair.

Stage j's cache is `cache.views` training stores, one validation store when the run has a validation
split (`data.val_samples`), and one test store. The val and test stores, and view 0 of the training
split, are plain passes (no augmentation); view v > 0 of stage 0 is the training images under stage-0
augmentation drawn from (seed, view, batch), and view v of stage j > 0 is stage j run over view v of
stage j-1's cache. For `cache.dtype: uint8`, one calibration pass over a spread of training samples
fixes every store's per-channel scale before the first chunk is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import nn

from cachetrain.cache import StoreInfo, plan_layout, store_state, write_store
from cachetrain.cache.formats import FORMATS
from cachetrain.cache.location import zarr_store
from cachetrain.cache.quant import Quant, calibrate
from cachetrain.cache.verify import ChunkProblem, verify_store
from cachetrain.cache.writer import Batches
from cachetrain.config import CacheConfig
from cachetrain.device import autocast
from cachetrain.dist import Dist
from cachetrain.source import Source
from cachetrain.stop import StopRequests
from cachetrain.ui import StageProgress


@dataclass(frozen=True)
class CacheJob:
    """Everything a caching pass needs to know about one trained stage (cachetrain.train.greedy builds it)."""

    j: int
    k: int
    stage: nn.Module  # trained weights, eval mode, on the device
    source: Source  # stage j's input: view 0 of the training split, the val and test splits come from here
    out_shape: tuple[int, int, int]  # (C, H, W) of one output
    fingerprint: str  # of the outputs (cachetrain.cache.output_fingerprint)
    weights_hash: str
    input_fingerprint: str
    stores: list[tuple[str, int, Path]]  # (split, view, path) of every store of the cache
    view_inputs: Callable[[int], Batches]  # training view v > 0 -> batches(start, size) of its inputs


def store_name(split: str, view: int) -> str:
    return split if view == 0 else f"{split} view {view}"


def cache_stage(job: CacheJob, c: CacheConfig, device: torch.device, amp: bool, console,
                dist: Dist = Dist(), stop: StopRequests | None = None) -> dict[str, int]:
    """Write stage j's outputs to every store of its cache, computing only what is missing. Returns
    samples computed per store name. Under torchrun, every rank writes its share of each store's chunks
    (cachetrain.cache.writer.write_store)."""
    fmt = FORMATS[c.dtype]
    sample_bytes = fmt.sample_bytes(job.out_shape)
    quant = None
    if fmt.calibrated and dist.writer:
        # a store already holding this checkpoint's outputs fixes the scale (a resumed pass must match it)
        quant = next((info.quant for info in _current_infos(job) if info.quant), None) or \
            _calibrate(job, c, device, amp)
    quant = dist.broadcast(quant)  # one scale for every rank's chunks
    computed = {}
    for split, view, path in job.stores:
        n = job.source.num_samples(split)
        layout = plan_layout(sample_bytes, c.chunk_mib, n, c.batch_size)
        info = StoreInfo(stage=job.j, k=job.k, split=split, fingerprint=job.fingerprint,
                         weights_hash=job.weights_hash, input_fingerprint=job.input_fingerprint,
                         dtype=c.dtype, codec=c.codec, level=c.level, num_samples=n, sample_shape=job.out_shape,
                         chunk_samples=layout.chunk_samples, bitround=c.bitround, view=view, quant=quant)
        name = store_name(split, view)
        inputs = (lambda start, size, split=split: job.source.eval_batches(split, size, start)) if view == 0 \
            else job.view_inputs(view)
        with StageProgress(console, f"cache stage {job.j} {name}", n) as bar:
            computed[name] = write_store(path, info, job.source.labels(split), job.stage, inputs, layout, device, amp,
                                         on_progress=bar.advance, dist=dist, stop=stop)
    return computed


def _calibrate(job: CacheJob, c: CacheConfig, device: torch.device, amp: bool) -> Quant:
    """Per-channel uint8 scale from stage outputs on `cache.quant_batches` batches spread over the
    training split (not a prefix: image folders are sorted by class), or on all of it."""
    source, stage = job.source, job.stage
    n, size, count = source.num_samples("train"), c.batch_size, c.quant_batches

    def outputs() -> Iterator[torch.Tensor]:
        with torch.no_grad(), autocast(device, amp):
            if count == 0:  # the whole split: exact maxima, for the price of one more forward pass
                for x, _ in source.eval_batches("train", size):
                    yield stage(x)
                return
            for start in sorted(set(np.linspace(0, max(0, n - size), count).astype(int).tolist())):
                x, _ = next(iter(source.eval_batches("train", size, start)))
                yield stage(x)

    return calibrate(outputs(), c.quant_percentile)


def _current_infos(job: CacheJob) -> list[StoreInfo]:
    found = [store_state(path, job.fingerprint)[1] for _, _, path in job.stores]
    return [info for info in found if info is not None and info.fingerprint == job.fingerprint]


def verify(stores: list[tuple[str, int, Path]], expected: bool) -> dict[str, list[ChunkProblem] | None]:
    """Problems per store name; None where there is no store and none is `expected` (a stage not cached,
    or not trained yet); a missing store that should exist is a problem."""
    out = {}
    for split, view, path in stores:
        if path.exists():
            out[store_name(split, view)] = verify_store(path)
        else:
            out[store_name(split, view)] = [ChunkProblem(path, None, 0, 0, "store missing")] if expected else None
    return out


def drop_corrupt_chunks(stores: list[tuple[str, int, Path]]) -> list[ChunkProblem]:
    """Delete the chunk files of these stores that fail verification and mark those stores incomplete, so
    the next caching pass recomputes exactly them. Returns what it found, a store's whole-store problem too
    (metadata missing, or disagreeing with its record): the caching pass rebuilds such a store, as
    `store_state` calls it DAMAGED with no record to resume from."""
    dropped = []
    for problems in verify(stores, expected=False).values():
        if not problems:
            continue
        if problems[0].whole_store:  # nothing in it is trusted: not dropped chunk by chunk, rebuilt
            dropped += problems
            continue
        zarr.open_group(zarr_store(problems[0].store), mode="r+").attrs["complete"] = False
        for p in problems:
            if p.file is not None:
                p.file.unlink(missing_ok=True)
        dropped += problems
    return dropped
