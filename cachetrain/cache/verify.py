"""Integrity checks: read every chunk of a store and name the ones that are missing or corrupt.

Every chunk ends with a crc32c checksum (zarr v3's Crc32cCodec, last in the codec chain), so a
flipped byte anywhere in a chunk file fails its decode, and so does a file cut short or empty (what
a power cut can leave). A chunk file that does not exist would silently read as the fill value, so
existence is checked separately. A complete store's checksum manifest (manifest.py) must agree with
each file's trailing crc32c: a chunk file swapped for another, or rewritten behind the store's back,
has a valid checksum of the wrong bytes ("corrupt: differs from the store's checksum manifest").
Problems of the store as a whole ("store missing", "store metadata missing ...") are not repaired
chunk by chunk: the caching pass rebuilds such a store.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Zstd

from cachetrain.cache.location import RemotePath, location, raise_if_transport, zarr_store
from cachetrain.cache.reader import DIFFERS_FROM_MANIFEST, chunk_fault
from cachetrain.cache.manifest import (chunk_file, labels_file, metadata_problem, read_manifest, store_state,
                                       trailing_crc32c)

REMOTE_READS = 8  # chunk GETs in flight when verifying a remote store
MANIFEST_DIFFERS = "corrupt: differs from the store's checksum manifest"


@dataclass(frozen=True)
class ChunkProblem:
    store: Path
    chunk: int | None  # None: the labels array, or the store as a whole
    start: int
    stop: int
    problem: str  # "missing" | "corrupt: <reason>" | "store missing" | "store metadata missing (<what>)"
    file: Path | None = None  # the chunk's file
    part: str = "labels"  # what a problem with chunk None is about, unless it is the whole store's

    @property
    def whole_store(self) -> bool:
        """The store as a whole is missing or unusable: rebuilt, not repaired chunk by chunk."""
        return self.problem.startswith("store ")

    def __str__(self) -> str:
        what = (f"chunk {self.chunk} (samples {self.start}-{self.stop - 1})" if self.chunk is not None
                else "store" if self.whole_store else self.part)
        return f"{self.store}: {what}: {self.problem}"


def verify_store(path: Path) -> list[ChunkProblem]:
    """Every problem in the store at `path` (which must exist); [] when every chunk decodes (and, in a
    complete store, agrees with the checksum manifest). A remote store's chunks are checked from one GET
    each (`_remote_chunk_problems`)."""
    path = location(path)
    problem = metadata_problem(path)
    if problem is not None:
        return [ChunkProblem(path, None, 0, 0, problem)]
    _, info = store_state(path, None)
    complete = zarr.open_group(zarr_store(path, read_only=True), mode="r").attrs.get("complete") is True
    try:
        features = zarr.open_array(zarr_store(path / "features", read_only=True), mode="r")
        labels = zarr.open_array(zarr_store(path / "labels", read_only=True), mode="r")
        labels_path = labels_file(path)
    except Exception as e:  # noqa: BLE001
        raise_if_transport(e, path, "reading its metadata")
        return [ChunkProblem(path, None, 0, 0, f"store metadata missing (features or labels: {_reason(e)})")]
    problems = []
    manifest = None
    if complete:  # a store being written has no manifest of what it holds yet
        try:
            manifest = read_manifest(path, info)
        except ValueError as e:
            problems.append(ChunkProblem(path, None, 0, 0, f"corrupt: {e}", part="checksum manifest"))
    check = _remote_chunk_problems if isinstance(path, RemotePath) else _local_chunk_problems
    problems += check(path, info, features, manifest)
    if not labels_path.is_file():  # it would read as zeros
        problems.append(ChunkProblem(path, None, 0, info.num_samples, "missing"))
        return problems
    try:
        labels[:]
    except Exception as e:  # noqa: BLE001
        raise_if_transport(e, path, "reading its labels")
        problems.append(ChunkProblem(path, None, 0, info.num_samples, f"corrupt: {_reason(e)}"))
        return problems
    if manifest is not None and trailing_crc32c(labels_path) != int(manifest[-1]):
        problems.append(ChunkProblem(path, None, 0, info.num_samples, MANIFEST_DIFFERS))
    return problems


def _local_chunk_problems(path: Path, info, features, manifest) -> list[ChunkProblem]:
    """The chunk files of a local store: present, decoded by zarr (which checks the crc32c), and as the
    manifest records."""
    problems = []
    for c in range(info.num_chunks):
        start, stop = c * info.chunk_samples, min((c + 1) * info.chunk_samples, info.num_samples)
        file = chunk_file(path, features, c)
        if not file.exists():
            problems.append(ChunkProblem(path, c, start, stop, "missing", file))
            continue
        try:
            features[start:stop]
        except Exception as e:  # noqa: BLE001 - a checksum mismatch or a codec failure: both mean corrupt
            problems.append(ChunkProblem(path, c, start, stop, f"corrupt: {_reason(e)}", file))
            continue
        if manifest is not None and trailing_crc32c(file) != int(manifest[c]):
            problems.append(ChunkProblem(path, c, start, stop, MANIFEST_DIFFERS, file))
    return problems


def _remote_chunk_problems(path: RemotePath, info, features, manifest) -> list[ChunkProblem]:
    """The chunk objects of a remote store, checked from one GET each (REMOTE_READS in flight): present at
    the right size (one listing), crc32c, decodable, and as the manifest records. A transport error ends
    the check as one line (CacheError): it says nothing about the store, and must not be called corrupt,
    which `--repair` would act on."""
    sizes = (path / "features").sizes()

    def check(c: int) -> ChunkProblem | None:
        start, stop = c * info.chunk_samples, min((c + 1) * info.chunk_samples, info.num_samples)
        file = chunk_file(path, features, c)
        key = str(file.relative_to(path / "features"))
        if key not in sizes:
            return ChunkProblem(path, c, start, stop, "missing", file)
        try:
            data = np.frombuffer(file.read_bytes(), dtype=np.uint8)
        except FileNotFoundError:
            return ChunkProblem(path, c, start, stop, "missing", file)
        fault = chunk_fault(data, info, None if manifest is None else int(manifest[c]))
        if fault is not None:
            return ChunkProblem(path, c, start, stop,
                                MANIFEST_DIFFERS if fault == DIFFERS_FROM_MANIFEST else f"corrupt: {fault}", file)
        if info.codec == "zstd":
            try:
                Zstd().decode(data[:-4])
            except Exception as e:  # noqa: BLE001 - numcodecs raises RuntimeError or ValueError
                return ChunkProblem(path, c, start, stop, f"corrupt: zstd cannot decode it ({_reason(e)})", file)
        return None

    with ThreadPoolExecutor(REMOTE_READS, thread_name_prefix="verify-get") as pool:
        return [p for p in pool.map(check, range(info.num_chunks)) if p is not None]


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:120]
