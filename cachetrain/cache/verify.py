"""Integrity checks: read every chunk of a store and name the ones that are missing or corrupt.

Every chunk ends with a crc32c checksum (zarr v3's Crc32cCodec, last in the codec chain), so a
flipped byte anywhere in a chunk file fails its decode, and so does a file cut short or empty (what
a power cut can leave). A chunk file that does not exist would silently read as the fill value, so
existence is checked separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zarr

from cachetrain.cache.manifest import chunk_file, store_state


@dataclass(frozen=True)
class ChunkProblem:
    store: Path
    chunk: int | None  # None: the labels array, or the store as a whole
    start: int
    stop: int
    problem: str  # "missing" | "corrupt: <reason>" | "store missing"
    file: Path | None = None  # the chunk's file

    def __str__(self) -> str:
        what = (f"chunk {self.chunk} (samples {self.start}-{self.stop - 1})" if self.chunk is not None
                else "store" if self.problem == "store missing" else "labels")
        return f"{self.store}: {what}: {self.problem}"


def verify_store(path: Path) -> list[ChunkProblem]:
    """Every problem in the store at `path` (which must exist); [] when every chunk decodes."""
    _, info = store_state(path, None)
    if info is None:
        return [ChunkProblem(path, None, 0, 0, "corrupt: store attributes unreadable")]
    problems = []
    features = zarr.open_array(str(path / "features"), mode="r")
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
    try:
        zarr.open_array(str(path / "labels"), mode="r")[:]
    except Exception as e:  # noqa: BLE001
        problems.append(ChunkProblem(path, None, 0, info.num_samples, f"corrupt: {_reason(e)}"))
    return problems


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:120]
