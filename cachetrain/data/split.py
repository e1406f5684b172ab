"""The validation split: samples held out of the training split by a seeded permutation.

`data.val_samples` says how many (None: 1/12 of the training split, at least 1; an int: that many,
0 for none; a float in (0, 1): that fraction, at least 1) and `data.split_seed` which. The split is
drawn over the training split as the run uses it (after `data.train_subset`, and after an image
folder's skipped files are left out), from `split_seed` alone: runs that differ only in `train.seed`
validate on the same samples. Both parts keep the original sample order (sorted indices), so an image
folder's class-sorted file list stays class-sorted in each.

What the split is (`ValSplit.metadata`: seed, count, sha256 of the held-out indices) goes into the
dataset fingerprint, so a checkpoint or cache made under another split, or before there was one, is
stale by the usual lineage check, and into the run's metadata (`run.json`), so a run says which
samples it validated on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cachetrain.config import DataConfig
from cachetrain.errors import DataError

# mixed into the split's seed, so the split's permutation is not the stage-0 shuffle of some epoch
# (cachetrain.source.epoch_order seeds with [seed, epoch]) when split_seed equals a training seed
_SPLIT_STREAM = 0x5E1A


@dataclass(frozen=True)
class ValSplit:
    """Indices into the training split as opened (after train_subset): each part sorted."""

    seed: int
    train: np.ndarray  # (N - V,) int64
    val: np.ndarray  # (V,) int64

    @property
    def indices_sha256(self) -> str:
        """sha256 of the validation indices as little-endian int64: names the held-out samples exactly."""
        return hashlib.sha256(self.val.astype("<i8").tobytes()).hexdigest()

    def metadata(self) -> dict:
        return {"seed": self.seed, "samples": len(self.val), "indices_sha256": self.indices_sha256}

    def fingerprint_keys(self) -> dict:
        """What the split adds to a dataset's fingerprint: nothing when no sample is held out, so a run made
        before there were splits, on the same samples, stays valid (`data.val_samples: 0`)."""
        return {"val_split": self.metadata()} if len(self.val) else {}


def val_count(cfg: DataConfig, n: int) -> int:
    """How many of the training split's `n` samples `data.val_samples` holds out; a DataError when that
    leaves none to train on."""
    v = cfg.val_samples
    if v is None:
        count = max(1, round(n / 12))
    elif isinstance(v, float):
        count = max(1, round(v * n))  # a fraction asks for a split: never rounded away to none
    else:
        count = v
    if count >= n:
        raise DataError(f"data.val_samples: {v!r} holds out {count} of the {n} samples of the training split "
                        f"(after data.train_subset), which leaves no training sample; expected fewer than {n} "
                        f"samples or a smaller fraction")
    return count


def hold_out(cfg: DataConfig, n: int) -> ValSplit:
    """The validation split of a training split of `n` samples: a pure function of (val_samples, split_seed, n)."""
    count = val_count(cfg, n)
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng([cfg.split_seed, _SPLIT_STREAM]).permutation(n)[:count]] = True
    return ValSplit(seed=cfg.split_seed, train=np.flatnonzero(~held).astype(np.int64),
                    val=np.flatnonzero(held).astype(np.int64))
