"""Stage j's input when it is stage j-1's cache: a `Source` (cachetrain/source.py) over the cache
loader (numpy or DALI), with the traversal order, the views and the feature-space augmentation.
Its splits are the cache's stores: the training views, the test store and, when the run has a
validation split, the val store (without one, "val" has no samples)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cachetrain.augment import batch_rng, crop_flip
from cachetrain.cache.loader import Batch, CacheLoader
from cachetrain.cache.reader import CacheReader
from cachetrain.config import ConfigError, LoaderConfig
from cachetrain.dist import Shard
from cachetrain.orders import ORDERS
from cachetrain.source import train_plan


class CacheSource:
    """Stage j's input when it is stage j-1's cache: the same interface as the image datasets.
    `train` may be a list of V views of the training split; each epoch reads every chunk of samples
    from one view, drawn from (seed, epoch)."""

    def __init__(self, train: CacheReader | list[CacheReader], test: CacheReader, cfg: LoaderConfig, seed: int,
                 device: torch.device, crop_padding: int = 0, flip: bool = False, num_classes: int | None = None,
                 val: CacheReader | None = None, shard: Shard = Shard()):
        views = train if isinstance(train, list) else [train]
        train = views[0]
        self.views = len(views)
        self.readers = {"train": train, "test": test, **({"val": val} if val is not None else {})}
        self.loaders = {"train": CacheLoader(views, device, cfg.workers, cfg.prefetch_chunks),
                        **{split: CacheLoader(self.readers[split], device, cfg.workers, cfg.prefetch_chunks)
                           for split in ("val", "test") if split in self.readers}}
        info = train.info
        # under torchrun each rank reads its own whole chunks of a permutation all ranks share (cachetrain.orders)
        self.order = ORDERS[cfg.order](info.num_samples, info.chunk_samples, cfg.window_chunks, seed, shard.rank,
                                       shard.world)
        self.shard = shard
        self.sample_shape = info.sample_shape
        self.fingerprint = info.fingerprint
        self.num_classes = num_classes or int(train.labels.max()) + 1
        self.seed, self.padding, self.flip = seed, crop_padding, flip
        self.dali = None
        if cfg.backend == "dali":
            from cachetrain.cache.dali_feed import DaliFeatureLoader
            if shard.world > 1:
                raise ConfigError("loader.backend: expected 'numpy' or 'auto' under torchrun (the DALI feature loader "
                                  "batches one process's order), got 'dali'")
            if self.views > 1:
                raise ConfigError("loader.backend: expected 'numpy' or 'auto' with cache.views > 1 (the DALI loader "
                                  "reads one view), got 'dali'")
            self.dali = DaliFeatureLoader(train, self.order, device, cfg.workers, seed, crop_padding, flip)

    def num_samples(self, split: str) -> int:
        if split == "val" and "val" not in self.readers:  # the run has no validation split
            return 0
        return self.readers[split].info.num_samples

    def labels(self, split: str) -> np.ndarray:
        if split == "val" and "val" not in self.readers:
            return np.zeros(0, dtype=np.int64)
        return self.readers[split].labels

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.num_samples("train") // batch_size)

    def share_sizes(self, epoch: int) -> list[int]:
        return self.order.share_sizes(epoch)

    def train_indices(self, epoch: int, batch_size: int, start_batch: int = 0) -> np.ndarray:
        return self.order.indices(epoch)[start_batch * batch_size:]

    def train_batches(self, epoch: int, batch_size: int, start_batch: int = 0, augment: bool = True) -> Iterator[Batch]:
        if self.dali is not None:
            yield from self.dali.train_batches(epoch, batch_size, start_batch)
            return
        view_of = self.view_of(epoch)
        if self.shard.world == 1:
            batches = self.loaders["train"].batches(self.train_indices(epoch, batch_size, start_batch), batch_size,
                                                    view_of)
        else:
            plan = train_plan(self.order.indices(epoch), batch_size, self.steps_per_epoch(batch_size), self.shard,
                              self.order.smallest_share(), chunked=True)
            batches = self.loaders["train"].batches(None, batch_size, view_of, plan=plan[start_batch:])
        for b, (x, y) in enumerate(batches, start=start_batch):
            rng = batch_rng(self.seed, epoch, b, self.shard.rank)
            yield (crop_flip(x, self.padding, self.flip, rng) if augment else x), y

    def view_of(self, epoch: int) -> np.ndarray:
        """The view each chunk is read from in this epoch (all 0 with one view)."""
        n = self.readers["train"].info.num_chunks
        if self.views == 1:
            return np.zeros(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch, 0x71E]).integers(0, self.views, size=n)

    def eval_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        """Plain batches in sample order (training split: view 0, the unaugmented pass); none from an empty split."""
        if start >= self.num_samples(split):
            return
        yield from self.loaders[split].batches(np.arange(start, self.num_samples(split)), batch_size)
