"""The one bounded background thread (cachetrain/threads.py), in both directions: a producer thread the
cache loader reads batches from (`in_background`), and a consumer thread the caching pass hands chunk
blocks to (`InBackground`). Its error surfaces in the caller's thread, a side that stops reading never
leaves the other blocked on a full queue, and the side running ahead stays at most `depth` items ahead.

Waits carry generous timeouts so that a regression fails the test instead of hanging the suite; no
assertion is about how long something took. A "did not happen within a while" check can only pass
wrongly on a very slow machine, never fail wrongly.
"""

from __future__ import annotations

import threading

import pytest

from cachetrain.threads import InBackground, in_background

HANG = 60  # seconds: only ever reached when the code under test is broken


def _threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def _returns(call, what: str) -> None:
    """Run `call()` in a daemon thread of its own and fail (not hang) if it blocks; re-raise its error here."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG)
    assert not thread.is_alive(), f"{what} blocked"
    if errors:
        raise errors[0]


def test_a_producers_error_is_raised_in_the_caller_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise OSError("chunk 7 unreadable")

    got = []
    with pytest.raises(OSError, match="chunk 7 unreadable"):
        for item in in_background(items(), depth=2, name="t-producer-error"):
            got.append(item)
    assert got == [1, 2]
    assert not _threads_named("t-producer-error")


def test_a_consumer_that_stops_early_stops_the_producer_and_closes_its_items():
    """The caller breaks out (an exception in a training step) while the producer is blocked on a full
    queue: close() returns, the thread has ended, and the producer's own generator was closed there."""
    where_closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            where_closed.append(threading.current_thread().name)

    batches = in_background(endless(), depth=2, name="t-producer-stop")
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    _returns(batches.close, "closing an abandoned producer")
    assert not _threads_named("t-producer-stop")
    assert where_closed == ["t-producer-stop"]


def test_a_producer_runs_at_most_depth_items_ahead():
    depth = 3
    produced = 0
    consumed = 0
    ran_ahead = threading.Event()

    def items():
        nonlocal produced
        while True:
            produced += 1
            if produced - consumed > depth + 2:  # depth queued, one in the producer's hand, one the caller holds
                ran_ahead.set()
            yield produced

    batches = in_background(items(), depth=depth, name="t-producer-depth")
    next(batches)
    consumed = 1
    assert not ran_ahead.wait(1.0), f"the producer ran {produced - consumed} items ahead of a depth of {depth}"
    _returns(batches.close, "closing the producer")


def test_a_consumer_threads_error_is_raised_by_the_next_put_and_by_close():
    def handle(item: int) -> None:
        if item == 2:
            raise OSError("No space left on device: chunk 2")

    sink = InBackground(handle, depth=2, name="t-consumer-error")
    sink.put(1)
    sink.put(2)
    def put_more() -> None:
        for i in range(3, 1000):  # the thread fails while these are put; a put after that raises its error
            sink.put(i)

    with pytest.raises(OSError, match="chunk 2"):
        _returns(put_more, "a put after the consumer failed")
    with pytest.raises(OSError, match="chunk 2"):
        _returns(sink.close, "close after the consumer failed")
    assert not _threads_named("t-consumer-error")


def test_a_put_blocked_on_a_full_queue_gives_up_when_the_consumer_fails():
    """The writer thread dies while the caller waits for room: the caller gets the error, not a hang."""
    release = threading.Event()

    def handle(item: int) -> None:
        release.wait(HANG)
        raise OSError("disk gone")

    sink = InBackground(handle, depth=1, name="t-consumer-blocked")
    sink.put(0)  # taken by the thread, which waits on `release`
    sink.put(1)  # fills the queue, once the thread took item 0
    outcome = []
    blocked_put = threading.Thread(target=lambda: outcome.append(_put_or_error(sink, 2)), daemon=True)
    blocked_put.start()
    blocked_put.join(0.5)
    assert blocked_put.is_alive() and not outcome  # no room: item 1 waits behind item 0
    release.set()  # the thread fails on item 0 and never takes item 1: the queue stays full
    blocked_put.join(HANG)
    assert not blocked_put.is_alive(), "a put blocked on a queue nobody reads any more hung"
    assert outcome == ["disk gone"]
    with pytest.raises(OSError, match="disk gone"):
        _returns(sink.close, "close after the consumer failed")


def _put_or_error(sink: InBackground, item: int) -> str:
    try:
        sink.put(item)
        return "queued"
    except OSError as e:
        return str(e)


def test_a_consumer_holds_at_most_depth_pending_items_and_close_handles_them_all_in_order():
    depth = 2
    release = threading.Event()
    handled = []

    def handle(item: int) -> None:
        release.wait(HANG)
        handled.append(item)

    sink = InBackground(handle, depth=depth, name="t-consumer-depth")
    for i in range(depth + 1):  # one in the thread's hand, `depth` queued
        sink.put(i)
    extra = threading.Thread(target=sink.put, args=(depth + 1,), daemon=True)
    extra.start()
    extra.join(1.0)
    assert extra.is_alive(), f"a put returned with {depth + 1} items pending on a depth of {depth}"
    release.set()
    extra.join(HANG)
    _returns(sink.close, "close")
    assert handled == list(range(depth + 2))
    assert not _threads_named("t-consumer-depth")
