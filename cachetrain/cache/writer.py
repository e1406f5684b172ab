"""The caching pass: run a frozen stage over a whole split and write its outputs to a zarr store.

The forward pass runs in the calling thread; a background thread owns the store and writes whole
chunk groups as they arrive, so compression and I/O overlap the next batch's compute. Each chunk has
exactly one writer and is written exactly once, in full (partial-chunk writes would make zarr read,
modify and rewrite it). The forward batch is one "group" of whole chunks, always aligned at the same
sample offsets, so a resumed pass recomputes a missing group bit-identically.

A pass ends by recording the checksum manifest (the trailing crc32c of every chunk file and of the
labels, read back from the files) and setting `content_digest` with `complete` in one attribute update
(manifest.py), so a store resumed or repaired gets a manifest of what is on disk now.

Durability, at the disk's sequential speed: the writer thread only starts each chunk file's writeback as
it goes (`_Writeback`); every chunk file of the store, the labels, the metadata and the folders naming
them are fsynced together, on several threads, once the last chunk is written and before `complete` is
set. fsyncing each chunk as it was written cost a journal commit and a disk cache flush per file, one
at a time: the pass wrote at 0.09x of `dd` on this machine's disk (benchmarks/README.md, "Disk, cold").
"""

from __future__ import annotations

import ctypes
import os
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr

from cachetrain.dist import Dist
from cachetrain.durable import fsync_path
from cachetrain.cache.location import RemotePath, location, raise_if_transport, remove_tree, zarr_store
from cachetrain.cache.manifest import (CHECKSUMS, INFO_DIGEST, CacheState, Layout, StoreInfo, array_specs, chunk_file,
                                       digest_of, file_checksums, info_digest, labels_file, missing_chunks,
                                       store_state)
from cachetrain.device import autocast
from cachetrain.faults import fault_point
from cachetrain.stop import StopRequests
from cachetrain.threads import InBackground

Batches = Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # (start, batch_size) -> batches

WRITEBACK_AHEAD_BYTES = 64 * 2**20  # chunk bytes the disk may still be writing when the writer thread writes more
REMOTE_PUTS = 8  # chunk PUTs in flight at once to an object store
FSYNC_THREADS = 8  # the final fsyncs in flight at once: a journal commit then covers many files


class _Writeback:
    """Starts the disk writing each chunk file as soon as it is written, and keeps at most `ahead` bytes
    of them being written: the writer thread then waits for the oldest, so the disk writes while the next
    batches compute and the dirty pages stay bounded (left alone, the kernel holds writeback back until
    gigabytes are dirty, then writes it all during the final fsync). Linux's sync_file_range does this
    without a journal commit or a disk cache flush per file, which is what made per-chunk fsync slow. It is
    a hint, not durability: its errors are left to the final fsync, which reports them; where it does not
    exist (not Linux) the kernel decides when the pages are written."""

    _WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4  # SYNC_FILE_RANGE_* from <fcntl.h>

    def __init__(self, ahead: int):
        self._ahead, self._bytes = ahead, 0
        self._in_flight: deque[tuple[Path, int]] = deque()  # (file, its size): started, not yet waited for
        self._sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
        if self._sync_file_range is not None:
            self._sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def written(self, file: Path) -> None:
        """`file` is written in full: start its writeback; wait for the oldest files' while over `ahead`."""
        if self._sync_file_range is None:
            return
        size = self._range(file, self._WRITE)
        self._in_flight.append((file, size))
        self._bytes += size
        while self._bytes > self._ahead and len(self._in_flight) > 1:
            oldest, size = self._in_flight.popleft()
            self._bytes -= size
            self._range(oldest, self._WAIT_BEFORE | self._WRITE | self._WAIT_AFTER)

    def _range(self, file: Path, flags: int) -> int:
        fd = os.open(file, os.O_RDONLY)
        try:
            self._sync_file_range(fd, 0, 0, flags)  # 0, 0: the whole file
            return os.fstat(fd).st_size
        finally:
            os.close(fd)


def _byte_order(codec) -> str | None:
    """A bytes codec's byte order, "little" or "big" (None for one-byte dtypes, which have none). zarr 3.1
    holds it as an `Endian` enum and zarr 3.4 as the plain string (the enum is deprecated there): reading
    `.value` with the string as its own fallback answers both; a fixed fallback took 3.4's "big" for little."""
    endian = getattr(codec, "endian", None)
    return getattr(endian, "value", endian)


