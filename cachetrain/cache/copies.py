"""Local copies of a remote store's chunk objects: a size-limited folder on a local disk.

With `cache.remote_copies: /nvme/cachetrain` a stage reading its input cache from an object store keeps
each chunk object it fetched as a file under `<that folder>/cachetrain-copies/`, and the next epoch reads
that file instead of the network. When that folder outgrows `cache.remote_copies_gib`, the least recently
used copies are deleted; nothing outside it is ever touched.

A copy is never trusted more than the object it came from: the reader checks a copy's crc32c and the
store's manifest entry exactly as it checks a fetched object, and a copy that fails is deleted and the
object fetched again (a copy is a convenience, not a source of truth). Copies are keyed by the store's
URL and its manifest's digest, so a store rebuilt or repaired to other bytes gets a folder of its own,
and its old copies age out. Nothing here is fsynced: a copy lost or torn by a crash fails its check and
is fetched again. A local disk that fails (full, unwritable) turns the copies off with a warning; the
objects are still read from the store.

Several processes (torchrun ranks, loader workers) may share one folder: a copy appears whole, by
rename, or not at all. Each process counts what it adds and rescans the folder every RESCAN_PUTS copies,
so N processes overshoot the limit by at most N x RESCAN_PUTS chunks between scans.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
import warnings
from pathlib import Path

import numpy as np

EVICT_TO = 0.9  # once over the limit, delete down to this fraction of it (not one file per put)
RESCAN_PUTS = 16  # how often a process looks at what the others added
SUBFOLDER = "cachetrain-copies"


class LocalCopies:
    def __init__(self, folder: str | os.PathLike, limit_bytes: int):
        self.given, self.limit = Path(folder), int(limit_bytes)
        self.folder = self.given / SUBFOLDER
        self._lock = threading.Lock()  # ReadFeed's threads put at once
        self._estimate: int | None = None  # bytes in the folder at the last scan, plus this process's puts since
        self._puts = 0
        self._off = False

    def __reduce__(self):  # a worker process starts with its own count
        return LocalCopies, (self.given, self.limit)

    def store_folder(self, store_url: str, digest: str | None) -> Path:
        return self.folder / hashlib.sha256(f"{store_url}#{digest}".encode()).hexdigest()[:20]

    def get(self, folder: Path, name: str) -> np.ndarray | None:
        """The copy of chunk object `name` (uint8, writable: one read, no copy), or None. Reading it marks it
        recently used."""
        if self._off:
            return None
        file = folder / name.replace("/", "_")
        try:
            data = np.fromfile(file, dtype=np.uint8)
            os.utime(file)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._fail(e)
            return None
        return data

    def drop(self, folder: Path, name: str) -> None:
        try:
            (folder / name.replace("/", "_")).unlink(missing_ok=True)
        except OSError as e:
            self._fail(e)

    def put(self, folder: Path, name: str, data: np.ndarray) -> None:
        """Keep a copy (written to a temp name of its own, renamed into place), then keep the folder under
        the limit."""
        if self._off or len(data) > self.limit:
            return
        file = folder / name.replace("/", "_")
        tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex}.tmp")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, file)
            with self._lock:
                self._puts += 1
                if self._estimate is None or self._puts % RESCAN_PUTS == 0:
                    self._estimate = self.size()
                else:
                    self._estimate += len(data)
                if self._estimate > self.limit:
                    self._evict()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self._fail(e)

    def _fail(self, e: OSError) -> None:
        if not self._off:
            self._off = True
            warnings.warn(f"cache.remote_copies: {self.folder}: {e}; local copies are off for this process, "
                          f"chunks are read from the store", stacklevel=3)

    def size(self) -> int:
        return sum(size for _, size, _ in self._files())

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        for folder, _, names in os.walk(self.folder):
            for name in names:
                path = Path(folder) / name
                try:
                    st = path.stat()
                except FileNotFoundError:  # another process evicted it meanwhile
                    continue
                out.append((st.st_mtime, st.st_size, path))
        return out

    def _evict(self) -> None:
        files = sorted(self._files())  # least recently used first
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= EVICT_TO * self.limit:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._estimate = total
