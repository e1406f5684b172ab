"""Vectorised crop+flip equals the per-sample definition."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cachetrain.augment import crop_flip


def test_crop_flip_matches_per_sample_reference():
    x = torch.randn(16, 3, 7, 9)
    out = crop_flip(x, padding=2, flip=True, rng=np.random.default_rng(3))
    rng = np.random.default_rng(3)  # replay the same draws
    oy, ox = rng.integers(0, 5, size=(16, 1))[:, 0], rng.integers(0, 5, size=(16, 1))[:, 0]
    mirrored = rng.random(16) < 0.5
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(16):
        ref = padded[i, :, oy[i]:oy[i] + 7, ox[i]:ox[i] + 9]
        if mirrored[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    assert 0 < mirrored.sum() < 16


def test_no_augmentation_is_identity():
    x = torch.randn(4, 2, 5, 5)
    assert crop_flip(x, 0, False, np.random.default_rng(0)) is x
