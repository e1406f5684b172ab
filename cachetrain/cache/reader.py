"""Opening a cache store for reading: whole chunks only, never single samples.

A random sample-level read through zarr decodes a whole chunk per sample (measured ~100x slower
than a memmap here), so the unit of reading is the chunk; the loader does the shuffling.
"""

from __future__ import annotations

import mmap
import resource
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import zarr

from cachetrain.cache.manifest import DTYPES, CacheError, CacheState, StoreInfo, chunk_file, store_state
from cachetrain.cache.quant import dequantize


MAX_MAPS = 8192  # an mmap each: far below the kernel's vm.max_map_count


def _max_maps() -> int:
    """Mappings one reader keeps. Before Python 3.13 an mmap holds an open file descriptor, so a store of
    more chunks than the soft limit on open files (often 1024) would fail with EMFILE: the soft limit is
    raised to the hard one where it may be, and each reader keeps at most an eighth of it."""
    if sys.version_info >= (3, 13):
        return MAX_MAPS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return MAX_MAPS if soft == resource.RLIM_INFINITY else max(16, min(MAX_MAPS, soft // 8))


class CacheReader:
    """A COMPLETE store whose fingerprint matches `expected_fingerprint` (when given)."""

    def __init__(self, path: Path, expected_fingerprint: str | None = None, rebuild_hint: str = ""):
        self.path = Path(path)
        state, info = store_state(self.path, expected_fingerprint)
        hint = f"; {rebuild_hint}" if rebuild_hint else ""
        if state is CacheState.ABSENT:
            raise CacheError(f"{self.path}: cache store not found{hint}")
        if state is CacheState.WRITING:
            raise CacheError(f"{self.path}: cache store is incomplete (its writing was interrupted){hint}")
        if state is CacheState.STALE:
            found = info.fingerprint if info else "unknown"
            raise CacheError(f"{self.path}: stale cache: fingerprint {found} does not match the current "
                             f"checkpoint ({expected_fingerprint}){hint}")
        self.info: StoreInfo = info
        self._features: zarr.Array | None = None
        self._maps: OrderedDict[int, tuple[torch.Tensor, mmap.mmap]] = OrderedDict()  # chunk -> its mapping
        self._advised: set[int] = set()  # mapped chunks the kernel was asked to read ahead
        self._max_maps = _max_maps()
        self.labels = zarr.open_array(str(self.path / "labels"), mode="r")[:]  # (N,) int64, small

    @property
    def features(self) -> zarr.Array:
        # opened lazily, so a reader can be pickled into worker processes before its first read
        if self._features is None:
            self._features = zarr.open_array(str(self.path / "features"), mode="r")
        return self._features

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_features": None, "_maps": OrderedDict(), "_advised": set()}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.info.dtype][1]

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the storage dtype -> float32 features, on x's device (dequantising uint8)."""
        return dequantize(x, self.info.quant) if self.info.quant else x.float()

    def chunk_bounds(self, c: int) -> tuple[int, int]:
        cs = self.info.chunk_samples
        return c * cs, min((c + 1) * cs, self.info.num_samples)

    @property
    def memmappable(self) -> bool:
        """Uncompressed chunk files are the raw C-order bytes of the (padded) chunk followed by the 4-byte
        crc32c, so they can be mapped instead of decoded (checksums are then checked by `verify` only)."""
        return self.info.codec == "none"

    def chunk_path(self, c: int) -> Path:
        return chunk_file(self.path, self.features, c)

    def chunk_view(self, c: int) -> torch.Tensor:
        """Chunk c as a tensor: a zero-copy memory map for uncompressed stores, else decoded."""
        if not self.memmappable:
            return self.read_chunk(c)
        mapped = self._maps.get(c)
        if mapped is not None:
            self._maps.move_to_end(c)  # least recently used goes first
        else:
            start, stop = self.chunk_bounds(c)
            self._check_chunk(c)
            with open(self.chunk_path(c), "rb") as f:
                # private (copy-on-write): torch gets a writable view without a copy; nothing writes to it
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY,
                               **({"trackfd": False} if sys.version_info >= (3, 13) else {}))
            count = (stop - start) * int(np.prod(self.info.sample_shape))
            block = np.frombuffer(mm, dtype=DTYPES[self.info.dtype][0], count=count)
            mapped = self._maps[c] = (_as_tensor(block.reshape(stop - start, *self.info.sample_shape),
                                                 self.info.dtype), mm)
            while len(self._maps) > self._max_maps:
                self._advised.discard(self._maps.popitem(last=False)[0])
        return mapped[0]

    def will_need(self, c: int) -> bool:
        """Ask the kernel to start reading chunk c into the page cache, without waiting; True if it asked
        now. Once per mapping: after its first epoch a chunk stays in the page cache unless the store
        outgrows memory, and asking again walks every page of it for nothing (about 70 us per 4 MiB
        chunk here, estimated from a hand-timed loader harness)."""
        if not self.memmappable or c in self._advised or not hasattr(mmap, "MADV_WILLNEED"):
            return False
        self.chunk_view(c)  # maps it (and names a missing or short chunk file)
        self._maps[c][1].madvise(mmap.MADV_WILLNEED)
        self._advised.add(c)
        return True

    def _check_chunk(self, c: int) -> None:
        """zarr would read a missing chunk as zeros, and a short file maps garbage: a store that lost or
        truncated a chunk file must say so instead."""
        path = self.chunk_path(c)
        try:
            size = path.stat().st_size
            problem = None
        except FileNotFoundError:
            problem = "is missing"
        if problem is None and self.memmappable and size != self.info.raw_chunk_file_bytes:
            # mapped, not decoded: no checksum would catch a short file
            problem = f"is {size} bytes, expected {self.info.raw_chunk_file_bytes} ({path})"
        if problem:
            start, stop = self.chunk_bounds(c)
            raise CacheError(f"{self.path}: chunk {c} (samples {start}-{stop - 1}) {problem}; run: cachetrain "
                             f"verify, then cachetrain cache --j {self.info.stage} --repair")

    def read_chunk(self, c: int) -> torch.Tensor:
        """Chunk c as a (n_c, C, H, W) tensor of the storage dtype."""
        start, stop = self.chunk_bounds(c)
        self._check_chunk(c)
        return _as_tensor(np.ascontiguousarray(self.features[start:stop]), self.info.dtype)


def _as_tensor(block: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(block)
