"""Where a cache loader's chunks come from: a `ChunkFeed` hands out whole chunks of a store as tensors
of the storage dtype, (n_c, C, H, W), and is told when the loader is done with one.

- `MemmapFeed`: uncompressed chunk files, memory-mapped; no decode, no copy until the gather.
- `WorkerFeed`: compressed chunks decoded by the worker processes of a torch DataLoader (`_Chunks`,
  `ChunkOrder`), arriving in the order the epoch first needs them; each is dropped after the batch
  holding its last sample (zarr's own thread pool did not scale on this machine; processes did).
- `RecentFeed`: chunks decoded in the calling process, the few most recently used kept, for readers
  that get batches in an order they do not control (DALI's parallel workers).

Every chunk a feed hands out was checked by the reader (crc32c and checksum manifest, see
cachetrain/cache/reader.py). A worker process that finds a chunk corrupt returns the CacheError as
its item instead of raising it (torch would re-raise it wrapped, with the worker's traceback in the
message), and `WorkerFeed` raises it, as one line, when the loader asks for that chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cachetrain.cache.manifest import CacheError
from cachetrain.cache.reader import CacheReader


class ChunkFeed(Protocol):
    def get(self, c: int) -> torch.Tensor:
        """Chunk c, (n_c, C, H, W) in the storage dtype."""

    def release(self, c: int) -> None:
        """The loader reads nothing more from chunk c this epoch."""

    def will_need(self, c: int) -> bool:
        """Chunk c will be read soon: start fetching it, without waiting. True if that asked for a read
        now (False: already asked, or nothing to ask)."""


class MemmapFeed:
    """Chunks of uncompressed stores, mapped on demand; the page cache is the only buffer. One feed
    serves one epoch: the first time it meets a chunk, the reader checks that the file it keeps mapped
    is still the one it checked (a stat)."""

    def __init__(self, readers: list[CacheReader], view_of: np.ndarray):
        self.readers, self.view_of = readers, view_of
        self._seen: set[int] = set()

    def _reader(self, c: int) -> CacheReader:
        reader = self.readers[self.view_of[c]]
        if c not in self._seen:
            self._seen.add(c)
            reader.recheck(c)
        return reader

    def get(self, c: int) -> torch.Tensor:
        return self._reader(c).chunk_view(c)

    def release(self, c: int) -> None:
        pass  # mappings stay for the next epoch (remapping costs a page fault per page); the reader caps them

    def will_need(self, c: int) -> bool:
        return self._reader(c).will_need(c)


class RecentFeed:
    """Decoded chunks in the calling process, keeping the `keep` most recently used."""

    def __init__(self, reader: CacheReader, keep: int = 8):
        self.reader, self.keep = reader, keep
        self._recent: dict[int, torch.Tensor] = {}

    def get(self, c: int) -> torch.Tensor:
        if c in self._recent:
            self._recent[c] = self._recent.pop(c)  # most recent last
        else:
            self._recent[c] = self.reader.chunk_view(c)
            while len(self._recent) > self.keep:
                self._recent.pop(next(iter(self._recent)))
        return self._recent[c]

    def release(self, c: int) -> None:
        pass

    def will_need(self, c: int) -> bool:
        return False


class _Chunks(Dataset):
    """Item (v, c) is (c, chunk c of view v, decoded): what one worker process produces at a time; or
    (c, the CacheError) when the chunk is corrupt or missing."""

    def __init__(self, readers: list[CacheReader]):
        self.readers = readers

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, torch.Tensor | CacheError]:
        v, c = item
        try:
            return c, self.readers[v].read_chunk(c)
        except CacheError as e:  # as data: raised by WorkerFeed in the loader's process, one line
            return c, CacheError(str(e))


class ChunkOrder(Sampler):
    """The (view, chunk) pairs an epoch decodes, in first-use order. One DataLoader keeps its worker
    processes across epochs (`persistent_workers`) and takes each epoch's order from here: restarting
    them every epoch paid process start-up and a cold first decode at the start of every epoch."""

    def __init__(self):
        self.items: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class WorkerFeed:
    """Decoded chunks from a stream of (chunk, data) arriving in first-use order."""

    def __init__(self, stream: Iterator[tuple[int, torch.Tensor]]):
        self._stream = stream
        self._resident: dict[int, torch.Tensor] = {}

    def get(self, c: int) -> torch.Tensor:
        while c not in self._resident:
            got, data = next(self._stream)
            self._resident[got] = data
        data = self._resident[c]
        if isinstance(data, CacheError):
            raise CacheError(str(data)) from None
        return data

    def release(self, c: int) -> None:
        self._resident.pop(c, None)

    def will_need(self, c: int) -> bool:
        return False  # the worker processes decode ahead in first-use order already
