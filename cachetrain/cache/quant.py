"""uint8 storage: per-channel affine quantisation of feature maps.

q = round((x - offset) / scale) clipped to [0, 255], x' = q * scale + offset, so |x - x'| <= scale / 2
for every value inside the calibrated range [offset, offset + 255 * scale]. Post-ReLU maps have
offset 0; the range's top is a per-channel percentile of values seen in a calibration pass over a
spread of training samples (the max by default: nothing clips).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import torch

Quant = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (scale, offset)
SAMPLES_PER_BATCH = 4096  # positions kept per batch when a percentile (not the max) is asked


def calibrate(outputs: Iterable[torch.Tensor], percentile: float = 100.0, seed: int = 0) -> Quant:
    """Per-channel (scale, offset) from batches of stage outputs (B, C, H, W)."""
    rng = np.random.default_rng(seed)
    lo = hi = None
    kept: list[np.ndarray] = []
    for y in outputs:
        flat = y.detach().float().transpose(0, 1).reshape(y.shape[1], -1)  # (C, B*H*W)
        bmin, bmax = flat.min(1).values.cpu().numpy(), flat.max(1).values.cpu().numpy()
        lo = bmin if lo is None else np.minimum(lo, bmin)
        hi = bmax if hi is None else np.maximum(hi, bmax)
        if percentile < 100:
            pick = rng.choice(flat.shape[1], size=min(SAMPLES_PER_BATCH, flat.shape[1]), replace=False)
            kept.append(flat[:, torch.from_numpy(pick).to(flat.device)].cpu().numpy())
    if lo is None:
        raise ValueError("calibration saw no batches")
    offset = np.minimum(lo, 0.0)  # ReLU maps: exactly 0, so zeros stay exact
    if percentile < 100:
        hi = np.percentile(np.concatenate(kept, axis=1), percentile, axis=1)
    scale = np.maximum(hi - offset, 1e-8) / 255.0
    return tuple(float(s) for s in scale), tuple(float(o) for o in offset)


@functools.lru_cache(maxsize=64)
def _tensors(quant: Quant, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) as (1, C, 1, 1) tensors on `device`, made once, not on every batch."""
    return tuple(torch.tensor(q, dtype=torch.float32).view(1, -1, 1, 1).to(device) for q in quant)


def quantize(y: torch.Tensor, quant: Quant) -> torch.Tensor:
    scale, offset = _tensors(quant, y.device)
    return ((y.float() - offset) / scale).round_().clamp_(0, 255).to(torch.uint8)


def dequantize(q: torch.Tensor, quant: Quant) -> torch.Tensor:
    """On whatever device q is: the loader calls this after the host-to-device copy."""
    scale, offset = _tensors(quant, q.device)
    return q.float().mul_(scale).add_(offset)
