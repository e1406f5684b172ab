"""The run directory: where every stage's checkpoint, metrics and cache live, and its lock.

    <run>/config.yaml                        resolved config of the run (cachetrain.train.identity)
    <run>/plan.json                          `cachetrain plan`'s choice of cached stages (save_plan)
    <run>/stages/stage_<j>/checkpoint.pt     one dict of tensors and plain data (schema: cachetrain.train.checkpoint)
    <run>/stages/stage_<j>/metrics.jsonl     one JSON object per finished epoch
    <run>/cache/stage_<j>/{train,test}.zarr  stage j's outputs (see cachetrain.cache.manifest); with
                                             cache.location L: L/<run name>/stage_<j>/..., L a folder or s3:// URL
    <run>/e2e/{checkpoint.pt,metrics.jsonl}   the end-to-end baseline (cachetrain.train.e2e)
    <run>/.lock                              held (flock) by the process working on the run

Everything a command needs to decide what to do next is derived from these files; there is no
separate state file to fall out of step with them. The small files (config, plan, checkpoints) are
replaced atomically and durably (temp file, fsync, rename, fsync of the folder: cachetrain.durable);
metrics lines are appended and fsynced one by one; the caches have their own protocol
(cachetrain.cache.writer).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path, PurePosixPath

import torch

from cachetrain.cache.location import RemotePath, location
from cachetrain.errors import CacheError, RunLocked
from cachetrain.train import checkpoint as ckpt
from cachetrain.train.checkpoint import CheckpointError, UnreadableCheckpoint, UnsafeCheckpoint
from cachetrain.durable import append_line, atomic_write, write_json
from cachetrain.faults import fault_point

__all__ = ["CheckpointError", "RunDir", "RunLocked"]


CACHE_OWNER = "owner.json"  # under cache.location/<run name>: the run whose caches those are (`claim_caches`)


class RunDir:
    def __init__(self, path: Path, writer: bool = True, cache_location: str = ""):
        self.path = Path(path)
        # the caches live in <run>/cache, or under cache.location: <location>/<run name>, a local folder
        # or an object store's prefix (cachetrain/cache/location.py)
        self.cache_root = location(cache_location) / self.path.name if cache_location else self.path / "cache"
        # under torchrun only rank 0 writes the run's files (cachetrain.dist); the others read them
        self.writer = writer
        self._unreadable: set[int] = set()  # stages whose checkpoint.pt failed to load (prev.pt was used)

    def stage_dir(self, j: int | str) -> Path:
        """Stage j's folder; j = "e2e" is the end-to-end baseline's, which is kept the same way."""
        return self.path / "e2e" if j == "e2e" else self.path / "stages" / f"stage_{j}"

    def checkpoint_path(self, j: int) -> Path:
        return self.stage_dir(j) / "checkpoint.pt"

    def metrics_path(self, j: int) -> Path:
        return self.stage_dir(j) / "metrics.jsonl"

    def cache_dir(self, j: int) -> Path | RemotePath:
        return self.cache_root / f"stage_{j}"

    def store_path(self, j: int, split: str, view: int = 0) -> Path | RemotePath:
        return self.cache_dir(j) / (f"{split}.zarr" if view == 0 else f"{split}_v{view}.zarr")

    def store_key(self, store: Path | RemotePath) -> str:
        """A store's name in the run's records (a checkpoint's input digests): `cache/stage_<j>/<split>.zarr`
        wherever cache.location puts it, so moving the caches does not change what a checkpoint names."""
        return str(PurePosixPath("cache") / store.relative_to(self.cache_root))

    def store_at(self, key: str) -> Path | RemotePath:
        """The store a record names (`store_key`)."""
        return self.cache_root / str(PurePosixPath(key).relative_to("cache"))

    def claim_caches(self, write: bool) -> None:
        """With cache.location, the caches live at <location>/<run name>, which another run of the same name
        (another folder, another machine) would also pick: each would take the other's stores for stale
        ones and rebuild them. The first run to use the folder records itself in its `owner.json`
        (`write`: a command that writes), and any other run is refused, in one line."""
        if self.cache_root == self.path / "cache":
            return
        marker, me = self.cache_root / CACHE_OWNER, str(self.path.resolve())
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
            raise CacheError(f"cache.location: {self.cache_root} holds the caches of run {found}, not of {me}; give "
                             f"this run another name or cache.location (if that run moved here, delete {marker})")

    # -- checkpoints ---------------------------------------------------------------------------
    def previous_checkpoint_path(self, j: int) -> Path:
        return self.stage_dir(j) / "checkpoint.prev.pt"

    def save_checkpoint(self, j: int | str, checkpoint: dict) -> None:
        """Write the checkpoint with cachetrain.durable.atomic_write; between the temp file's fsync and its
        rename, keep the current checkpoint as checkpoint.prev.pt (a hard link, so the current name is
        never missing). A crash or a full disk at any moment leaves a readable checkpoint.pt: the new one
        or the one before it; the folder is fsynced after the rename."""
        if not self.writer:
            return
        path = self.checkpoint_path(j)
        prev = self.previous_checkpoint_path(j)

        def keep_previous(tmp: Path) -> None:
            fault_point("checkpoint_write", str(tmp))
            # keep the current file as the previous one, unless it is the unreadable one we fell back from
            if path.exists() and j not in self._unreadable:
                prev_tmp = prev.with_name(prev.name + ".tmp")
                prev_tmp.unlink(missing_ok=True)
                try:
                    os.link(path, prev_tmp)
                    os.replace(prev_tmp, prev)
                except BaseException:
                    prev_tmp.unlink(missing_ok=True)
                    raise

        atomic_write(path, lambda f: torch.save(checkpoint, f), before_replace=keep_previous)
        self._unreadable.discard(j)

    def load_checkpoint(self, j: int | str, warn=lambda msg: None) -> dict | None:
        """The unit's checkpoint (keys: cachetrain.train.checkpoint), read as data, never as code. An unreadable
        checkpoint.pt (truncated by hand, say) falls back to checkpoint.prev.pt, with a warning. One that
        would need code to load is refused (CheckpointError) without falling back: no crash writes such
        a file, so it was planted or tampered with, and the user should know rather than lose it to the
        next save."""
        path = self.checkpoint_path(j)
        if not path.exists():
            return None
        try:
            return ckpt.load(path, j)
        except UnreadableCheckpoint as e:
            reason = e.reason
        except UnsafeCheckpoint as e:
            raise self._refusal(j, e) from None
        prev = self.previous_checkpoint_path(j)
        if prev.exists():
            try:
                checkpoint = ckpt.load(prev, j)
            except UnreadableCheckpoint:
                pass
            except UnsafeCheckpoint as e:
                raise self._refusal(j, e) from None
            else:
                self._unreadable.add(j)
                warn(f"{path}: unreadable checkpoint ({reason}); using the previous one, {prev.name} "
                     f"(epoch {checkpoint['epoch']}, batch {checkpoint.get('batch', 0)})")
                return checkpoint
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason}) and no readable previous one; delete "
                              f"{path} to retrain {self._unit(j)} from scratch")

    def _refusal(self, j: int | str, e: UnsafeCheckpoint) -> CheckpointError:
        folder = self.stage_dir(j)
        return CheckpointError(f"{e}; cachetrain did not write it (or it was tampered with), and none of its code "
                               f"was run; replace it with a checkpoint you trust, or delete {folder}/checkpoint*.pt "
                               f"to retrain {self._unit(j)} from scratch")

    @staticmethod
    def _unit(j: int | str) -> str:
        return "the end-to-end baseline" if j == "e2e" else f"stage {j}"

    # -- metrics and other small files ---------------------------------------------------------------
    def append_metrics(self, j: int | str, row: dict) -> None:
        """One JSON line, fsynced (cachetrain.durable.append_line)."""
        if self.writer:
            append_line(self.metrics_path(j), json.dumps(row))

    def truncate_metrics(self, j: int | str, epochs: int) -> None:
        """Drop rows of epochs after `epochs` (written by a run that died before checkpointing them), and a
        torn last line."""
        if not self.writer:
            return
        rows = [r for r in self.read_metrics(j) if r["epoch"] <= epochs]
        atomic_write(self.metrics_path(j), "".join(json.dumps(r) + "\n" for r in rows))

    @property
    def plan_path(self) -> Path:
        return self.path / "plan.json"

    def save_plan(self, plan: dict) -> None:
        """`cachetrain plan`'s result, written atomically."""
        write_json(self.plan_path, plan)

    def read_metrics(self, j: int) -> list[dict]:
        """The rows of finished epochs; a last line torn by a crash mid-append is skipped (its epoch was
        not checkpointed either, so it is trained again)."""
        path = self.metrics_path(j)
        rows = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    # -- lock ------------------------------------------------------------------------------------
    def lock(self) -> "RunDir":
        """Take the run's exclusive lock for the life of this process (released by the OS on exit,
        even on SIGKILL). A second process gets RunLocked naming the holder's PID."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode().strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{self.path}: run directory is in use by process {holder}; wait for it to finish "
                            f"or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._lock_fd = None
