"""The critical layer: the stage after which greedy training stops improving what generalises while it keeps
improving what it fits. Read from per-stage accuracies of the auxiliary heads; a pure function of two curves."""

from __future__ import annotations

# Float noise: 100 * (0.903 - 0.900) is 0.2999...; a gain within this of delta * (i - j) counts as reaching it.
_EPS = 1e-9

RULE = ("the critical layer is the first stage j < J-1 such that every later stage i gains less than {delta} "
        "points per stage over j on validation accuracy (100*(val[i]-val[j]) < {delta}*(i-j) for all i > j) "
        "while training accuracy keeps rising (train[J-1] > train[j])")


def _missing(values: list[float | None]) -> str:
    """"stage 1" / "stages 1, 3" where a value is None; "" when none is."""
    gaps = [str(j) for j, v in enumerate(values) if v is None]
    return ("stages " if len(gaps) > 1 else "stage ") + ", ".join(gaps) if gaps else ""


def critical_layer(val_acc: list[float | None], train_acc: list[float | None], delta: float = 0.3) -> dict:
    """Apply RULE to per-stage accuracies (fractions in [0, 1], index = stage j; `delta` in percentage points).

    Returns {"stage": j or None, "rule": RULE with delta filled in, "reason": why, "delta": delta}. Missing values
    (None) or too few stages give stage None with the reason; this never raises on data."""
    out = {"stage": None, "rule": RULE.format(delta=delta), "reason": "", "delta": delta}
    J = len(val_acc)
    if len(train_acc) != J:
        out["reason"] = f"validation and training accuracy cover different stages ({J} vs {len(train_acc)})"
        return out
    if J < 2:
        out["reason"] = f"needs at least 2 stages; got {J}"
        return out
    if all(v is None for v in val_acc):
        out["reason"] = "no validation accuracy recorded"
        return out
    if gaps := _missing(val_acc):
        out["reason"] = f"validation accuracy missing at {gaps}"
        return out
    if gaps := _missing(train_acc):
        out["reason"] = f"training accuracy missing at {gaps}"
        return out

    def gain(i: int, j: int) -> float:  # points per stage from j to i
        return 100 * (val_acc[i] - val_acc[j]) / (i - j)

    plateaus = [j for j in range(J - 1) if all(gain(i, j) < delta - _EPS for i in range(j + 1, J))]
    for j in plateaus:
        if train_acc[J - 1] > train_acc[j]:
            best = max(gain(i, j) for i in range(j + 1, J))
            out["stage"] = j
            out["reason"] = (f"after stage {j} validation accuracy gains at most {best:+.2f} points per stage "
                             f"(< {delta}) while training accuracy rises from {100 * train_acc[j]:.2f}% to "
                             f"{100 * train_acc[J - 1]:.2f}% at stage {J - 1}")
            return out
    if not plateaus:
        out["reason"] = (f"validation accuracy still gains >= {delta} points per stage up to the last stage "
                         f"(stage {J - 1})")
    else:
        out["reason"] = (f"validation accuracy plateaus after stage {plateaus[0]}, but training accuracy does not "
                         f"keep rising (stage {J - 1}: {100 * train_acc[J - 1]:.2f}% <= stage {plateaus[0]}: "
                         f"{100 * train_acc[plateaus[0]]:.2f}%)")
    return out
