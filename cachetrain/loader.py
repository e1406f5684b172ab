"""The cache loader: batches of cached features in any traversal order, from whole-chunk reads.

Chunks are read (and decompressed) by worker processes of a torch DataLoader, in the order the
epoch first needs them, and kept only until their last sample has gone into a batch. Batches are
gathered from the resident chunks into one tensor, moved to the device (pinned + non-blocking on
CUDA) and converted to float32 there. With the quasi-random order, memory holds about a window of
chunks plus the prefetch; any order works, a fully random one just keeps more chunks resident.

Resume state is (seed, epoch, start_batch): `train_batches(epoch, bs, start_batch)` yields exactly
the batches an uninterrupted epoch would have yielded from that point on.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cachetrain.augment import batch_rng, crop_flip
from cachetrain.cache.reader import CacheReader
from cachetrain.config import LoaderConfig
from cachetrain.orders import ORDERS

Batch = tuple[torch.Tensor, torch.Tensor]


class _Chunks(Dataset):
    """Item c is (c, chunk c decoded): what one worker process produces at a time."""

    def __init__(self, reader: CacheReader):
        self.reader = reader

    def __len__(self) -> int:
        return self.reader.info.num_chunks

    def __getitem__(self, c: int) -> tuple[int, torch.Tensor]:
        return c, self.reader.read_chunk(c)


class CacheLoader:
    def __init__(self, reader: CacheReader, device: torch.device, workers: int = 1, prefetch_chunks: int = 4):
        self.reader, self.device = reader, device
        self.workers, self.prefetch = workers, prefetch_chunks
        self.labels = torch.from_numpy(reader.labels)

    def batches(self, indices: np.ndarray, batch_size: int) -> Iterator[Batch]:
        """Yield (x float32 (B, C, H, W), y int64 (B,)) on the device for `indices` taken batch_size at a time."""
        cs = self.reader.info.chunk_samples
        chunk_of = indices // cs
        # chunks in order of first use; each is evicted after the batch holding its last use
        first_use = np.unique(chunk_of, return_index=True)[1]
        need = chunk_of[np.sort(first_use)]
        last_batch = np.zeros(self.reader.info.num_chunks, dtype=np.int64)
        last_batch[chunk_of] = np.arange(len(indices)) // batch_size  # later positions overwrite earlier ones
        stream = iter(DataLoader(_Chunks(self.reader), sampler=need.tolist(), batch_size=None,
                                 num_workers=self.workers, prefetch_factor=self.prefetch if self.workers else None))
        resident: dict[int, torch.Tensor] = {}
        pin = self.device.type == "cuda"
        for b, start in enumerate(range(0, len(indices), batch_size)):
            idx, chunks = indices[start:start + batch_size], chunk_of[start:start + batch_size]
            while not all(int(c) in resident for c in np.unique(chunks)):
                c, data = next(stream)
                resident[c] = data
            x = torch.empty((len(idx), *self.reader.info.sample_shape), dtype=self.reader.torch_dtype, pin_memory=pin)
            for c in np.unique(chunks):
                rows = np.nonzero(chunks == c)[0]
                x[torch.from_numpy(rows)] = resident[int(c)][torch.from_numpy(idx[rows] - c * cs)]
                if last_batch[c] == b:
                    del resident[int(c)]
            y = self.labels[torch.from_numpy(idx)]
            yield (x.to(self.device, non_blocking=True).float(), y.to(self.device, non_blocking=True))


class CacheSource:
    """Stage j's input when it is stage j-1's cache: the same interface as the image datasets."""

    def __init__(self, train: CacheReader, test: CacheReader, cfg: LoaderConfig, seed: int, device: torch.device,
                 crop_padding: int = 0, flip: bool = False, num_classes: int | None = None):
        self.readers = {"train": train, "test": test}
        self.loaders = {s: CacheLoader(r, device, cfg.workers, cfg.prefetch_chunks) for s, r in self.readers.items()}
        info = train.info
        self.order = ORDERS[cfg.order](info.num_samples, info.chunk_samples, cfg.window_chunks, seed)
        self.sample_shape = info.sample_shape
        self.fingerprint = info.fingerprint
        self.num_classes = num_classes or int(train.labels.max()) + 1
        self.seed, self.padding, self.flip = seed, crop_padding, flip

    def num_samples(self, split: str) -> int:
        return self.readers[split].info.num_samples

    def labels(self, split: str) -> np.ndarray:
        return self.readers[split].labels

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.num_samples("train") // batch_size)

    def train_batches(self, epoch: int, batch_size: int, start_batch: int = 0) -> Iterator[Batch]:
        indices = self.order.indices(epoch)[start_batch * batch_size:]
        for b, (x, y) in enumerate(self.loaders["train"].batches(indices, batch_size), start=start_batch):
            yield crop_flip(x, self.padding, self.flip, batch_rng(self.seed, epoch, b)), y

    def eval_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        yield from self.loaders[split].batches(np.arange(start, self.num_samples(split)), batch_size)
