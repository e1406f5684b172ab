"""Opening a cache store for reading: whole chunks only, never single samples.

A random sample-level read through zarr decodes a whole chunk per sample (measured ~100x slower
than a memmap here), so the unit of reading is the chunk; the loader does the shuffling.

Checked reads: no chunk reaches a batch before its crc32c is checked (the 4 bytes zarr's Crc32cCodec
appends to every chunk file), and its trailing crc is compared with the store's checksum manifest
(manifest.py), so a chunk file swapped or rewritten behind the store's back is refused too. A failure
is a CacheError naming the store, the chunk, its samples and the repair command.
- memory-mapped (uncompressed) chunks are hashed here (google_crc32c, the C implementation zarr
  itself uses) when first used after mapping; will_need maps without hashing, so a chunk read ahead
  arrives from disk while the step before runs;
- uncompressed chunk files read whole into memory (`read_chunk_file`, the ReadFeed's path) are hashed
  the same way before they are returned;
- decoded (zstd) chunks are checked by zarr's decode, which fails on a mismatch; that failure becomes
  the same one-line CacheError (worker processes hand it back as data, cachetrain/cache/feeds.py).
Each process checks a chunk file once: the check is recorded against the file's identity (device,
inode, size, mtime_ns, and the manifest's crc), so a chunk evicted and mapped again is not hashed again,
while a file replaced or rewritten since is. A loader asks for that identity again once per epoch for
the chunks it keeps mapped (`recheck`, a stat each).

`VERIFY` switches the checks off; only benchmarks/loader_bench.py does that, to measure what they cost.
"""

from __future__ import annotations

import mmap
import os
import resource
import sys
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import google_crc32c
from numcodecs import Zstd
import numpy as np
import torch
import zarr

from cachetrain.cache.copies import LocalCopies
from cachetrain.errors import Fix
from cachetrain.cache.location import RemotePath, is_remote, location, raise_if_transport, zarr_store
from cachetrain.cache.manifest import (CacheError, CacheState, StoreInfo, chunk_file, damage, digest_of, labels_file,
                                       metadata_problem, read_manifest, recorded_stage, store_state,
                                       trailing_crc32c)


_ZSTD = Zstd()  # decodes what zarr's ZstdCodec wrote (it wraps the same numcodecs codec); level: encode only
MAX_MAPS = 8192  # an mmap each: far below the kernel's vm.max_map_count
VERIFY = True  # check every chunk before use (module docstring); False only in benchmarks/loader_bench.py

# store path -> per chunk, the identity (`_identity`) of the file last found good in this process; 0: none
_verified: dict[str, np.ndarray] = {}


def _identity(st: os.stat_result, expected: int | None) -> int:
    """One int64 for a chunk file's identity and the crc the manifest expects of it (never 0)."""
    return hash((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, expected)) or 1


def forget_checks() -> None:
    """Forget which chunk files this process has checked (benchmarks measure a first epoch with it)."""
    _verified.clear()


