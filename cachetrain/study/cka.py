"""Linear CKA (centred kernel alignment, Kornblith et al. 2019, linear kernel): how similar two representations
of the same n samples are, invariant to orthogonal transforms and isotropic scaling of either, and to shifts.

    CKA(X, Y) = <Kc, Lc>_F / (||Kc||_F ||Lc||_F),  K = X X^T, L = Y Y^T, Kc = H K H, H = I - 11^T/n

Centring the Gram matrix is the same as centring the columns of X (H X X^T H = (HX)(HX)^T), and
<Xc Xc^T, Yc Yc^T>_F = ||Xc^T Yc||_F^2, so the value can be computed on n x n Gram matrices or on d x d cross
products; `linear_cka` takes whichever is smaller, so neither a large d (an unpooled stage output) nor a large n
costs more than it must.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_matrix(a: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a.detach().cpu())
    if t.ndim < 2:
        raise ValueError(f"linear_cka: {name} needs shape (n, d, ...); got {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1).to(torch.float64)


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Linear CKA in [0, 1] between x (n, d1, ...) and y (n, d2, ...) (trailing dims are flattened), computed in
    float64. 1 means the same representation up to rotation, scale and shift; near 0, unrelated. NaN when either
    representation is constant over the samples (CKA is undefined there)."""
    xm, ym = _as_matrix(x, "x"), _as_matrix(y, "y")
    if xm.shape[0] != ym.shape[0]:
        raise ValueError(f"linear_cka: x and y need the same samples; got {xm.shape[0]} and {ym.shape[0]} rows")
    if xm.shape[0] < 2:
        raise ValueError(f"linear_cka: needs at least 2 samples; got {xm.shape[0]}")
    xm = xm - xm.mean(0)
    ym = ym - ym.mean(0)
    n, d1, d2 = xm.shape[0], xm.shape[1], ym.shape[1]
    if n <= d1 + d2:  # Gram form: n x n matrices, about n^2 (d1 + d2) multiply-adds
        k, l_ = xm @ xm.T, ym @ ym.T
        hsic, kk, ll = (k * l_).sum(), (k * k).sum(), (l_ * l_).sum()
    else:  # feature form: d x d cross products, about n (d1 + d2)^2; the same numbers
        hsic = (xm.T @ ym).pow(2).sum()
        kk, ll = (xm.T @ xm).pow(2).sum(), (ym.T @ ym).pow(2).sum()
    denom = float(kk.sqrt() * ll.sqrt())
    return float(hsic) / denom if denom > 0 else float("nan")


def cka_features(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) stage output -> (B, C * min(H, 4) * min(W, 4)) float32: what the greedy-vs-end-to-end CKA
    compares. Pooling to at most 4x4 keeps coarse spatial layout (which a global average would throw away) while
    bounding the size: a 64-channel 28x28 stage is 50,176 numbers a sample, i.e. 800 MB in float64 for 2,000
    samples per network; pooled it is 1,024 (16 MB)."""
    if x.ndim != 4:
        raise ValueError(f"cka_features: expected a (B, C, H, W) tensor; got shape {tuple(x.shape)}")
    return F.adaptive_avg_pool2d(x.float(), (min(x.shape[2], 4), min(x.shape[3], 4))).flatten(1)
