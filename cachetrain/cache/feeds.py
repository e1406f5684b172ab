"""Where a cache loader's chunks come from: a `ChunkFeed` hands out whole chunks of a store as tensors
of the storage dtype, (n_c, C, H, W), and is told when the loader is done with one.

- `MemmapFeed`: uncompressed chunk files, memory-mapped; no decode, no copy until the gather.
- `WorkerFeed`: compressed chunks decoded by the worker processes of a torch DataLoader (`_Chunks`,
  `ChunkOrder`), arriving in the order the epoch first needs them; each is dropped after the batch
  holding its last sample (zarr's own thread pool did not scale on this machine; processes did).
- `RecentFeed`: chunks decoded in the calling process, the few most recently used kept, for readers
  that get batches in an order they do not control (DALI's parallel workers).
- `ReadAheadFeed`: `MemmapFeed` with the chunk files asked of the disk `READ_AHEAD_BYTES` ahead of the
  loader, in the order the epoch first uses them (what a cold page cache needs; see its docstring).
- `ReadFeed`: uncompressed chunk files read whole, one large read each, by a few threads, the same
  distance ahead: the alternative to faulting pages through a mapping, measured against it by
  benchmarks/disk_bench.py; and the feed of every remote store (one GET per chunk object, several in
  flight, checked and decoded in those threads).

Every chunk a feed hands out was checked by the reader (crc32c and checksum manifest, see
cachetrain/cache/reader.py). A worker process that finds a chunk corrupt returns the CacheError as
its item instead of raising it (torch would re-raise it wrapped, with the worker's traceback in the
message), and `WorkerFeed` raises it, as one line, when the loader asks for that chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
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


# How far ahead of the loader, in bytes of chunk files taken in first-use order, ReadAheadFeed and
# ReadFeed ask the disk. The loader's own one-batch read-ahead is two batches' bytes: short when samples
# are small (batch 256 of 32 KiB samples: 16 MiB). On the 2-core machine's virtual disk, cold, a
# quasi-random epoch of such a 2 GiB store read 724 MB/s with that alone and 942 MB/s with this 64 MiB
# read-ahead (benchmarks/disk_bench.py, medians of 3 alternating rounds, 2026-12-02; the raw file of that run
# is in commit 86364b6; the 2026-12-04 run printed 1,234 MB/s with it);
# a hand-timed sweep found 32 to 256 MiB alike and 16 MiB short of them. From a warm page cache it cost
# nothing measurable (0.98x, within the noise). What is read ahead waits in the page cache, not in this
# process: it only has to stay small against free memory, so that a store bigger than RAM does not
# evict its own read-ahead.
READ_AHEAD_BYTES = 64 * 2**20
# How uncompressed chunk files reach the loader (`file_feed`): "mmap" (ReadAheadFeed) or "read"
# (ReadFeed). Only benchmarks/disk_bench.py sets "read", to measure one against the other.
FILE_READS = "mmap"


class _Schedule:
    """The chunks an epoch reads, in order of first use, and how far the disk has been asked ahead."""

    def __init__(self, schedule: list[int], chunk_bytes: int, ahead_bytes: int | None):
        self.order = [int(c) for c in schedule]
        self.position = {c: i for i, c in enumerate(self.order)}
        self.ahead = -(-(READ_AHEAD_BYTES if ahead_bytes is None else ahead_bytes) // chunk_bytes)
        self.asked = 0  # order[:asked] have been asked for

    def due(self, c: int) -> list[int]:
        """The chunks to ask for now that the loader has reached chunk c: up to `ahead` past it."""
        i = self.position.get(c)
        if i is None or self.ahead <= 0:
            return []
        stop = min(len(self.order), i + 1 + self.ahead)
        due, self.asked = self.order[self.asked:stop], max(self.asked, stop)
        return due


class ReadAheadFeed(MemmapFeed):
    """`MemmapFeed` whose chunk files the kernel is asked for (`CacheReader.advise`, posix_fadvise
    WILLNEED) READ_AHEAD_BYTES ahead of the loader, in the order the epoch first uses them. The loader's
    own `will_need` asks one batch ahead, which keeps too few reads in flight to keep a disk busy when
    the page cache is cold (see READ_AHEAD_BYTES); from a warm page cache the ask finds every page
    present and reads nothing."""

    def __init__(self, readers: list[CacheReader], view_of: np.ndarray, schedule: list[int],
                 ahead_bytes: int | None = None):
        super().__init__(readers, view_of)
        self._schedule = _Schedule(schedule, readers[0].info.raw_chunk_file_bytes, ahead_bytes)

    def _ahead(self, c: int) -> None:
        for d in self._schedule.due(c):
            self.readers[self.view_of[d]].advise(d)

    def get(self, c: int) -> torch.Tensor:
        self._ahead(c)
        return super().get(c)

    def will_need(self, c: int) -> bool:
        self._ahead(c)
        return super().will_need(c)


class ReadFeed:
    """Uncompressed chunk files read whole into memory of their own (`CacheReader.read_chunk_file`: one
    large read each, checked before it is handed out) by `threads` threads, READ_AHEAD_BYTES (at least
    one chunk) ahead in first-use order; each dropped after the batch holding its last sample, so it
    holds the read-ahead and the chunks in use. A context manager: leaving it stops the reads still
    queued. Not the default: cold it read no faster than the mapped files with the same read-ahead
    (735 against 942 MB/s in the same benchmark run), and warm it copies every chunk once more."""

    def __init__(self, readers: list[CacheReader], view_of: np.ndarray, schedule: list[int], threads: int = 4,
                 ahead_bytes: int | None = None):
        self.readers, self.view_of = readers, view_of
        chunk_bytes = readers[0].info.raw_chunk_file_bytes
        self._schedule = _Schedule(schedule, chunk_bytes, max(chunk_bytes, READ_AHEAD_BYTES if ahead_bytes is None
                                                                      else ahead_bytes))
        for reader in readers:
            reader.features  # noqa: B018 - opens the zarr array here, not in several threads at once
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cache-read")
        self._pending: dict[int, Future] = {}

    def _ahead(self, c: int) -> None:
        for d in self._schedule.due(c):
            self._pending[d] = self._pool.submit(self.readers[self.view_of[d]].read_chunk_file, d)

    def get(self, c: int) -> torch.Tensor:
        self._ahead(c)
        pending = self._pending.get(c)
        if pending is None:  # not in the schedule, or asked for again after its release
            pending = self._pending[c] = self._pool.submit(self.readers[self.view_of[c]].read_chunk_file, c)
        return pending.result()  # a corrupt chunk's CacheError is raised here

    def release(self, c: int) -> None:
        self._pending.pop(c, None)

    def will_need(self, c: int) -> bool:
        self._ahead(c)
        return False

    def __enter__(self) -> ReadFeed:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


# GETs in flight at once for a remote store's epoch (`ReadFeed`): an object store answers each request
# after a round trip, so throughput comes from requests in parallel; the same READ_AHEAD_BYTES bound
# what is held (benchmarks/s3_bench.py measures it against the local disk)
REMOTE_THREADS = 8


def file_feed(readers: list[CacheReader], view_of: np.ndarray, schedule: list[int]
              ) -> AbstractContextManager[ChunkFeed]:
    """The feed of an uncompressed store's epoch, or any remote store's, that first uses its chunks in
    `schedule` order (FILE_READS picks which for local files; remote objects are always read whole, one
    GET each, several in flight: `CacheReader.fetch_chunk`)."""
    if readers[0].remote:
        return ReadFeed(readers, view_of, schedule, threads=REMOTE_THREADS)
    if FILE_READS == "read":
        return ReadFeed(readers, view_of, schedule)
    return nullcontext(ReadAheadFeed(readers, view_of, schedule))
