"""Per-batch, vectorised augmentation: random crop with zero padding and horizontal flip.

Works for images (stage 0) and cached feature maps (stages j > 0) alike, on whatever device the
batch is on: the random offsets are drawn on the host from a numpy Generator (so they are a pure
function of the caller's seed), then one gather does every sample's crop and flip at once.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, padding: int, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """x: (B, C, H, W). Returns a new (B, C, H, W) tensor; x itself is left untouched."""
    if padding == 0 and not flip:
        return x
    b, _, h, w = x.shape
    rows = np.broadcast_to(np.arange(h), (b, h))
    cols = np.broadcast_to(np.arange(w), (b, w))
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
        rows = rows + rng.integers(0, 2 * padding + 1, size=(b, 1))
        cols = cols + rng.integers(0, 2 * padding + 1, size=(b, 1))
    if flip:
        mirrored = rng.random(b) < 0.5
        cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
    dev = x.device
    bi = torch.arange(b, device=dev)[:, None, None]
    ri = torch.from_numpy(np.ascontiguousarray(rows)).to(dev)[:, :, None]
    ci = torch.from_numpy(np.ascontiguousarray(cols)).to(dev)[:, None, :]
    # advanced indices separated by a slice go first: (B, H, W, C), which permuted is a channels-last
    # (B, C, H, W): the layout convolutions want, at no copy
    return x[bi, :, ri, ci].permute(0, 3, 1, 2)


def batch_rng(seed: int, epoch: int, batch: int, rank: int = 0) -> np.random.Generator:
    """The augmentation stream of one batch (rank `rank`'s part of it under torchrun): independent of every
    other batch and rank, so resuming mid-epoch draws exactly what an uninterrupted run would have. Rank 0's
    stream is the single process's."""
    return np.random.default_rng([seed, epoch, batch, 0xA06] if rank == 0 else [seed, epoch, batch, 0xA06, rank])
