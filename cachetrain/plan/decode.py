"""The stage-0 input pipeline's rate: how many images a second the configured data delivers to a stage.

Every pass that starts from the images waits for it (cachetrain/plan/seconds.py). It is measured on
the dataset itself, through the same `Source` a stage trains on (`cachetrain.data.open_dataset`), so it
is whatever that source does for the configured data on this machine: for an image folder, PIL decoding
and torchvision's transforms in `loader.workers` DataLoader processes on the CPU, or NVIDIA DALI's
pipeline where it is installed and the device is a GPU (cachetrain/data/folder.py picks it; that path is
not exercised on a machine without a GPU); for the in-memory datasets, gathering, normalising and
augmenting batches. Both pipelines are timed: the training one (random crops and flips) and the plain
one that evaluations and caching passes read.

The first batch of a pass is left out of its rate: it pays for starting the workers, which an epoch of
ImageNet pays once and a measurement of a few seconds would otherwise count many times over. What it
waited beyond its own decoding at that rate is the pass's start (`start_seconds`), a term of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cachetrain.source import Source


@dataclass(frozen=True)
class DecodeRate:
    train_samples_per_s: float  # augmented training batches
    eval_samples_per_s: float  # plain batches (evaluation, caching passes)
    train_start_seconds: float  # until the first training batch arrived
    eval_start_seconds: float
    samples: int  # timed, both pipelines together
    start_seconds: float = 0.0  # what a pass pays before its rate: the first batch's wait beyond its own decoding


def _time_pass(batches, seconds: float) -> tuple[float, float, int]:
    """(samples/s after the first batch, seconds until the first batch, samples timed) of a batch iterator,
    read for about `seconds` or to its end."""
    t0 = time.perf_counter()
    first = next(batches, None)
    if first is None:
        raise ValueError("the split yielded no batch")
    t1 = time.perf_counter()
    n = 0
    try:
        for x, _ in batches:
            n += len(x)
            if time.perf_counter() - t1 >= seconds:
                break
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # DataLoader workers and prefetching stop here
    elapsed = time.perf_counter() - t1
    if n == 0:  # one batch in all: its time is all there is
        return len(first[0]) / (t1 - t0), t1 - t0, len(first[0])
    return n / elapsed, t1 - t0, n


def measure_decode(source: Source, batch_size: int, seconds: float = 3.0) -> DecodeRate:
    """The source's training (augmented) and plain pipelines, each read for about `seconds` past its first
    batch (or to the end of the training split), at `batch_size`."""
    train_rate, train_start, n_train = _time_pass(iter(source.train_batches(0, batch_size)), seconds)
    eval_rate, eval_start, n_eval = _time_pass(iter(source.eval_batches("train", batch_size)), seconds)
    first = min(batch_size, source.num_samples("train"))
    # the first batch waited for the workers to start and for its own decoding, which the rate already counts
    start = (max(0.0, train_start - first / train_rate) + max(0.0, eval_start - first / eval_rate)) / 2
    return DecodeRate(train_rate, eval_rate, train_start, eval_start, n_train + n_eval, start)