class _RawChunks:
    """Uncompressed chunks written straight to their files, byte for byte what zarr writes for them (the
    chunk's C-order little-endian bytes, the last chunk padded with the fill value 0, then the crc32c of
    those bytes, little-endian: the format reader.py maps), through a temp file renamed into place as
    zarr's local store does. zarr's encode and its event loop cost about 1 ms of CPU per 4 MiB chunk,
    which on two cores held the caching pass at 0.67x of `dd` (benchmarks/disk_bench.py, 2026-12-04);
    tests/test_cache.py checks the files equal zarr's own for every storage format."""

    def __init__(self, array: zarr.Array, chunk_path: Callable[[int], Path]):
        self._chunk_path = chunk_path
        self._chunk_samples = array.chunks[0]

    @staticmethod
    def fits(array: zarr.Array) -> bool:
        """Only the plain layout: bytes then crc32c, no filter, no compressor, default chunk keys."""
        meta = array.metadata
        codecs = [type(codec).__name__ for codec in getattr(meta, "codecs", ())]
        return (sys.byteorder == "little" and codecs == ["BytesCodec", "Crc32cCodec"]
                and _byte_order(meta.codecs[0]) in ("little", None)
                and all(c == array.shape[i] for i, c in enumerate(array.chunks) if i > 0)
                and meta.fill_value == 0)

    def write(self, start: int, block: np.ndarray) -> None:
        cs = self._chunk_samples
        for at in range(0, len(block), cs):
            part = block[at:at + cs]
            if len(part) < cs:  # the last chunk: zarr stores it whole, padded with the fill value
                padded = np.zeros((cs, *block.shape[1:]), dtype=block.dtype)
                padded[:len(part)] = part
                part = padded
            payload = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
            file = self._chunk_path((start + at) // cs)
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.name}.{uuid.uuid4().hex}.partial")
            try:
                with open(tmp, "wb") as f:
                    f.write(payload)
                    f.write(google_crc32c.value(payload).to_bytes(4, "little"))
                os.replace(tmp, file)
            except BaseException as e:
                tmp.unlink(missing_ok=True)
                if isinstance(e, OSError) and e.filename is None:  # write() names no file: a full disk must
                    e.filename = str(file)
                raise


