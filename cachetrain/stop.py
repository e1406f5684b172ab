"""Stopping on request: SIGTERM (a cluster's preemption, `kill`) and SIGINT (Ctrl-C).

Clusters stop jobs with SIGTERM and a grace period of seconds (SLURM, Kubernetes, spot instances).
Outside the loops below, either signal ends the command at once with one line (`Interrupted`): every
file is written atomically, so what was finished is kept and nothing half-written counts as done.

Inside a training loop or a caching pass (`StopRequests.graceful()`), the first SIGTERM or SIGINT only
asks to stop: the loop finishes the step it is on and checkpoints at that step (a caching pass
finishes the chunk group it is writing), then raises `Stopped`, which the CLI prints as one line with
the command that resumes, exiting 128 + the signal number (143, 130). A second SIGINT stops at once
(the last periodic checkpoint is then where it resumes). Under torchrun every rank stops at the same
step: the ranks agree each step (`requested(dist)`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from cachetrain.dist import Dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A signal ended the command outside a loop that can stop cleanly (BaseException, as KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stopped(Exception):
    """A loop stopped cleanly on request: `kept` says what was saved (a checkpoint's position, a store's
    chunks)."""

    def __init__(self, signum: int, kept: str):
        super().__init__(f"stopped by {signal.Signals(signum).name}: {kept}")
        self.signum, self.kept = signum, kept


def raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def ignore_in_worker(worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: SIGTERM and SIGINT reach every process of the job (a terminal's
    Ctrl-C, SLURM's preemption); the training process decides when to stop and ends its workers then. A
    worker that died on the signal first would fail the step the training process was finishing."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopRequests:
    """The process's stop requests. `signum` is set by the first signal inside `graceful()`."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def requested(self, dist: Dist = Dist()) -> bool:
        """Whether to stop now; under torchrun, whether any rank was asked (every rank gets the same answer,
        so all stop at the same step)."""
        asked = self.signum is not None
        if dist.world == 1:
            return asked
        # how many ranks got each signal (a sum of signal numbers would mix SIGTERM and SIGINT into another)
        got = dist.sum([float(self.signum == s) for s in SIGNALS])
        if self.signum is None and any(got):
            self.signum = next(s for s, n in zip(SIGNALS, got) if n)  # the signal another rank got
        return bool(any(got))

    def stopped(self, kept: str) -> Stopped:
        return Stopped(self.signum or signal.SIGTERM, kept)

    @contextmanager
    def graceful(self) -> Iterator[StopRequests]:
        """Within the block, SIGTERM and SIGINT ask to stop instead of stopping (main thread only: signal
        handlers can be set nowhere else; elsewhere the block changes nothing)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def ask(signum: int, frame) -> None:
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # asked twice: now
            self.signum = self.signum or signum

        previous = {s: signal.signal(s, ask) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
