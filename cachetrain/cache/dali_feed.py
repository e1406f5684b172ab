"""The DALI cache loader (`loader.backend: dali`): cached features through an NVIDIA DALI pipeline.

`fn.external_source` in batch mode with parallel (spawned) worker processes, whose callback is a pure
function of (epoch, batch index): it gathers batch b of the epoch's plan (the same `batch_plan` the
numpy loader uses, so both backends yield the same samples per batch) from memory-mapped or decoded
chunks. DALI places the batch on the GPU and runs the feature-space augmentation there: `fn.slice`
takes a window shifted by a random integer in [-p, p] per axis, zero-filled where it leaves the map
(random crop with padding p), then `crop_mirror_normalize` mirrors it (it handles fp16 CHW; `fn.flip`
on the CPU does not).

Without a GPU, pipelines run CPU-only (`device_id=None`), which is how the test suite exercises them.
DALI draws its augmentation randomness from the pipeline's seed, not from (seed, epoch, batch): a run
resumed mid-epoch sees the same samples in the same batches, with different random crops.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cachetrain.cache.feeds import RecentFeed
from cachetrain.cache.formats import FORMATS
from cachetrain.cache.loader import batch_plan, gather
from cachetrain.cache.reader import CacheReader
from cachetrain.device import dali_device_id, require_dali
from cachetrain.errors import CacheError, ConfigError


class FeatureBatches:
    """The external_source callback: batch `info.iteration` of epoch `first_epoch + info.epoch_idx`
    (the first epoch starting at `start_batch`), as (x (B, C, H, W) storage dtype, y (B,)). Its chunks
    are checked in the worker process (cachetrain/cache/reader.py); a corrupt one raises CacheError
    there, which `DaliFeatureLoader.train_batches` turns back into one line."""

    def __init__(self, reader: CacheReader, order, batch_size: int, first_epoch: int, start_batch: int):
        self.reader, self.order, self.batch_size = reader, order, batch_size
        self.first_epoch, self.start_batch = first_epoch, start_batch
        self._plans: dict[int, list[np.ndarray]] = {}
        self._feed: RecentFeed | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plans": {}, "_feed": None}

    def plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            self._plans = {epoch: batch_plan(self.order.indices(epoch), self.batch_size)}
        return self._plans[epoch]

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        b = info.iteration + (self.start_batch if info.epoch_idx == 0 else 0)
        plan = self.plan(epoch)
        if b >= len(plan):
            raise StopIteration
        idx = plan[b]
        if self._feed is None:
            self._feed = RecentFeed(self.reader)
        info_ = self.reader.info
        x = torch.empty((len(idx), *info_.sample_shape), dtype=self.reader.torch_dtype)
        gather(self._feed, idx, info_.chunk_samples, x)
        return x.numpy(), self.reader.labels[idx]


class DaliFeatureLoader:
    """Training batches of a cache through a DALI pipeline. The pipeline lives across epochs; asking
    for an epoch other than the next one (or a mid-epoch start) builds a new one."""

    def __init__(self, reader: CacheReader, order, device: torch.device, workers: int, seed: int,
                 crop_padding: int, flip: bool):
        require_dali()
        if reader.info.storage_format.dali is None:
            readable = " or ".join(name for name, fmt in FORMATS.items() if fmt.dali)
            raise ConfigError(f"loader.backend: expected 'numpy' for a {reader.info.dtype} cache ({reader.path}); "
                              f"the DALI loader reads {readable}, got 'dali'")
        self.reader, self.order, self.device = reader, order, device
        self.workers, self.seed, self.padding, self.flip = max(1, workers), seed, crop_padding, flip
        self._iter, self._next = None, None

    def _build(self, batch_size: int, epoch: int, start_batch: int):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        dtype = getattr(types, self.reader.info.storage_format.dali)
        _, h, w = self.reader.info.sample_shape
        p, flip, gpu = self.padding, self.flip, self.device.type == "cuda"
        source = FeatureBatches(self.reader, self.order, batch_size, epoch, start_batch)

        # spawned workers: forking a process that runs CUDA, zarr's event loop and other pipelines' threads
        # can deadlock the child; the callback is a picklable module-level class for that reason
        @pipeline_def(batch_size=batch_size, num_threads=2, py_num_workers=self.workers, py_start_method="spawn",
                      seed=self.seed * 7919 + epoch, prefetch_queue_depth=2, device_id=dali_device_id(self.device))
        def pipeline():
            x, y = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True, parallel=True,
                                      layout=["CHW", ""])
            if gpu:
                x = x.gpu()
            if p:  # a window shifted by an integer in [-p, p] on each axis, zeros where it leaves the map
                anchor = fn.random.uniform(values=list(range(-p, p + 1)), shape=[2], dtype=types.INT32)
                x = fn.slice(x, start=anchor, shape=[h, w], axes=[1, 2], out_of_bounds_policy="pad", fill_values=0)
            if flip:
                x = fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(), dtype=dtype, output_layout="CHW")
            return x, y

        pipe = pipeline()
        pipe.build()
        return DALIGenericIterator(pipe, ["x", "y"], last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)

    def train_batches(self, epoch: int, batch_size: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rebuild = self._iter is None or self._next != (epoch, start_batch, batch_size)
        self._next = None  # an epoch abandoned half way leaves the pipeline mid-epoch: rebuild next time
        try:
            if rebuild:
                self._iter = self._build(batch_size, epoch, start_batch)  # runs the first batches already
            for data in self._iter:
                x, y = data[0]["x"], data[0]["y"].reshape(-1)
                yield x.to(self.device, non_blocking=True).float(), y.to(self.device, non_blocking=True).long()
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a worker's CacheError
            self._iter = None
            message = _cache_error_in(str(e))
            if message is None:
                raise
            raise CacheError(message) from None
        self._next = (epoch + 1, 0, batch_size)


def _cache_error_in(text: str) -> str | None:
    """The message of a CacheError raised in a DALI worker process (a corrupt or missing chunk): DALI
    re-raises it in this process as a plain Exception carrying the worker's traceback as text, whose
    last line is `<module>.CacheError: <message>` (CacheError messages are one line)."""
    mark = f"{CacheError.__module__}.{CacheError.__qualname__}: "
    lines = [line[len(mark):] for line in text.splitlines() if line.startswith(mark)]
    return lines[-1].strip() if lines else None
