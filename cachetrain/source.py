"""What a stage's input is: a `Source`, whatever it is made of.

Stage 0 reads images (cachetrain/data: Fashion-MNIST, synthetic, image folders); stage j > 0 reads
stage j-1's cache (cachetrain/cache/source.py) or its outputs recomputed through frozen stages from
a nearer source (cachetrain/train/recompute.py). The trainer and the caching pass see only this
interface, so any input can feed any stage.

Every source serves three splits (SPLITS): "train", the part of the training split that is trained on;
"val", the samples held out of it (cachetrain.data.split; none when `data.val_samples` is 0); "test".
Only "train" is shuffled and augmented (`train_batches`); "val" and "test" are read plain, in sample
order (`eval_batches`), and an empty split yields no batch.

Resume state is (epoch, start_batch): `train_batches(epoch, bs, start_batch)` yields exactly the
batches an uninterrupted epoch would have yielded from that point on, since which samples form batch
b (and their augmentation draws) is a pure function of (seed, epoch, b).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from cachetrain.dist import Shard, check_shares, rank_batches

Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, C, H, W) float32 on the device, y (B,) int64
SPLITS = ("train", "val", "test")  # val: held out of the training split; may be empty


class Source(Protocol):
    fingerprint: str  # identifies what the batches hold (the plain samples, not the augmentation draws)
    sample_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int

    def num_samples(self, split: str) -> int:
        """Samples in `split` (one of SPLITS); 0 for "val" when the run has no validation split."""

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64, in sample order."""

    def steps_per_epoch(self, batch_size: int) -> int: ...

    def train_batches(self, epoch: int, batch_size: int, start_batch: int = 0,
                      augment: bool = True) -> Iterator[Batch]:
        """The training split (its "train" part, the validation samples left out), shuffled and augmented for
        `epoch`, from batch `start_batch` on."""

    def eval_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        """Plain batches in sample order from sample `start`: what evaluation and the caching pass read."""

    def share_sizes(self, epoch: int) -> list[int]:
        """Under torchrun, every rank's number of training samples in `epoch` (the same list on every rank);
        [num_samples("train")] in one process. The trainer weighs each rank's loss by it."""


def fingerprint(obj: object) -> str:
    """A short stable digest of a JSON-able description."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The stage-0 shuffle of the n training samples (the validation split left out) for `epoch`: a pure
    function of (seed, epoch), shared by every image source (tensors, folders, DALI), so all of them train
    on the same order and resume mid-epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_plan(mine: np.ndarray, batch_size: int, steps: int, shard: Shard, smallest: int,
               chunked: bool = False) -> list[np.ndarray]:
    """The samples of each training batch of an epoch, from this rank's share `mine` of the epoch's order:
    one process cuts it batch_size at a time (the last batch short); under torchrun each rank cuts its
    share into the same `steps` batches (cachetrain.dist.rank_batches), together one global batch, once
    `smallest` (the smallest share any rank can hold in any epoch; whole cache chunks if `chunked`) is
    known to fill them all."""
    if shard.world == 1:
        return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    check_shares(smallest, steps, chunked)
    return rank_batches(mine, steps)


def image_shares(n: int, shard: Shard) -> list[int]:
    """Every rank's number of samples when rank r takes every world-th of n, from the r-th (an image source's
    share of an epoch's shuffle): the same in every epoch, the smallest n // world."""
    return [len(range(r, n, shard.world)) for r in range(shard.world)]
