"""Traversal orders: which sample comes when in an epoch, as a pure function of (seed, epoch).

Each order is a small class with `indices(epoch) -> (N,) int64`, chosen by name from `ORDERS`.
Quasi-random is the default for caches: it shuffles whole chunks, then samples within a window of a
few consecutive (shuffled) chunks, so the loader decodes each chunk exactly once per epoch and holds
only about a window of chunks in memory, while batches still mix samples from several chunks.
"""

from __future__ import annotations

import numpy as np


class Sequential:
    def __init__(self, num_samples: int, chunk_samples: int = 1, window_chunks: int = 1, seed: int = 0):
        self.num_samples = num_samples

    def indices(self, epoch: int) -> np.ndarray:
        return np.arange(self.num_samples, dtype=np.int64)


class Random:
    """A full permutation: the best mixing, but it touches every chunk in every batch; for memmapped
    uncompressed stores, or small caches that fit in memory."""

    def __init__(self, num_samples: int, chunk_samples: int = 1, window_chunks: int = 1, seed: int = 0):
        self.num_samples, self.seed = num_samples, seed

    def indices(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples).astype(np.int64)


class QuasiRandom:
    def __init__(self, num_samples: int, chunk_samples: int, window_chunks: int, seed: int = 0):
        self.num_samples, self.chunk_samples, self.window, self.seed = num_samples, chunk_samples, window_chunks, seed

    def indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        n, cs = self.num_samples, self.chunk_samples
        chunks = rng.permutation(-(-n // cs))
        out = []
        for w in range(0, len(chunks), self.window):
            members = np.concatenate([np.arange(c * cs, min((c + 1) * cs, n)) for c in chunks[w:w + self.window]])
            out.append(rng.permutation(members))
        return np.concatenate(out).astype(np.int64)


ORDERS = {"sequential": Sequential, "random": Random, "quasi_random": QuasiRandom}
