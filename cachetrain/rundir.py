"""The run directory: where every stage's checkpoint, metrics and cache live, and its lock.

    <run>/config.yaml                        resolved config of the last command
    <run>/stages/stage_<j>/checkpoint.pt     one plain dict (see `checkpoint` below)
    <run>/stages/stage_<j>/metrics.jsonl     one JSON object per finished epoch
    <run>/cache/stage_<j>/{train,test}.zarr  stage j's outputs (see cachetrain.cache.manifest)
    <run>/e2e/{checkpoint.pt,metrics.jsonl}   the end-to-end baseline (cachetrain.e2e)
    <run>/.lock                              held (flock) by the process working on the run

Everything a command needs to decide what to do next is derived from these files; there is no
separate state file to fall out of step with them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import torch

from cachetrain.faults import fault_point


class RunLocked(RuntimeError):
    pass


class CheckpointError(RuntimeError):
    pass


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._unreadable: set[int] = set()  # stages whose checkpoint.pt failed to load (prev.pt was used)

    def stage_dir(self, j: int | str) -> Path:
        """Stage j's folder; j = "e2e" is the end-to-end baseline's, which is kept the same way."""
        return self.path / "e2e" if j == "e2e" else self.path / "stages" / f"stage_{j}"

    def checkpoint_path(self, j: int) -> Path:
        return self.stage_dir(j) / "checkpoint.pt"

    def metrics_path(self, j: int) -> Path:
        return self.stage_dir(j) / "metrics.jsonl"

    def cache_dir(self, j: int) -> Path:
        return self.path / "cache" / f"stage_{j}"

    def store_path(self, j: int, split: str, view: int = 0) -> Path:
        return self.cache_dir(j) / (f"{split}.zarr" if view == 0 else f"{split}_v{view}.zarr")

    # -- checkpoints ---------------------------------------------------------------------------
    def previous_checkpoint_path(self, j: int) -> Path:
        return self.stage_dir(j) / "checkpoint.prev.pt"

    def save_checkpoint(self, j: int, checkpoint: dict) -> None:
        """Write a temp file, fsync it, keep the current checkpoint as checkpoint.prev.pt (a hard link, so
        the current name is never missing), then rename the temp file into place. A crash or a full disk
        at any moment leaves a readable checkpoint.pt: the new one or the one before it."""
        path = self.checkpoint_path(j)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            fault_point("checkpoint_write", str(tmp))
            # keep the current file as the previous one, unless it is the unreadable one we fell back from
            if path.exists() and j not in self._unreadable:
                prev_tmp = self.previous_checkpoint_path(j).with_suffix(".pt.tmp")
                prev_tmp.unlink(missing_ok=True)
                os.link(path, prev_tmp)
                os.replace(prev_tmp, self.previous_checkpoint_path(j))
            os.replace(tmp, path)
            self._unreadable.discard(j)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, j: int, warn=lambda msg: None) -> dict | None:
        """The stage's checkpoint: one dict with stage, k, model, head, optimizer, scheduler, epoch (finished
        epochs), batch (batches done in the next epoch), stats (its running sums), epochs, step, rng,
        input_fingerprint, weights_hash (once trained), test_acc and config. An unreadable checkpoint.pt
        (truncated by hand, say) falls back to checkpoint.prev.pt, with a warning."""
        path = self.checkpoint_path(j)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same answer
            reason = f"{type(e).__name__}"
        prev = self.previous_checkpoint_path(j)
        if prev.exists():
            try:
                checkpoint = torch.load(prev, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001
                pass
            else:
                self._unreadable.add(j)
                warn(f"{path}: unreadable checkpoint ({reason}); using the previous one, {prev.name} "
                     f"(epoch {checkpoint['epoch']}, batch {checkpoint.get('batch', 0)})")
                return checkpoint
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason}) and no readable previous one; delete "
                              f"{path} to retrain stage {j} from scratch")

    def append_metrics(self, j: int, row: dict) -> None:
        self.stage_dir(j).mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path(j), "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, j: int, epochs: int) -> None:
        """Drop rows of epochs after `epochs` (written by a run that died before checkpointing them)."""
        rows = [r for r in self.read_metrics(j) if r["epoch"] <= epochs]
        tmp = self.metrics_path(j).with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_path(j))

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
