"""Local copies of a remote store's chunk objects: a size-limited folder on a local disk.

With `cache.remote_copies: /nvme/cachetrain` a stage reading its input cache from an object store keeps
each chunk object it fetched as a file there, and the next epoch reads that file instead of the network.
When the folder outgrows `cache.remote_copies_gib`, the least recently used copies are deleted.

A copy is never trusted more than the object it came from: the reader checks a copy's crc32c and the
store's manifest entry exactly as it checks a fetched object, and a copy that fails is deleted and the
object fetched again (a copy is a convenience, not a source of truth). Copies are keyed by the store's
URL and its content digest, so a store rebuilt or repaired to other bytes gets a folder of its own, and
its old copies age out. Nothing here is fsynced: a copy lost or torn by a crash fails its check and is
fetched again. Several processes (torchrun ranks, loader workers) may share one folder: a copy appears
whole, by rename, or not at all.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EVICT_TO = 0.9  # once over the limit, delete down to this fraction of it (not one file per put)


class LocalCopies:
    def __init__(self, folder: str | os.PathLike, limit_bytes: int):
        self.folder, self.limit = Path(folder), int(limit_bytes)
        self._estimate: int | None = None  # bytes in the folder, from the last scan plus this process's puts

    def __reduce__(self):  # a worker process starts with its own estimate
        return LocalCopies, (self.folder, self.limit)

    def store_folder(self, store_url: str, digest: str | None) -> Path:
        return self.folder / hashlib.sha256(f"{store_url}#{digest}".encode()).hexdigest()[:20]

    def get(self, folder: Path, name: str) -> bytes | None:
        """The copy of chunk object `name`, or None. Reading it marks it recently used."""
        file = folder / name.replace("/", "_")
        try:
            data = file.read_bytes()
            os.utime(file)
        except FileNotFoundError:
            return None
        return data

    def drop(self, folder: Path, name: str) -> None:
        (folder / name.replace("/", "_")).unlink(missing_ok=True)

    def put(self, folder: Path, name: str, data: bytes) -> None:
        """Keep a copy (written to a temp name, renamed into place), then keep the folder under the limit."""
        if len(data) > self.limit:
            return
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / name.replace("/", "_")
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, file)
        if self._estimate is None:
            self._estimate = self.size()
        else:
            self._estimate += len(data)
        if self._estimate > self.limit:
            self._evict()

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
