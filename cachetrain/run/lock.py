"""Who may work on a run: one process at a time (`RunLock`), and one run per cache folder (`claim_caches`).

The lock is an flock on `<run>/.lock`, holding the PID of its holder; the OS releases it when the
process ends, however it ends (SIGKILL included), so a crash never leaves a run locked. A second
process is refused in one line naming the holder.

With cache.location, a run's caches live at `<location>/<run folder name>`, which another run of the
same folder name (another machine, another parent folder) would pick too: each would take the other's
stores for stale ones and rebuild them. The first run to write there records itself in `owner.json`,
and any other run is refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os

from cachetrain.cache.location import RemotePath
from cachetrain.durable import atomic_write
from cachetrain.errors import CacheError, RunLocked
from cachetrain.run.layout import RunLayout


class RunLock:
    def __init__(self, layout: RunLayout):
        self.layout = layout
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the run's exclusive lock for the life of this process, or raise RunLocked naming the holder."""
        self.layout.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode().strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{self.layout.path}: run directory is in use by process {holder}; wait for it to "
                            f"finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def claim_caches(layout: RunLayout, write: bool) -> None:
    """Refuse caches under cache.location that another run claimed; with `write` (a command that writes),
    claim them for this run if nobody has. Caches inside the run folder need no claim."""
    if not layout.caches_elsewhere:
        return
    marker, me = layout.cache_owner, str(layout.path.resolve())
    try:
        found = json.loads(marker.read_bytes())["run"]
    except FileNotFoundError:
        found = None
    except (ValueError, KeyError, TypeError):
        found = f"unknown ({marker} is unreadable)"
    if found is None:
        if write:
            data = json.dumps({"run": me}).encode()
            if isinstance(marker, RemotePath):
                marker.write_bytes(data)
            else:
                marker.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(marker, data)
        return
    if found != me:
        raise CacheError(f"cache.location: {layout.cache_root} holds the caches of run {found}, not of {me}; give "
                         f"this run another folder name or cache.location (if that run moved here, delete {marker})")
