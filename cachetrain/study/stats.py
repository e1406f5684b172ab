"""Means and 95% intervals over seeds, and differences between settings, with Student's t.

With 3-5 seeds, a bootstrap interval has too few values to resample; the Student t-interval is the standard
choice and is what every interval of the report is:

    mean +- t(0.975, n - 1) * s / sqrt(n)             s: the sample standard deviation (n - 1 in the denominator)

A difference between two settings is Welch's: mean_a - mean_b +- t(0.975, df) * sqrt(s_a^2/n_a + s_b^2/n_b),
df by Welch-Satterthwaite; where both settings ran the same seeds (the same split, the same initial weights,
and for forks the very same first stages), the paired interval of the per-seed differences is given too. A
difference is *resolved* when its interval excludes 0, and *unresolved* otherwise: these seeds cannot tell
its sign. One value gives a mean and no interval.

The t quantile is computed here (no SciPy): the t density integrated by Simpson's rule on a fine grid, the
quantile found by Newton's method on that integral.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with df > 0 degrees of freedom."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    n = 4000  # Simpson intervals (even): error far below the 4 digits an interval shows
    grid = np.linspace(0.0, x, n + 1)
    dens = t_pdf(grid, df)
    weights = np.ones(n + 1)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    return 0.5 + float((x / n) / 3 * (weights * dens).sum())


def t_pdf(x, df: float):
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + np.asarray(x, dtype=float) ** 2 / df) ** (-(df + 1) / 2)


def t_quantile(p: float, df: float) -> float:
    """The p quantile (0.5 < p < 1) of Student's t with df degrees of freedom."""
    if not (0.5 < p < 1 and df > 0):
        raise ValueError(f"t_quantile: expected 0.5 < p < 1 and df > 0, got p={p}, df={df}")
    x = 2.0 if df >= 2 else 10.0  # start near the answer; Newton from the right converges (the cdf is concave there)
    for _ in range(100):
        step = (t_cdf(x, df) - p) / float(t_pdf(x, df))
        x -= step
        if x <= 0:
            x = 1e-3
        if abs(step) < 1e-10:
            break
    return x


@dataclass(frozen=True)
class Summary:
    """n values: their mean, sample standard deviation and the 95% t-interval [low, high] (None with n < 2)."""

    n: int
    mean: float | None
    sd: float | None = None
    half: float | None = None

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "sd": self.sd, "half": self.half, "low": self.low, "high": self.high}


def summarise(values: list[float | None]) -> Summary:
    """Mean and 95% t-interval of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return Summary(0, None)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(n, mean, sd, t_quantile(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Difference:
    """a - b with its 95% interval; `kind`: "welch" or "paired"."""

    kind: str
    n_a: int
    n_b: int
    diff: float
    half: float | None
    df: float | None

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.diff - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.diff + self.half

    @property
    def identical(self) -> bool:
        """Both sides' values are the same (a setting that changes nothing for this outcome)."""
        return self.diff == 0 and self.half == 0

    @property
    def resolved(self) -> bool | None:
        """The interval excludes 0 (None: no interval, or nothing to resolve: `identical`)."""
        return None if self.half is None or self.identical else (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n_a": self.n_a, "n_b": self.n_b, "diff": self.diff, "half": self.half,
                "low": self.low, "high": self.high, "df": self.df, "identical": self.identical,
                "resolved": self.resolved}


def welch(a: list[float], b: list[float]) -> Difference | None:
    """mean(a) - mean(b) with Welch's 95% interval (None when a side has no value; no interval with n < 2)."""
    a, b = [float(x) for x in a if x is not None], [float(x) for x in b if x is not None]
    if not a or not b:
        return None
    sa, sb = summarise(a), summarise(b)
    diff = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Difference("welch", sa.n, sb.n, diff, None, None)
    va, vb = sa.sd ** 2 / sa.n, sb.sd ** 2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference("welch", sa.n, sb.n, diff, 0.0, float(sa.n + sb.n - 2))
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    return Difference("welch", sa.n, sb.n, diff, t_quantile(0.5 + LEVEL / 2, df) * se, df)


def paired(a: dict, b: dict) -> Difference | None:
    """mean of a[s] - b[s] over the keys s (seeds) both have, with its 95% t-interval (None with no common key)."""
    common = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    if not common:
        return None
    s = summarise([a[k] - b[k] for k in common])
    return Difference("paired", s.n, s.n, s.mean, s.half, None if s.n < 2 else float(s.n - 1))
