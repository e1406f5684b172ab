"""Fault injection for crash-safety tests: make this process die (or hit a full disk) at a named point.

`CACHETRAIN_FAULT="<point>:<n>[:enospc|sigterm|sigint]"` makes the n-th time this process reaches
`<point>` send itself SIGKILL (the default: a real kill -9, nothing flushed, no handlers run), raise
ENOSPC as a full disk would, or send itself SIGTERM or SIGINT (a preemption, a Ctrl-C: cachetrain.stop). Points are named where the code calls `fault_point`:

    train_step        after an optimizer step, before any checkpoint of it
    checkpoint_write  a checkpoint's temp file is written, not yet renamed into place
    cache_chunk       a cache chunk file has just been written (counted per chunk of each written block)
    cache_finish      every chunk of a store is written, its `complete` flag is not yet set
    stage_end         a stage's (or the end-to-end network's) final checkpoint is saved, its cache not yet started

Under torchrun, `CACHETRAIN_FAULT_RANK=<r>` limits the fault to rank r, and a fault fires only in the
job's first attempt (TORCHELASTIC_RESTART_COUNT 0), so the workers torchrun restarts run through.

Unset (the normal case), `fault_point` costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

_ENV = "CACHETRAIN_FAULT"


class _Faults:
    def __init__(self, spec: str | None):
        self.point, self.at, self.action = None, 0, "kill"
        if spec:
            parts = spec.split(":")
            self.point, self.at = parts[0], int(parts[1])
            self.action = parts[2] if len(parts) > 2 else "kill"
        self.count = 0
        self.lock = threading.Lock()

    def hit(self, point: str, path: str = "") -> None:
        if point != self.point:
            return
        with self.lock:
            self.count += 1
            if self.count != self.at:
                return
        if self.action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or None)
        if self.action in ("sigterm", "sigint"):  # as a cluster's preemption or a Ctrl-C would, at this point
            os.kill(os.getpid(), signal.SIGTERM if self.action == "sigterm" else signal.SIGINT)
            return
        os.kill(os.getpid(), signal.SIGKILL)


def _armed() -> str | None:
    rank = os.environ.get("CACHETRAIN_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return None
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    return os.environ.get(_ENV)


_faults = _Faults(_armed())  # read once per process: the spec is fixed for a test run


def fault_point(point: str, path: str = "") -> None:
    _faults.hit(point, path)
