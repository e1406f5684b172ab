"""Traversal orders: which sample comes when in an epoch, as a pure function of (seed, epoch, rank).

Each order is a small class with `indices(epoch) -> (n,) int64`, chosen by name from `ORDERS`.
Quasi-random is the default for caches: it shuffles whole chunks, then samples within a window of a
few consecutive (shuffled) chunks, so the loader decodes each chunk exactly once per epoch and holds
only about a window of chunks in memory, while batches still mix samples from several chunks.

With `world` > 1 ranks (data-parallel training), every rank draws the same chunk permutation and
takes every world-th chunk of it, so ranks read disjoint whole chunks and together cover the epoch.
Every rank can also compute every rank's share size (`share_sizes`), and the smallest share any rank
can get in any epoch (`smallest_share`), with no message: the loss weights and the batch-size check
under torchrun come from them (cachetrain.dist).
"""

from __future__ import annotations

import numpy as np


class _Order:
    shuffle_chunks = False  # whether each epoch deals the chunks to the ranks in a new permutation

    def __init__(self, num_samples: int, chunk_samples: int = 1, window_chunks: int = 1, seed: int = 0,
                 rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.num_samples, self.chunk_samples, self.window = num_samples, chunk_samples, window_chunks
        self.seed, self.rank, self.world = seed, rank, world

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_samples)

    def _dealt(self, epoch: int) -> np.ndarray:
        """Every chunk, in the order they are dealt to the ranks: a permutation all ranks share, or in order."""
        n = self.num_chunks
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle_chunks else np.arange(n)

    def _chunks(self, epoch: int) -> np.ndarray:
        """This rank's chunks: every world-th one dealt."""
        return self._dealt(epoch)[self.rank::self.world]

    def share_sizes(self, epoch: int) -> list[int]:
        """Every rank's number of samples in `epoch` (whole chunks; only the last chunk can be short)."""
        dealt = self._dealt(epoch)
        lengths = np.minimum(self.chunk_samples, self.num_samples - dealt * self.chunk_samples)
        return [int(lengths[r::self.world].sum()) for r in range(self.world)]

    def smallest_share(self) -> int:
        """The fewest samples any rank holds in any epoch. In order, every epoch deals alike; shuffled, the
        short last chunk can land on any rank, among those dealt floor(C / W) chunks too."""
        if not self.shuffle_chunks:
            return min(self.share_sizes(0))
        each = self.num_chunks // self.world  # 0: some rank gets no chunk at all
        last = self.num_samples - (self.num_chunks - 1) * self.chunk_samples
        return (each - 1) * self.chunk_samples + last if each else 0

    def _samples(self, chunks: np.ndarray) -> np.ndarray:
        cs, n = self.chunk_samples, self.num_samples
        if len(chunks) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(c * cs, min((c + 1) * cs, n)) for c in chunks]).astype(np.int64)


class Sequential(_Order):
    def indices(self, epoch: int) -> np.ndarray:
        return self._samples(self._chunks(epoch))


class Random(_Order):
    """A full permutation of this rank's samples: the best mixing, but it touches every chunk in every
    batch; for memmapped uncompressed stores, or small caches that fit in memory."""

    def indices(self, epoch: int) -> np.ndarray:
        mine = self._samples(self._chunks(epoch))
        return np.random.default_rng([self.seed, epoch, self.rank, 1]).permutation(mine)


class QuasiRandom(_Order):
    shuffle_chunks = True

    def indices(self, epoch: int) -> np.ndarray:
        chunks = self._chunks(epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank, 2])
        windows = [rng.permutation(self._samples(chunks[w:w + self.window]))
                   for w in range(0, len(chunks), self.window)]
        return np.concatenate(windows).astype(np.int64) if windows else np.zeros(0, dtype=np.int64)


ORDERS = {"sequential": Sequential, "random": Random, "quasi_random": QuasiRandom}
