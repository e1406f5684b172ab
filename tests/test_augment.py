"""Vectorised crop+flip equals the per-sample definition: each sample, a window of its zero-padded self,
mirrored or not."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cachetrain.augment import crop_flip


class FixedDraws:
    """An rng whose every draw is one value: offsets `offset`, and `u` for the flip's uniform (< 0.5 mirrors)."""

    def __init__(self, offset: int, u: float):
        self.offset, self.u = offset, u

    def integers(self, low, high, size):
        assert low <= self.offset < high
        return np.full(size, self.offset)

    def random(self, size):
        return np.full(size, self.u)


def test_crop_flip_by_hand():
    x = torch.arange(1, 10, dtype=torch.float32).reshape(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    top_left = crop_flip(x, padding=1, flip=True, rng=FixedDraws(0, u=0.9))  # window at (0, 0), not mirrored
    assert top_left[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    mirrored = crop_flip(x, padding=1, flip=True, rng=FixedDraws(0, u=0.1))
    assert mirrored[0, 0].tolist() == [[0, 0, 0], [2, 1, 0], [5, 4, 0]]
    bottom_right = crop_flip(x, padding=1, flip=False, rng=FixedDraws(2, u=0.9))
    assert bottom_right[0, 0].tolist() == [[5, 6, 0], [8, 9, 0], [0, 0, 0]]
    assert torch.equal(x, torch.arange(1, 10, dtype=torch.float32).reshape(1, 1, 3, 3))  # x left untouched


def test_crop_flip_matches_per_sample_reference():
    """Every output sample is exactly one of the (2p+1)^2 windows of its padded input, mirrored or not, and
    the draws vary across the batch. Nothing here replays the function's own random draws."""
    x = torch.randn(16, 3, 7, 9)
    original = x.clone()
    out = crop_flip(x, padding=2, flip=True, rng=np.random.default_rng(3))
    assert out.shape == x.shape and torch.equal(x, original)
    padded = F.pad(x, (2, 2, 2, 2))
    found = []
    for i in range(16):
        matches = [(oy, ox, m) for oy in range(5) for ox in range(5) for m in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if m else w)(padded[i, :, oy:oy + 7, ox:ox + 9]))]
        assert len(matches) == 1, (i, matches)
        found.append(matches[0])
    assert len({(oy, ox) for oy, ox, _ in found}) > 4  # offsets differ across samples
    assert 0 < sum(m for _, _, m in found) < 16  # some mirrored, some not
    again = crop_flip(x, padding=2, flip=True, rng=np.random.default_rng(3))
    assert torch.equal(again, out)  # a pure function of the rng's seed


def test_no_augmentation_is_identity():
    x = torch.randn(4, 2, 5, 5)
    assert crop_flip(x, 0, False, np.random.default_rng(0)) is x