class _Mapping(NamedTuple):
    tensor: torch.Tensor
    mm: mmap.mmap
    file: str
    identity: int


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

    def __init__(self, path: Path, expected_fingerprint: str | None = None, rebuild: Fix | None = None,
                 copies: LocalCopies | None = None):
        """`rebuild`: the command that rebuilds a store that is absent, incomplete or stale, to suggest;
        `copies`: where a remote store's chunk objects are kept on a local disk once fetched
        (cachetrain/cache/copies.py); ignored for a local store."""
        self.path = location(path)  # a local folder, or an object store's (cachetrain/cache/location.py)
        self.remote = is_remote(self.path)
        state, info = store_state(self.path, expected_fingerprint)
        hint = (rebuild,) if rebuild else ()
        if info is None and self.path.exists():
            if state is CacheState.DAMAGED:  # its metadata disagrees with its record: a repair rebuilds it
                stage = recorded_stage(self.path)
                hint = (Fix.of("cache", j=stage, repair=True),) if stage is not None else hint
            raise CacheError(f"{self.path}: {metadata_problem(self.path) or 'store metadata missing'}", *hint)
        if state is CacheState.ABSENT:
            raise CacheError(f"{self.path}: cache store not found", *hint)
        if state is CacheState.WRITING:
            raise CacheError(f"{self.path}: cache store is incomplete (its writing was interrupted)", *hint)
        if state is CacheState.STALE:
            found = info.fingerprint if info else "unknown"
            raise CacheError(f"{self.path}: stale cache: fingerprint {found} does not match the current "
                             f"checkpoint ({expected_fingerprint})", *hint)
        self.info: StoreInfo = info
        self.repair = Fix.of("cache", j=info.stage, repair=True)
        # a chunk found bad while training: verify names every other bad one, then the repair recomputes them
        self.verify_then_repair = (Fix.of("verify"), self.repair)
        if state is CacheState.DAMAGED:
            raise CacheError(f"{self.path}: cache store is damaged: {damage(self.path, info) or 'a file is missing'}",
                             self.repair)
        self._features: zarr.Array | None = None
        self._maps: OrderedDict[int, _Mapping] = OrderedDict()  # chunk -> its mapping
        self._advised: set[int] = set()  # mapped chunks the kernel was asked to read ahead
        self._unchecked: set[int] = set()  # mapped chunks whose crc32c is still to be checked
        self._checked: np.ndarray | None = None  # this process's record (`_verified`) for this store
        self._max_maps = _max_maps()
        try:
            self.manifest = read_manifest(self.path, info)  # (num_chunks + 1,) uint32, or None (an older store)
        except ValueError as e:
            raise CacheError(f"{self.path}: its checksum manifest is unreadable ({e})", self.repair) from None
        self.labels = self._read_labels()  # (N,) int64, small
        # keyed by the bytes the store holds (its manifest's digest): a rebuilt store gets new copies. A
        # store without a manifest (older than manifests) gets none: nothing would tell a stale copy apart
        self.copies = copies if self.remote and self.manifest is not None else None
        if self.copies is not None:
            self._copies_folder = self.copies.store_folder(str(self.path), digest_of(self.manifest))

    def _read_labels(self) -> np.ndarray:
        try:
            file = labels_file(self.path)
            labels = zarr.open_array(zarr_store(self.path / "labels", read_only=True), mode="r")[:]  # crc checked
            crc = trailing_crc32c(file)
        except CacheError:  # an object store that did not answer: not a corrupt file
            raise
        except Exception as e:  # noqa: BLE001 - a decode or checksum failure, a file gone
            raise_if_transport(e, self.path, "reading its labels")
            raise CacheError(f"{self.path}: labels are corrupt ({_reason(e)})", self.repair) from None
        if VERIFY and self.manifest is not None and crc != int(self.manifest[-1]):
            raise CacheError(f"{self.path}: labels are corrupt: they differ from the store's checksum manifest "
                             f"({file})", self.repair)
        return labels

    @property
    def features(self) -> zarr.Array:
        # opened lazily, so a reader can be pickled into worker processes before its first read
        if self._features is None:
            self._features = zarr.open_array(zarr_store(self.path / "features", read_only=True), mode="r")
        return self._features

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_features": None, "_maps": OrderedDict(), "_advised": set(), "_unchecked": set(),
                "_checked": None}

    @property
    def checked(self) -> np.ndarray:
        """This process's record of which chunk files were found good (shared by its readers of the store)."""
        if self._checked is None:
            key = str(self.path.resolve())
            record = _verified.get(key)
            if record is None or len(record) != self.info.num_chunks:
                record = _verified[key] = np.zeros(self.info.num_chunks, dtype=np.int64)
            self._checked = record
        return self._checked

    def expected_crc(self, c: int) -> int | None:
        """The crc32c the checksum manifest records for chunk c's file (None: the store has no manifest)."""
        return None if self.manifest is None else int(self.manifest[c])

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.info.storage_format.torch_dtype

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the storage dtype (or a float32 copy of one) -> float32 features, on x's device
        (dequantising uint8, in place on a float32 copy)."""
        return self.info.storage_format.decode(x, self.info.quant)

    def chunk_bounds(self, c: int) -> tuple[int, int]:
        cs = self.info.chunk_samples
        return c * cs, min((c + 1) * cs, self.info.num_samples)

    @property
    def memmappable(self) -> bool:
        """Uncompressed chunk files are the raw C-order bytes of the (padded) chunk followed by the 4-byte
        crc32c, so they can be mapped instead of decoded (the crc32c is then checked here, not by zarr)."""
        return self.info.codec == "none" and not self.remote

    def chunk_path(self, c: int) -> Path:
        return chunk_file(self.path, self.features, c)

    def chunk_view(self, c: int) -> torch.Tensor:
        """Chunk c as a tensor: a zero-copy memory map for uncompressed stores, else decoded; checked
        either way (module docstring)."""
        if not self.memmappable:
            return self.read_chunk(c)
        mapped = self._maps.get(c)
        if mapped is not None:
            self._maps.move_to_end(c)  # least recently used goes first
        else:
            mapped = self._map(c)
        if c in self._unchecked:
            self._check_mapped(c, mapped)
        return mapped.tensor

    def _map(self, c: int) -> _Mapping:
        """Map chunk c's file (not yet hashed: `chunk_view` does that on first use, unless this process
        already found this very file good)."""
        start, stop = self.chunk_bounds(c)
        file, st = self._stat_chunk(c)
        with open(file, "rb") as f:
            # private (copy-on-write): torch gets a writable view without a copy; nothing writes to it
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY,
                           **({"trackfd": False} if sys.version_info >= (3, 13) else {}))
        count = (stop - start) * int(np.prod(self.info.sample_shape))
        fmt = self.info.storage_format
        block = np.frombuffer(mm, dtype=fmt.numpy_dtype, count=count)
        mapped = self._maps[c] = _Mapping(fmt.as_tensor(block.reshape(stop - start, *self.info.sample_shape)),
                                          mm, file, _identity(st, self.expected_crc(c)))
        if VERIFY and self.checked[c] != mapped.identity:
            self._unchecked.add(c)
        while len(self._maps) > self._max_maps:
            self._drop(next(iter(self._maps)))
        return mapped

    def _drop(self, c: int) -> None:
        self._maps.pop(c, None)
        self._advised.discard(c)
        self._unchecked.discard(c)

    def _check_mapped(self, c: int, mapped: _Mapping) -> None:
        """Hash a mapped chunk file (payload + trailing crc32c) and compare with the manifest."""
        fault = chunk_fault(np.frombuffer(mapped.mm, dtype=np.uint8), self.info, self.expected_crc(c))
        if fault is not None:
            self._drop(c)
            raise self._corrupt(c, fault, mapped.file)
        self._unchecked.discard(c)
        self.checked[c] = mapped.identity

    def recheck(self, c: int) -> None:
        """Chunk c's file may have changed since it was mapped (once per epoch, a stat): a mapping of a
        file replaced or rewritten since is dropped, so the next use maps and checks the new one."""
        mapped = self._maps.get(c)
        if mapped is None or not VERIFY:
            return
        try:
            identity = _identity(os.stat(mapped.file), self.expected_crc(c))
        except FileNotFoundError:
            identity = 0
        if identity != mapped.identity:
            self._drop(c)

    def will_need(self, c: int) -> bool:
        """Ask the kernel to start reading chunk c into the page cache, without waiting; True if it asked
        now. Once per mapping: after its first epoch a chunk stays in the page cache unless the store
        outgrows memory, and asking again walks every page of it for nothing (about 70 us per 4 MiB
        chunk here, estimated from a hand-timed loader harness)."""
        if not self.memmappable or c in self._advised or not hasattr(mmap, "MADV_WILLNEED"):
            return False
        mapped = self._maps.get(c) or self._map(c)  # maps it (and names a missing or short chunk file)
        mapped.mm.madvise(mmap.MADV_WILLNEED)
        self._advised.add(c)
        return True

    def advise(self, c: int) -> None:
        """Ask the kernel to read chunk c's whole file into the page cache (posix_fadvise WILLNEED),
        without waiting and without mapping it: the cold read-ahead of `ReadAheadFeed` (feeds.py), which
        runs further ahead than the mappings are worth holding. A missing file is left to the read that
        needs it, which names it. (A remote store's read-ahead is `ReadFeed`'s GETs in flight.)"""
        if self.remote:
            return
        try:
            fd = os.open(self.chunk_path(c), os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def read_chunk_file(self, c: int) -> torch.Tensor:
        """Chunk c of an uncompressed store, read whole into memory of its own with one large read
        instead of page faults through a mapping (`ReadFeed`, feeds.py; benchmarks/disk_bench.py measures
        both cold), and checked as `chunk_view` checks it: its crc32c and the manifest's, unless this
        process already found this very file good. Compressed stores: `read_chunk`."""
        if not self.memmappable:
            return self.read_chunk(c)
        file, _ = self._stat_chunk(c)  # names a missing or short file
        with open(file, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())  # the identity of the file read, should it have been replaced since
            data = np.empty(st.st_size, dtype=np.uint8)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger kernel read-ahead window
            got = 0
            while got < len(data) and (n := f.readinto(memoryview(data)[got:])):
                got += n
        start, stop = self.chunk_bounds(c)
        if got != self.info.raw_chunk_file_bytes:
            raise CacheError(f"{self.path}: chunk {c} (samples {start}-{stop - 1}) is {got} bytes, expected "
                             f"{self.info.raw_chunk_file_bytes} ({file})", *self.verify_then_repair)
        identity = _identity(st, self.expected_crc(c))
        if VERIFY and self.checked[c] != identity:
            fault = chunk_fault(data, self.info, self.expected_crc(c))
            if fault is not None:
                raise self._corrupt(c, fault, file)
            self.checked[c] = identity
        fmt = self.info.storage_format
        block = data[:-4].view(fmt.numpy_dtype)[:(stop - start) * int(np.prod(self.info.sample_shape))]
        return fmt.as_tensor(block.reshape(stop - start, *self.info.sample_shape))

    def fetch_chunk(self, c: int) -> torch.Tensor:
        """Chunk c of a remote store: its object in one GET, checked here whatever the codec (its crc32c,
        then the manifest's: every time, as the bytes came over the network just now), then decoded.
        Thread-safe: `ReadFeed` keeps several GETs in flight."""
        start, stop = self.chunk_bounds(c)
        file = self.chunk_path(c)
        name = str(file.relative_to(self.path))
        data = None
        expected = self.expected_crc(c) if VERIFY else None
        if self.copies is not None:  # a local copy from an earlier epoch, checked as the object would be
            data = self.copies.get(self._copies_folder, name)
            if data is not None and VERIFY and chunk_fault(data, self.info, expected) is not None:
                self.copies.drop(self._copies_folder, name)  # torn or stale: fetch the object again
                data = None
        if data is None:
            try:
                # a writable copy (a memcpy against a network read): torch warns on read-only arrays
                data = np.frombuffer(bytearray(file.read_bytes()), dtype=np.uint8)
            except FileNotFoundError:
                raise CacheError(f"{self.path}: chunk {c} (samples {start}-{stop - 1}) is missing ({file})",
                                 *self.verify_then_repair) from None
            fault = chunk_fault(data, self.info, expected) if VERIFY else None
            if fault is not None:
                raise self._corrupt(c, fault, str(file))
            if self.copies is not None:
                self.copies.put(self._copies_folder, name, data)
        payload = data[:-4]
        if self.info.codec == "zstd":
            payload = np.empty(self.info.chunk_samples * self.info.sample_bytes, dtype=np.uint8)
            try:
                _ZSTD.decode(data[:-4], out=payload)
            except Exception as e:  # noqa: BLE001 - numcodecs raises RuntimeError or ValueError
                raise self._corrupt(c, f"zstd cannot decode it ({_reason(e)})", str(file)) from None
        fmt = self.info.storage_format
        count = (stop - start) * int(np.prod(self.info.sample_shape))
        block = payload.view(fmt.numpy_dtype)[:count]
        if len(block) != count:
            raise self._corrupt(c, f"it decodes to {len(block)} values, expected {count}", str(file))
        return fmt.as_tensor(block.reshape(stop - start, *self.info.sample_shape))

    def _stat_chunk(self, c: int) -> tuple[str, os.stat_result]:
        """Chunk c's file and its stat. zarr would read a missing chunk as zeros, and a short file maps
        garbage: a store that lost or truncated a chunk file must say so instead."""
        file = str(self.chunk_path(c))
        try:
            st = os.stat(file)
            problem = None
        except FileNotFoundError:
            problem = "is missing"
        if problem is None and self.memmappable and st.st_size != self.info.raw_chunk_file_bytes:
            # mapped, not decoded: no checksum would catch a short file
            problem = f"is {st.st_size} bytes, expected {self.info.raw_chunk_file_bytes} ({file})"
        if problem:
            start, stop = self.chunk_bounds(c)
            raise CacheError(f"{self.path}: chunk {c} (samples {start}-{stop - 1}) {problem}",
                             *self.verify_then_repair)
        return file, st

    def _corrupt(self, c: int, what: str, file: str) -> CacheError:
        start, stop = self.chunk_bounds(c)
        return CacheError(f"{self.path}: chunk {c} (samples {start}-{stop - 1}) is corrupt: {what} ({file})",
                          self.repair)

    def read_chunk(self, c: int) -> torch.Tensor:
        """Chunk c as a (n_c, C, H, W) tensor of the storage dtype, decoded by zarr (which checks its
        crc32c); its trailing crc is compared with the manifest once per file per process. A remote
        store's chunk: `fetch_chunk`."""
        if self.remote:
            return self.fetch_chunk(c)
        start, stop = self.chunk_bounds(c)
        file, st = self._stat_chunk(c)
        try:
            block = self.features[start:stop]
        except Exception as e:  # noqa: BLE001 - a checksum mismatch, a file zstd cannot decode: corrupt
            if isinstance(e, MemoryError):
                raise
            raise self._corrupt(c, _reason(e), file) from None
        expected = self.expected_crc(c)
        identity = _identity(st, expected)
        if VERIFY and self.checked[c] != identity:
            if expected is not None and trailing_crc32c(file) != expected:
                raise self._corrupt(c, DIFFERS_FROM_MANIFEST, file)
            self.checked[c] = identity
        return self.info.storage_format.as_tensor(np.ascontiguousarray(block))


DIFFERS_FROM_MANIFEST = "it differs from the store's checksum manifest"  # a chunk_fault verify reports apart


def chunk_fault(data: np.ndarray, info: StoreInfo, expected: int | None) -> str | None:
    """What is wrong with the whole bytes of one chunk file or object (uint8), in words, or None: its size
    (an uncompressed chunk has exactly `raw_chunk_file_bytes`), its trailing crc32c against its bytes, and
    that crc against `expected`, the manifest's (None: no manifest). Every checked read uses this, and so
    does `verify` for remote stores."""
    if len(data) <= 4 or (info.codec == "none" and len(data) != info.raw_chunk_file_bytes):
        return f"it is {len(data)} bytes"
    stored = int.from_bytes(data[-4:].tobytes(), "little")
    if google_crc32c.value(data[:-4]) != stored:
        return "its crc32c does not match its bytes"
    if expected not in (None, stored):
        return DIFFERS_FROM_MANIFEST
    return None


def _reason(e: BaseException) -> str:
    """A decode failure in a few words (zarr's checksum error quotes both crcs as bytes)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "checksum" in text.lower():
        return "its crc32c does not match its bytes"
    return text[:120]