class BackgroundWriter:
    """A thread that writes (start, array) blocks of whole chunks into a zarr array (cachetrain/threads.py:
    `put` blocks when `depth` blocks are pending, bounding memory, and re-raises the thread's error in the
    caller's thread; `close` waits for the pending blocks). One thread, because zarr encodes on one event
    loop per process: with crc32c it wrote about 0.9 GB/s on an H200 host whatever fed it
    (benchmarks/writer_bench.py).

    The same thread starts each chunk file's writeback right after writing it (`_Writeback`), so the disk
    writes while the next batches compute; it does not fsync: `write_store` fsyncs every chunk file, in
    parallel, before it marks the store complete (`_make_durable`)."""

    def __init__(self, array: zarr.Array, chunk_path: Callable[[int], Path] | None, depth: int = 3):
        """`chunk_path`: a chunk's local file, to start its writeback; None for an object store, where a
        chunk's PUT has stored it whole when it returns, and REMOTE_PUTS chunks are put at once: one at
        a time, a PUT's round trip left the server idle (0.19x the rate of the same objects put together,
        benchmarks/s3_bench.py on moto, by hand)."""
        self._array, self._chunk_path = array, chunk_path
        self._writeback = _Writeback(WRITEBACK_AHEAD_BYTES) if chunk_path is not None else None
        self._puts = ThreadPoolExecutor(REMOTE_PUTS, thread_name_prefix="cache-put") if chunk_path is None else None
        self._pending: deque[Future] = deque()  # chunk PUTs in flight, oldest first
        self._raw = _RawChunks(array, chunk_path) if chunk_path is not None and _RawChunks.fits(array) else None
        self._thread: InBackground[tuple[int, np.ndarray]] = InBackground(self._write, depth, name="cache-writer")

    @property
    def direct(self) -> bool:
        """Whether chunks are written straight to their files (`_RawChunks`: uncompressed, local), not by zarr."""
        return self._raw is not None

    def _write(self, item: tuple[int, np.ndarray]) -> None:
        start, block = item
        if self._puts is not None:
            cs = self._array.chunks[0]
            for at in range(0, len(block), cs):  # one chunk per PUT, each written by exactly one thread
                self._pending.append(self._puts.submit(self._write_chunks, start + at, block[at:at + cs]))
            while len(self._pending) > 2 * REMOTE_PUTS:  # bounded: the oldest must finish (or raise) first
                self._pending.popleft().result()
            return
        self._write_chunks(start, block)

    def _write_chunks(self, start: int, block: np.ndarray) -> None:
        cs = self._array.chunks[0]
        if self._raw is not None:
            self._raw.write(start, block)
        else:
            try:
                self._array[start:start + len(block)] = block
            except OSError as e:  # zarr's writes name no file: a full disk names the first chunk of the block
                if e.filename is None and self._chunk_path is not None:
                    e.filename = str(self._chunk_path(start // cs))
                raise
        for c in range(start // cs, -(-(start + len(block)) // cs)):
            if self._writeback is not None:
                self._writeback.written(self._chunk_path(c))
            fault_point("cache_chunk", str(self._array.store_path))  # fault points count chunks

    def put(self, start: int, block: np.ndarray) -> None:
        self._thread.put((start, block))

    def close(self) -> None:
        try:
            self._thread.close()
        finally:
            if self._puts is not None:
                try:
                    while self._pending:  # every PUT done, the first error raised, before `complete`
                        self._pending.popleft().result()
                finally:
                    self._puts.shutdown(wait=True, cancel_futures=True)


def _create(path: Path, info: StoreInfo, labels: np.ndarray) -> zarr.Group:
    remove_tree(path)
    # the record, and its digest: any attribute changed later no longer matches it (manifest.metadata_mismatch)
    group = zarr.open_group(zarr_store(path), mode="w",
                            attributes={**info.to_attrs(), "complete": False, INFO_DIGEST: info_digest(info)})
    group.create_array("features", **array_specs(info)["features"])  # what metadata_mismatch expects
    _write_labels(group, labels, info, create=True)
    return group


def _write_labels(group: zarr.Group, labels: np.ndarray, info: StoreInfo, create: bool = False) -> None:
    """The labels, always as a file: zarr skips (or deletes) a chunk equal to the fill value, and all-zero
    labels would then read back as zeros with no file for the checksum manifest to vouch for."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        if create:
            group.create_array("labels", **array_specs(info)["labels"])[:] = labels.astype(np.int64)
        else:
            group["labels"][:] = labels.astype(np.int64)  # opened under the setting: it is not stored


def _resumable(path: Path) -> bool:
    """The features and labels arrays' metadata is readable (a DAMAGED store may have lost it: rebuild then)."""
    try:
        zarr.open_array(zarr_store(path / "features", read_only=True), mode="r")
        zarr.open_array(zarr_store(path / "labels", read_only=True), mode="r")
        return True
    except Exception as e:  # noqa: BLE001
        raise_if_transport(e, path, "reading its metadata")  # not a reason to rebuild it
        return False


def write_store(path: Path, info: StoreInfo, labels: np.ndarray, stage: torch.nn.Module, batches: Batches,
                layout: Layout, device: torch.device, amp: bool = False,
                on_progress: Callable[[int], None] = lambda n: None, dist: Dist = Dist(),
                stop: StopRequests | None = None) -> int:
    """`_write_store`; on an object store, a request that failed after its retries (a PUT, a metadata read
    or write) is one line naming the store: the chunks written so far stay, and the same command resumes."""
    path = location(path)
    try:
        return _write_store(path, info, labels, stage, batches, layout, device, amp, on_progress, dist, stop)
    except Exception as e:  # noqa: BLE001 - only an object store's transport errors are translated
        raise_if_transport(e, path, "writing the store")
        if isinstance(e, OSError) and e.filename is None:  # zarr's metadata writes name no file: name the store
            e.filename = str(path)
        raise


def _write_store(path: Path, info: StoreInfo, labels: np.ndarray, stage: torch.nn.Module, batches: Batches,
                 layout: Layout, device: torch.device, amp: bool, on_progress: Callable[[int], None],
                 dist: Dist, stop: StopRequests | None) -> int:
    """Bring the store at `path` to COMPLETE for `info`, computing only the missing chunk groups.
    `batches(start, size)` must yield the stage's inputs in sample order from `start`. Returns the
    number of samples computed, by every rank (0 when the store was already complete).

    Under torchrun every rank calls this together: rank 0 creates or reopens the store and lists the missing
    chunks; each rank computes one contiguous share of the missing chunk groups and writes and fsyncs those
    chunks (each chunk has exactly one writer); after a barrier rank 0 fsyncs the rest, writes the manifest
    and sets `complete`. Progress is the chunk files on disk, so an interrupted pass resumes with any number
    of ranks.

    An object store (`path` a RemotePath) takes the same steps, with a PUT for each chunk object, which
    stores it whole or not at all; nothing is fsynced there, and `complete` is still written last.

    `stop` (cachetrain.stop): a stop request is seen after each chunk group is handed to the writer; the
    groups handed over are written and made durable, `complete` is not set, and `Stopped` is raised on
    every rank, so the same command resumes with the chunks still missing."""
    remote = isinstance(path, RemotePath)
    missing_list = _prepare(path, info, labels) if dist.writer else None
    missing_list = dist.broadcast(missing_list)  # every rank waits for the store to exist
    if missing_list is None:
        return 0
    missing = set(missing_list)
    group_size = layout.group_chunks * info.chunk_samples
    todo = [g for g in range(-(-info.num_samples // group_size))
            if any(c in missing for c in range(g * layout.group_chunks, (g + 1) * layout.group_chunks))]
    todo = [int(g) for g in np.array_split(np.asarray(todo, dtype=np.int64), dist.world)[dist.rank]]

    stage.eval()
    # a chunk file must exist for every written chunk, even an all-zero one: file presence is progress.
    # write_empty_chunks is runtime config, not stored with the array, so it is set where the array is
    # opened for writing; without it zarr also tests every chunk for all-zeros, at more CPU than the write
    with zarr.config.set({"array.write_empty_chunks": True}):
        features = zarr.open_array(zarr_store(path / "features"), mode="r+")
    writer = BackgroundWriter(features, None if remote else lambda c: chunk_file(path, features, c))
    encode = info.storage_format.encode  # stage outputs -> the store's dtype, on the host
    computed, stopped = 0, False
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1 and info.codec != "none":
        # leave a core to the writer thread's compression: measured here (2 cores), caching with a 1-thread
        # forward took 1.56 s where the 2-thread forward took 1.9-2.0 s, both writing zstd-1. Uncompressed,
        # the writer needs little CPU and the forward wants both: 4.1 s against 6.4 s (J=8, stage 2, by hand)
        torch.set_num_threads(threads - 1)
    try:
        with torch.no_grad(), autocast(device, amp):
            for run_start, run_len in _runs(todo):
                start, end = run_start * group_size, min(info.num_samples, (run_start + run_len) * group_size)
                pending: list[np.ndarray] = []  # outputs of the group being assembled
                pending_start = done = start
                for x, _ in batches(start, layout.forward_batch):
                    pending.append(encode(stage(x), info.quant))
                    computed += len(x)
                    done += len(x)
                    on_progress(len(x))
                    if done - pending_start == group_size or done == end:
                        block = pending[0] if len(pending) == 1 else np.concatenate(pending)
                        _put_missing(writer, block, pending_start, info.chunk_samples, missing)
                        pending, pending_start = [], done
                        stopped = stop is not None and stop.signum is not None
                    if done == end or stopped:
                        break
                if stopped:
                    break
    finally:
        torch.set_num_threads(threads)
        writer.close()
    if (dist.world > 1 or stopped) and not remote:  # this rank's chunks are durable before it reports them written
        groups = (range(g * layout.group_chunks, min(info.num_chunks, (g + 1) * layout.group_chunks)) for g in todo)
        mine = [chunk_file(path, features, c) for chunks in groups for c in chunks if c in missing]
        # a stopped pass left some of its chunks unwritten; a finished one wrote all, and a missing file is an error
        _make_durable(path, [f for f in mine if f.exists()] if stopped else mine)
    computed, ranks_stopped = dist.sum([computed, stopped])  # also the barrier: every rank's chunks are on disk
    computed = int(computed)
    if ranks_stopped:
        left = len(missing_chunks(path, info)) if dist.writer else None
        dist.barrier()
        raise stop.stopped(f"{path}: the chunks written so far are kept" +
                           (f", {left} of {info.num_chunks} are left to write" if left is not None else ""))
    if dist.writer:
        if not remote:
            _make_durable(path, [chunk_file(path, features, c) for c in range(info.num_chunks)])
        fault_point("cache_finish")
        group = zarr.open_group(zarr_store(path), mode="r+")
        digest = _write_manifest(path, group, info)
        # only now, with its digest in the same update: every chunk above exists in full, on disk
        group.update_attributes({"complete": True, "content_digest": digest})
        if not remote:
            fsync_path(path / "zarr.json")  # zarr replaced the file: its data, then the folder entry naming it
            fsync_path(path)
    dist.barrier()  # no rank reads the store before it is complete
    return computed


def _prepare(path: Path, info: StoreInfo, labels: np.ndarray) -> list[int] | None:
    """Create the store, or reopen one this producer left unfinished; its missing chunks, or None when it
    is already complete."""
    state, found = store_state(path, info.fingerprint)
    if state is CacheState.COMPLETE:
        return None
    if state in (CacheState.WRITING, CacheState.DAMAGED) and found == info and _resumable(path):
        # same producer and same layout: resume it (a DAMAGED store is WRITING again until it is whole)
        group = zarr.open_group(zarr_store(path), mode="r+")
        # its record checked (store_state), rewritten with its digest (a store older than the digest gets one)
        group.update_attributes({"complete": False, INFO_DIGEST: info_digest(info)})
        if not _labels_match(path, group, labels):
            _write_labels(group, labels, info)
    else:
        _create(path, info, labels)
    return [int(c) for c in missing_chunks(path, info)]


def _write_manifest(path: Path, group: zarr.Group, info: StoreInfo) -> str:
    """Record the trailing crc32c of every chunk file and of the labels (the checksum manifest), durably;
    returns the store's content digest. Read back from the files, so it describes what is on disk."""
    crcs = file_checksums(path, info)
    with zarr.config.set({"array.write_empty_chunks": True}):  # a file even for crcs that are all zero
        group.create_array(CHECKSUMS, **array_specs(info)[CHECKSUMS], overwrite=True)[:] = crcs
    if isinstance(path, RemotePath):  # stored by its PUTs
        return digest_of(crcs)
    files = [p for p in (path / CHECKSUMS).rglob("*") if p.is_file()]
    folders = {folder for file in files for folder in _folders_up_to(file, path)}
    for item in [*files, *sorted(folders, key=lambda p: -len(p.parts))]:
        fsync_path(item)
    return digest_of(crcs)


def _folders_up_to(file: Path, top: Path) -> list[Path]:
    """The folders from `file`'s own up to `top`, inclusive (zarr nests chunk c's file as c/<c>/0/0/0)."""
    folders = []
    for folder in file.parents:
        folders.append(folder)
        if folder == top:
            return folders
    raise ValueError(f"{file} is not below {top}")


def _make_durable(path: Path, chunks: list[Path]) -> None:
    """fsync every chunk file of the store (those this pass wrote, and those an interrupted pass left,
    which it may have died before syncing; a clean file costs next to nothing), the labels and metadata,
    then the folders naming them, deepest first, then the store's own entry. FSYNC_THREADS at a time:
    the disk then flushes many files per journal commit, where one at a time it commits once per file."""
    files = [*chunks, path / "features" / "zarr.json", *(p for p in (path / "labels").rglob("*") if p.is_file())]
    folders = {folder for file in files for folder in _folders_up_to(file, path)}
    with ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="cache-fsync") as pool:
        list(pool.map(_fsync, files))  # list(): raises the first error here
        for depth in sorted({len(f.parts) for f in folders}, reverse=True):  # a folder after the files it names
            list(pool.map(_fsync, [f for f in folders if len(f.parts) == depth]))
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """fsync_path, its error naming `path`: a disk error or a full disk (delayed allocation reports ENOSPC
    at the fsync) then names the file in the command line's one line, where os.fsync names none."""
    try:
        fsync_path(path)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def _put_missing(writer: BackgroundWriter, block: np.ndarray, start: int, chunk_samples: int,
                 missing: set[int]) -> None:
    """Hand the writer the chunks of `block` that are missing, each run of consecutive missing chunks as
    one block; chunks already on disk are left untouched, so a resumed or repaired store rewrites only
    what it lacked. Whole runs matter: zarr encodes and writes the chunks of one assignment together,
    and one assignment per chunk wrote 3.2 MB fp16 samples at 139 MB/s where runs wrote 249 MB/s
    (2-core CPU, by hand)."""
    first = start // chunk_samples
    todo = [c for c in range(first, first + -(-len(block) // chunk_samples)) if c in missing]
    for c0, n in _runs(todo):
        writer.put(c0 * chunk_samples, block[(c0 - first) * chunk_samples:(c0 + n - first) * chunk_samples])


def _labels_match(path: Path, group: zarr.Group, labels: np.ndarray) -> bool:
    try:  # a missing labels file would read as zeros
        return labels_file(path).is_file() and bool(np.array_equal(group["labels"][:], labels))
    except Exception as e:  # noqa: BLE001 - unreadable (corrupt) labels get rewritten
        raise_if_transport(e, path, "reading its labels")
        return False


def _runs(groups: list[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs of indices, as (first, length): runs of chunk groups are passes of the input,
    runs of chunks are single writes."""
    i = 0
    while i < len(groups):
        j = i
        while j + 1 < len(groups) and groups[j + 1] == groups[j] + 1:
            j += 1
        yield groups[i], j - i + 1
        i = j + 1
