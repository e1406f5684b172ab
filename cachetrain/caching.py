"""Caching a trained stage: which stores it writes, what each is computed from, and their repair.

Stage j's cache is one test store and `cache.views` training stores. View 0 of the training split
is the plain pass (no augmentation); view v > 0 of stage 0 is the training images under stage-0
augmentation drawn from (seed, view, batch), and view v of stage j > 0 is stage j run over view v of
stage j-1's cache. For `cache.dtype: uint8`, one calibration pass over a spread of training samples
fixes every store's per-channel scale before the first chunk is written.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import zarr

from cachetrain.cache import CacheReader, StoreInfo, plan_layout, store_state, write_store
from cachetrain.cache.manifest import DTYPES
from cachetrain.cache.quant import Quant, calibrate
from cachetrain.cache.verify import ChunkProblem, verify_store
from cachetrain.device import autocast
from cachetrain.loader import CacheLoader
from cachetrain.report import StageProgress


def cache_stage(g, j: int, repair: bool = False) -> dict[str, int]:
    """Write stage j's outputs to every store of its cache, computing only what is missing. With `repair`,
    first verify every chunk and drop the corrupt ones, so exactly those are recomputed.
    Returns samples computed per store name."""
    from cachetrain.greedy import StageError

    if g.stage_state(j) != "trained":
        raise StageError(f"stage {j} is {g.stage_state(j)}, so there is nothing to cache yet; run: "
                         f"{g.command('stage', j)}")
    if repair:
        for problem in drop_corrupt_chunks(g, j):
            g.console.print(f"repair: {problem}", markup=False)
    ck, c = g.checkpoint(j), g.cfg.cache
    source = g.input_source(j)
    stage = g.trained_stage(j)
    shape = g.net.out_shapes[j]
    sample_bytes = int(np.prod(shape)) * np.dtype(DTYPES[c.dtype][0]).itemsize
    quant = None
    if c.dtype == "uint8":
        # a store already holding this checkpoint's outputs fixes the scale (a resumed pass must match it)
        quant = next((info.quant for info in _current_infos(g, j) if info.quant), None) or \
            _calibrate(g, stage, source)
    computed = {}
    for split, view, path in g.stores(j):
        n = source.num_samples(split)
        layout = plan_layout(sample_bytes, c.chunk_mib, n, c.batch_size)
        info = StoreInfo(stage=j, k=ck["k"], split=split, fingerprint=g.output_fingerprint(j),
                         weights_hash=ck["weights_hash"], input_fingerprint=ck["input_fingerprint"],
                         dtype=c.dtype, codec=c.codec, level=c.level, num_samples=n, sample_shape=shape,
                         chunk_samples=layout.chunk_samples, bitround=c.bitround, view=view, quant=quant)
        name = split if view == 0 else f"{split} view {view}"
        with StageProgress(g.console, f"cache stage {j} {name}", n) as bar:
            computed[name] = write_store(path, info, source.labels(split), stage, _inputs(g, j, source, split, view),
                                         layout, g.device, g.cfg.train.amp, on_progress=bar.advance)
    return computed


def _inputs(g, j: int, source, split: str, view: int):
    """batches(start, size) -> the stage's inputs for one store, in sample order from `start`."""
    if view == 0:
        return lambda start, size: source.eval_batches(split, size, start)
    if j == 0:
        return lambda start, size: g.data.augmented_batches(size, start, view)
    prev = CacheReader(g.run.store_path(j - 1, "train", view), g.output_fingerprint(j - 1))
    loader = CacheLoader(prev, g.device, g.cfg.loader.workers, g.cfg.loader.prefetch_chunks)
    return lambda start, size: loader.batches(np.arange(start, prev.info.num_samples), size)


def _calibrate(g, stage: torch.nn.Module, source) -> Quant:
    """Per-channel uint8 scale from stage outputs on `cache.quant_batches` batches spread over the
    training split (not a prefix: image folders are sorted by class), or on all of it."""
    n, size, count = source.num_samples("train"), g.cfg.cache.batch_size, g.cfg.cache.quant_batches

    def outputs() -> Iterator[torch.Tensor]:
        with torch.no_grad(), autocast(g.device, g.cfg.train.amp):
            if count == 0:  # the whole split: exact maxima, for the price of one more forward pass
                for x, _ in source.eval_batches("train", size):
                    yield stage(x)
                return
            for start in sorted(set(np.linspace(0, max(0, n - size), count).astype(int).tolist())):
                x, _ = next(iter(source.eval_batches("train", size, start)))
                yield stage(x)

    return calibrate(outputs(), g.cfg.cache.quant_percentile)


def _current_infos(g, j: int) -> list[StoreInfo]:
    fp = g.output_fingerprint(j)
    found = [store_state(path, fp)[1] for _, _, path in g.stores(j)]
    return [info for info in found if info is not None and info.fingerprint == fp]


def verify(g, stages: list[int]) -> dict[tuple[int, str], list[ChunkProblem] | None]:
    """Problems per (stage, store name); None where there is no store and none is expected (a stage not
    cached, or not trained yet); a missing store that should exist is a problem."""
    out = {}
    for j in stages:
        expected = j in g.cached_stages() and g.stage_state(j) == "trained"
        for split, view, path in g.stores(j):
            name = split if view == 0 else f"{split} view {view}"
            if path.exists():
                out[j, name] = verify_store(path)
            else:
                out[j, name] = [ChunkProblem(path, None, 0, 0, "store missing")] if expected else None
    return out


def drop_corrupt_chunks(g, j: int) -> list[ChunkProblem]:
    """Delete the chunk files of stage j's stores that fail verification and mark those stores incomplete,
    so the next caching pass recomputes exactly them."""
    dropped = []
    for problems in verify(g, [j]).values():
        if not problems or problems[0].whole_store:  # missing, or no usable metadata: the caching pass rebuilds it
            continue
        zarr.open_group(str(problems[0].store), mode="r+").attrs["complete"] = False
        for p in problems:
            if p.file is not None:
                p.file.unlink(missing_ok=True)
        dropped += problems
    return dropped
