"""Stage j's input computed on the fly: a base source's batches forwarded through frozen stages.

This is what the published layerCNN code does for every stage (base = the images, frozen = stages
0..j-1), the baseline the cache has to beat (`cache.mode: none`), and what a cache plan does for a
stage whose input is not cached (base = the nearest cached ancestor). The frozen stages run in eval
mode without autograd, in float32 (bf16 autocast on CUDA when `train.amp`).

`augment_base` says whether the base batches carry stage-0 augmentation. The published code reads
augmented images every epoch (`cache.mode: none` keeps that: it is the reference behaviour); a cache
plan must not change the training problem, only where features come from, so it reads the images
plain, as a cache of them would hold.

The val and test splits (and every split's labels and sizes) are the base's, forwarded like training
batches: a run with a validation split validates on the same samples whatever its input is made of.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from cachetrain.augment import batch_rng, crop_flip
from cachetrain.device import autocast

Batch = tuple[torch.Tensor, torch.Tensor]


class RecomputeSource:
    def __init__(self, base, frozen: list[nn.Module], out_shape: tuple[int, int, int], fingerprint: str,
                 device: torch.device, amp: bool, seed: int, crop_padding: int = 0, flip: bool = False,
                 augment_base: bool = True):
        self.base, self.frozen = base, nn.Sequential(*frozen).eval()
        self.sample_shape, self.fingerprint = out_shape, fingerprint
        self.num_classes = base.num_classes
        self.device, self.amp = device, amp
        self.seed, self.padding, self.flip = seed, crop_padding, flip
        self.augment_base = augment_base
        self.rank = base.shard.rank  # under torchrun, the base serves this rank's share of each batch
        self.forward_calls = 0  # frozen forwards run, for benchmarks and tests

    def num_samples(self, split: str) -> int:
        return self.base.num_samples(split)

    def labels(self, split: str) -> np.ndarray:
        return self.base.labels(split)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.base.steps_per_epoch(batch_size)

    def share_sizes(self, epoch: int) -> list[int]:
        return self.base.share_sizes(epoch)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_calls += 1
        with autocast(self.device, self.amp):
            return self.frozen(x).float()

    def train_batches(self, epoch: int, batch_size: int, start_batch: int = 0, augment: bool = True) -> Iterator[Batch]:
        base = self.base.train_batches(epoch, batch_size, start_batch, augment=self.augment_base)
        for b, (x, y) in enumerate(base, start=start_batch):
            x = self._forward(x)
            yield (crop_flip(x, self.padding, self.flip, batch_rng(self.seed, epoch, b, self.rank)) if augment else x), y

    def eval_batches(self, split: str, batch_size: int, start: int = 0) -> Iterator[Batch]:
        for x, y in self.base.eval_batches(split, batch_size, start):
            yield self._forward(x), y
