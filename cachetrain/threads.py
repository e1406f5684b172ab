"""One bounded background thread, at either end of a queue, whose error is raised in the caller's thread.

Two users: the cache loader assembles batches ahead in a producer thread (`in_background`), and the
caching pass writes chunk blocks in a consumer thread (`InBackground`, behind cache/writer.py's
`BackgroundWriter`). Both need the same three things, kept here once:
- a bounded queue, so the side that runs ahead holds at most `depth` items (memory stays bounded);
- the thread's error raised in the caller's thread, where the user's stack and handlers are;
- no side ever blocks on a full queue that nobody reads any more: whichever side reads the queue
  marks when it stops reading (a consumer that breaks out of its loop, a writer thread that failed),
  and a blocked `put` on the other side gives up instead of waiting forever.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()  # the writing side's last item: nothing follows
_POLL_S = 0.1  # how often a blocked put looks whether the reader is gone (a put wakes at once when space frees)


class _Link:
    """The bounded queue between the caller's thread and one background thread, in either direction,
    the thread's error, and the flag the reading side sets when it stops reading."""

    def __init__(self, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.reader_gone = threading.Event()
        self.error: BaseException | None = None

    def put(self, item: object) -> bool:
        """Put `item`, blocking while the queue is full; False (and not put) once the reader is gone."""
        while not self.reader_gone.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def start(self, name: str, body: Callable[[], None], then: Callable[[], None]) -> threading.Thread:
        """Run `body` in a daemon thread; its error is kept for `raise_error`, recorded before `then` runs
        (so whoever `then` wakes sees it)."""
        def run() -> None:
            try:
                body()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self.error = e
            finally:
                then()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def in_background(items: Iterable[T], depth: int, name: str = "background") -> Iterator[T]:
    """`items`, produced up to `depth` ahead by a thread of their own. The thread's error is raised here,
    after the items produced before it; a consumer that stops early (break, an exception in its loop,
    close()) stops the thread promptly: it never blocks on a queue nobody reads, and is joined before
    this generator's close() returns. A generator `items` is closed in the producing thread."""
    link = _Link(depth)

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                if not link.put(item):
                    return
        finally:
            close = getattr(it, "close", None)
            if close is not None:  # run a generator's cleanup in the thread that ran it, before the join
                close()

    thread = link.start(name, produce, then=lambda: link.put(_END))
    try:
        while (item := link.queue.get()) is not _END:
            yield item
        link.raise_error()
    finally:
        link.reader_gone.set()
        thread.join()


class InBackground(Generic[T]):
    """`handle(item)` for each item `put`, in a thread of its own, up to `depth` items behind the caller.
    `put` blocks while `depth` items are pending and raises the thread's error, once it has one, in the
    caller's thread; the thread stops at its first error, and a `put` blocked then gives up at once.
    `close` waits for the pending items to be handled, then raises the thread's error, if any."""

    def __init__(self, handle: Callable[[T], None], depth: int, name: str = "background"):
        self._link = _Link(depth)

        def consume() -> None:
            while (item := self._link.queue.get()) is not _END:
                handle(item)

        self._thread = self._link.start(name, consume, then=self._link.reader_gone.set)

    def put(self, item: T) -> None:
        if not self._link.put(item):
            self._thread.join()
            self._link.raise_error()
            raise RuntimeError(f"{self._thread.name}: put after close")

    def close(self) -> None:
        self._link.put(_END)  # gives up at once if the thread already stopped
        self._thread.join()
        self._link.raise_error()
