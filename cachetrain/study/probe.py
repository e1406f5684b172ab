"""Linear probes: how linearly decodable the classes are from a frozen stage output.

A probe is multinomial logistic regression (one linear layer + cross-entropy, L2 on the weights) on pooled,
standardised features, fitted full batch with L-BFGS. Full batch because the problem is convex and small
(features x classes weights), so a quasi-Newton method converges in tens of iterations with no learning rate or
epoch count to tune: what a probe measures is the features, not its optimiser's settings.

Cost, measured on the project's 2-core CPU box (2 torch threads, float32, 10 classes, max_iter=100): each
L-BFGS function evaluation is a pass over the (N, D) features (~0.15-0.3 s at 55,000 x 2,048), so time is
evaluations x that. 55,000 x 2,048 (a 2x2 probe of a 512-channel stage): 10 s when well conditioned (converged
in 19 iterations, 30 evaluations), 17 s when the features are strongly correlated (stops at 100 iterations; test
accuracy within 0.1 point of running to 225); with other jobs on the cores, 14-22 s and up to 78 s. 55,000 x 256
(GAP of a 256-channel stage): 0.4 s. The first call in a process pays ~5 s of one-time torch warm-up.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

PROBE_POOLS = ("gap", "2x2")


def pool_features(x: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, C, H, W) stage output -> (B, D) float32 probe input.

    "gap": global average pool, D = C. "2x2": average pool to a 2x2 grid and flatten, D = 4C; keeps coarse
    position, which GAP throws away. "2x2" needs H, W >= 2 (a ValueError otherwise: callers skip that pool)."""
    if x.ndim != 4:
        raise ValueError(f"pool_features: expected a (B, C, H, W) tensor; got shape {tuple(x.shape)}")
    x = x.float()
    if pool == "gap":
        return x.mean(dim=(2, 3))
    if pool == "2x2":
        if x.shape[2] < 2 or x.shape[3] < 2:
            raise ValueError(f"pool_features: pool '2x2' needs H, W >= 2; got {x.shape[2]}x{x.shape[3]}")
        return F.adaptive_avg_pool2d(x, 2).flatten(1)
    raise ValueError(f"pool_features: unknown pool {pool!r}; expected one of {PROBE_POOLS}")


def _check_split(name: str, xy: tuple[torch.Tensor, torch.Tensor], num_classes: int) -> None:
    x, y = xy
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_probe: split '{name}' needs (N, D) features and (N,) labels; "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"fit_probe: split '{name}' has labels outside [0, {num_classes}); "
                         f"got {int(y.min())}..{int(y.max())}")


@torch.no_grad()
def _accuracy(linear: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
              std: torch.Tensor, chunk: int = 8192) -> float | None:
    """Accuracy on raw features, standardised chunk by chunk so a big eval set is never copied whole."""
    if y.numel() == 0:
        return None
    correct = 0
    for i in range(0, y.numel(), chunk):
        xs = (x[i:i + chunk].float() - mean) / std
        correct += int((linear(xs).argmax(1) == y[i:i + chunk]).sum())
    return correct / y.numel()


def fit_probe(train: tuple[torch.Tensor, torch.Tensor], evals: dict[str, tuple[torch.Tensor, torch.Tensor]],
              num_classes: int, *, l2: float = 1e-4, max_iter: int = 100, seed: int = 0) -> dict:
    """Fit a linear probe on `train` = (features (N, D), labels (N,)) and score it on each of `evals`.

    Features are standardised with the train mean and std (a constant feature keeps std 1), so one L2 strength
    `l2` (on the weights, not the bias: loss = mean cross-entropy + l2/2 * ||W||^2) means the same thing at every
    stage whatever the feature scale. Runs float32 on the CPU; the result is the same for the same inputs and
    seed. Returns {"train_acc", "<name>_acc" for each eval set (None when it is empty), "train_loss" (the mean
    cross-entropy, without the L2 term), "iterations" (L-BFGS iterations run), "seconds", "dims", "train_samples"}.
    """
    if l2 < 0 or max_iter < 1 or num_classes < 2:
        raise ValueError(f"fit_probe: need l2 >= 0, max_iter >= 1, num_classes >= 2; "
                         f"got l2={l2}, max_iter={max_iter}, num_classes={num_classes}")
    _check_split("train", train, num_classes)
    if train[1].numel() == 0:
        raise ValueError("fit_probe: the train split is empty")
    for name, xy in evals.items():
        _check_split(name, xy, num_classes)
        if xy[0].shape[1] != train[0].shape[1]:
            raise ValueError(f"fit_probe: split '{name}' has {xy[0].shape[1]} features; train has {train[0].shape[1]}")
    t0 = time.perf_counter()
    x, y = train[0].float().cpu(), train[1].long().cpu()
    var, mean = torch.var_mean(x, dim=0, correction=0)
    std = torch.where(var > 1e-12, var.sqrt(), torch.ones_like(var))
    xs = (x - mean).div_(std)  # (N, D): one standardised copy, reused by every L-BFGS function evaluation

    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():  # small random start: seeded, so a probe is reproducible
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.01)
        linear.bias.zero_()
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-7, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(xs), y) + 0.5 * l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_loss = float(F.cross_entropy(linear(xs), y))
        train_acc = float((linear(xs).argmax(1) == y).float().mean())
    del xs
    result: dict = {"train_acc": train_acc}
    for name, (ex, ey) in evals.items():
        result[f"{name}_acc"] = _accuracy(linear, ex.cpu(), ey.long().cpu(), mean, std)
    result.update(train_loss=train_loss, iterations=int(opt.state[linear.weight].get("n_iter", 0)),
                  seconds=time.perf_counter() - t0, dims=int(x.shape[1]), train_samples=int(x.shape[0]))
    return result
