"""Durable small files: a crash or a power cut leaves the old version of a file or the new one, never a mix.

    atomic_write(path, data)  temp file `<name>.tmp` in the same folder, write, flush, fsync, os.replace,
                              fsync the folder. `data`: bytes, str, or a function writing into the binary
                              file object; `before_replace(tmp)` runs between the fsync and the rename (the
                              checkpoint's prev-link and fault point live there).
    write_json(path, obj)     atomic_write of JSON text (plan.json, run.json)
    append_line(path, line)   append one line and fsync it; a line torn by a crash is ended by the next
                              append, so only that torn line is lost (readers skip it)
    make_dirs(path)           mkdir -p that fsyncs the parent of every folder it creates
    fsync_path(path)          fsync a file's data or a folder's entries, by path. cachetrain/cache/writer.py
                              still has its own copy (`_fsync`); this is the one to keep.

One writer per file at a time: the temp name is fixed (a crash's leftover is overwritten by the next
write, not piled up), so two processes writing the same file would share it. The run lock
(cachetrain.run.lock) guarantees that for everything inside a run directory.

`UNWRITABLE` and `unwritable_message` turn a read-only or permission-denied write (EROFS, EACCES,
EPERM) into the one line the command line prints; `disk_full_message` does the same for ENOSPC. Every
writer names its file on the OSError it raises (`atomic_write`, `append_line`, the cache writer), so the
line names the file being written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def fsync_path(path: str | os.PathLike) -> None:
    """Make `path` (a file's data, or a folder's entries) durable: on disk, not only in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike) -> None:
    """`mkdir -p path`, fsyncing the parent of every folder it creates, so a folder made just before a
    power cut is still there with whatever was durably written into it."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            pass
        fsync_path(folder.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None], *,
                 before_replace: Callable[[Path], None] | None = None) -> None:
    """Replace `path` with `data` atomically and durably (see the module docstring). On any error,
    KeyboardInterrupt included, the temp file is removed and `path` is left as it was."""
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # fsync and write errors name no file
            e.filename = str(path)
        raise
    fsync_path(path.parent)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` (a newline is added) and fsync it. If a crash tore the file's last line (no newline
    at the end), that line is ended first, so the torn line stays the only unreadable one."""
    path = Path(path)
    make_dirs(path.parent)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        text = line.rstrip("\n") + "\n"
        if size and os.pread(fd, 1, size - 1) != b"\n":
            text = "\n" + text
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    finally:
        os.close(fd)
    if created:
        fsync_path(path.parent)


# -- read-only run directories ------------------------------------------------------------------
UNWRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def read_lines(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a file `append_line` writes, in order ([] when it does not exist). A line that is
    not one (the last, torn by a crash mid-append) is skipped: what it recorded is computed again."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _under(path: Path, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def unwritable_message(e: OSError, run_dir: Path | None = None, data_dir: Path | None = None) -> str:
    """One line for an EROFS/EACCES/EPERM error: the path, why, and which setting points elsewhere.
    `run_dir`, `data_dir`: the run directory and the data root, when a config is loaded (None before)."""
    where = e.filename or "the run directory"
    why = "read-only file system" if e.errno == errno.EROFS else "permission denied"
    if data_dir is not None and e.filename and _under(Path(e.filename), data_dir):
        return (f"cannot write {where}: {why}; the dataset is unpacked under {data_dir}: "
                f"set a writable data.root in the config (or $CACHETRAIN_DATA)")
    if run_dir is not None and (not e.filename or _under(Path(e.filename), run_dir)):
        return (f"cannot write {where}: {why}; checkpoints, metrics and caches go in the run directory "
                f"{run_dir}: use a writable one with --run DIR (or run_dir in the config)")
    return f"{where}: {why}; cachetrain needs a writable run directory: --run DIR (or run_dir in the config)"


def disk_full_message(e: OSError) -> str:
    """The one line for ENOSPC (or EDQUOT): the file being written, and that nothing half-written is kept."""
    where = e.filename or "the run directory"
    return (f"disk full while writing {where}: free some space and rerun the same command; finished checkpoints "
            f"and cache chunks are kept, nothing half-written is marked complete")
