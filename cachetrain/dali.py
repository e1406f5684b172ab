"""NVIDIA DALI loaders (`loader.backend: dali`, extra `cachetrain[dali]`).

Cached features: `fn.external_source` in batch mode with parallel (spawned) worker processes, whose callback is
a pure function of (epoch, batch index): it gathers batch b of the epoch's plan (the same
`batch_plan` the numpy loader uses, so both backends yield the same samples per batch) from memory-
mapped or decoded chunks. DALI places the batch on the GPU and runs the feature-space augmentation
there: `fn.slice` takes a window shifted by a random integer in [-p, p] per axis, zero-filled where it
leaves the map (random crop with padding p), then `crop_mirror_normalize` mirrors it (it handles fp16
CHW; `fn.flip` on the CPU does not).

Image folders (stage 0 at ImageNet scale): the callback reads the JPEG bytes of batch b,
`fn.decoders.image` decodes them (on the GPU with device "mixed"), then random resized crop + flip +
normalize for training, or resize + center crop for evaluation and caching. A file the decoder
fails on stops the pass with one DataError line naming it (found among the batches handed out).

Without a GPU, pipelines run CPU-only (`device_id=None`), which is how the test suite exercises them.
DALI draws its augmentation randomness from the pipeline's seed, not from (seed, epoch, batch): a
run resumed mid-epoch sees the same samples in the same batches, with different random crops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cachetrain.cache.manifest import CacheError
from cachetrain.cache.reader import CacheReader
from cachetrain.config import ConfigError
from cachetrain.feeds import RecentFeed
from cachetrain.loader import batch_plan, gather

INSTALL = "pip install 'cachetrain[dali]'"


class DaliMissing(RuntimeError):
    pass


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise DaliMissing(f"loader.backend: 'dali' needs NVIDIA DALI, which is not installed; install it with: "
                          f"{INSTALL}") from None
    import nvidia.dali as dali
    return dali


def dali_available() -> bool:
    try:
        require_dali()
        return True
    except DaliMissing:
        return False


def _device_id(device: torch.device) -> int | None:
    return (device.index or 0) if device.type == "cuda" else None


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
        if reader.info.dtype not in ("float16", "float32"):
            raise ConfigError(f"loader.backend: expected 'numpy' for a {reader.info.dtype} cache ({reader.path}); "
                              f"the DALI loader reads float16 or float32, got 'dali'")
        self.reader, self.order, self.device = reader, order, device
        self.workers, self.seed, self.padding, self.flip = max(1, workers), seed, crop_padding, flip
        self._iter, self._next = None, None

    def _build(self, batch_size: int, epoch: int, start_batch: int):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        dtype = types.FLOAT16 if self.reader.info.dtype == "float16" else types.FLOAT
        _, h, w = self.reader.info.sample_shape
        p, flip, gpu = self.padding, self.flip, self.device.type == "cuda"
        source = FeatureBatches(self.reader, self.order, batch_size, epoch, start_batch)

        # spawned workers: forking a process that runs CUDA, zarr's event loop and other pipelines' threads
        # can deadlock the child; the callback is a picklable module-level class for that reason
        @pipeline_def(batch_size=batch_size, num_threads=2, py_num_workers=self.workers, py_start_method="spawn",
                      seed=self.seed * 7919 + epoch, prefetch_queue_depth=2, device_id=_device_id(self.device))
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


class ImageBatches:
    """The external_source callback for image folders: encoded bytes and labels of batch b."""

    def __init__(self, files: list[str], labels: list[int], batch_size: int, seed: int, shuffle: bool,
                 first_epoch: int, start: int):
        self.files, self.labels, self.batch_size = files, np.asarray(labels, dtype=np.int64), batch_size
        self.seed, self.shuffle, self.first_epoch, self.start = seed, shuffle, first_epoch, start
        # the sample indices of the last few batches handed out: the pipeline runs ahead of its consumer
        # (prefetch_queue_depth), so a decode error is in one of these; `bad_file` finds which
        self.recent: deque[np.ndarray] = deque(maxlen=4)

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        n = len(self.files)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        first = (self.start if info.epoch_idx == 0 else 0) + info.iteration * self.batch_size
        if first >= n:
            raise StopIteration
        idx = order[first:first + self.batch_size]
        self.recent.append(idx)
        return [np.fromfile(self.files[i], dtype=np.uint8) for i in idx], self.labels[idx]

    def bad_file(self) -> tuple[str, str] | None:
        """(path, reason) of the first file of the recent batches that PIL cannot decode, if any."""
        from cachetrain.folder import image_problem

        for idx in self.recent:
            for i in idx:
                problem = image_problem(self.files[i])
                if problem is not None:
                    return self.files[i], problem
        return None


def image_batches(files: list[str], labels: list[int], size: int, train: bool, batch_size: int, seed: int,
                  epoch: int, start: int, device: torch.device, workers: int, flip: bool,
                  mean: tuple[float, ...], std: tuple[float, ...],
                  shuffle: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over an image folder split through DALI: decode (GPU 'mixed' on CUDA), then random
    resized crop + flip (train) or resize + center crop (eval), normalize, CHW float32."""
    require_dali()
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    gpu = device.type == "cuda"
    source = ImageBatches(files, labels, batch_size, seed, train if shuffle is None else shuffle, epoch, start)

    # reading encoded bytes is cheap next to decoding (DALI's own threads, or nvJPEG on the GPU), so the
    # callback runs in this process and needs no worker start per pass
    @pipeline_def(batch_size=batch_size, num_threads=max(2, workers), seed=seed * 7919 + epoch,
                  prefetch_queue_depth=2, device_id=_device_id(device))
    def pipeline():
        jpegs, y = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if train:
            images = fn.random_resized_crop(images, size=(size, size))
            crop, mirror = (size, size), fn.random.coin_flip() if flip else 0
        else:
            images = fn.resize(images, resize_shorter=size * 8 // 7)
            crop, mirror = (size, size), 0
        x = fn.crop_mirror_normalize(images, crop=crop, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                     mean=[255 * m for m in mean], std=[255 * s for s in std])
        return x, y

    pipe = pipeline()
    pipe.build()
    try:
        for data in DALIGenericIterator(pipe, ["x", "y"], last_batch_policy=LastBatchPolicy.PARTIAL):
            yield (data[0]["x"].to(device, non_blocking=True),
                   data[0]["y"].reshape(-1).to(device, non_blocking=True).long())
    except RuntimeError:
        # DALI reports a file it cannot decode as a multi-line pipeline error naming no file (and its own
        # log lines on stderr): name the file in one line when it is one of the batches handed out
        bad = source.bad_file()
        if bad is None:
            raise
        from cachetrain.folder import bad_image_error
        raise bad_image_error(*bad) from None


def folder_files(dataset) -> tuple[list[str], list[int]]:
    """(paths, labels) of a folder split (cachetrain.folder.ImageFiles, or a torchvision ImageFolder), in its
    own (sorted) order; the labels index the train split's class list."""
    return [str(Path(p)) for p, _ in dataset.samples], [int(t) for _, t in dataset.samples]
