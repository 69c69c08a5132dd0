"""Non-inferiority of a variant's score against its base on the same items: is the relative loss
1 - C/B (C, B: the variant's and the base's mean score) shown to be below a margin, shown to be
beyond it, or neither?

Paired items scored 0 or 1 (accuracy, exact match) fall in four cells: both right (k), a harmful
flip (base right, variant wrong: h), a beneficial flip (g), both wrong (z). The loss is within the
margin m when C >= (1 - m) B, that is when the mean of d = c - (1 - m) b over the items is
positive. The test is the one-sided score test of that mean (the null-restricted maximum
likelihood of the four cells gives its variance, as Tango's and Tang, Tang and Chan's tests for
matched pairs do): a variant with no harmful flip on a few items is not taken as evidence of no
loss, because the null's variance keeps room for the flips a loss at the margin would bring.
Simulated at the margin (tests/evaluation/test_noninferiority.py, `slipway bench gates`), it
passes a variant at the margin at about the nominal rate alpha, and less on small suites.

Scores that are not all 0 or 1 (F1, ...) take the paired t statistic of d instead (asymptotic);
aggregate scores without items take the two reported standard errors (asymptotic, unpaired).

The confidence interval of the loss is the set of margins the test would not decide at: its upper
end is below the margin exactly when the variant passes, its lower end above it exactly when it
fails (each one-sided at alpha).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

Decision = Literal["pass", "fail", "inconclusive"]
POWER = 0.8  # of the smallest detectable loss


@dataclass(frozen=True)
class Flips:
    """Paired 0/1 items by cell."""

    both: int  # right on both
    harmful: int  # right on the base, wrong on the variant
    beneficial: int  # wrong on the base, right on the variant
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.harmful + self.beneficial + self.neither

    @property
    def base_right(self) -> int:
        return self.both + self.harmful

    def identical(self) -> Flips:
        """The same base with a variant that flips nothing."""
        return Flips(self.base_right, 0, 0, self.n - self.base_right)


@dataclass(frozen=True)
class Comparison:
    decision: Decision
    loss: float  # relative: 1 - C/B
    lower: float  # one-sided (1 - alpha) bounds of the loss
    upper: float
    margin: float
    alpha: float
    n: int
    harmful: int  # items the variant got worse on
    beneficial: int  # items it got better on
    detectable: float | None  # the loss the suite finds (shows > 0) with POWER; None: unknown
    needed: int | None  # items an identical variant needs to pass; None: this suite is enough
    method: str

    @property
    def too_small(self) -> bool:
        return self.needed is not None

    def describe(self) -> str:
        parts = [
            f"loss {self.loss:+.1%} (one-sided {1 - self.alpha:.0%} bounds {self.lower:+.1%} "
            f"to {self.upper:+.1%}) against a margin of {self.margin:.1%}",
            f"{self.harmful} harmful and {self.beneficial} beneficial flips in {self.n} items",
        ]
        if self.detectable is not None:
            parts.append(f"smallest loss this suite detects: {self.detectable:.1%}")
        if self.needed is not None:
            parts.append(
                f"suite too small for its margin: an identical variant needs about "
                f"{self.needed} items to pass"
            )
        return "; ".join(parts) + f" ({self.method})"


def z_of(alpha: float) -> float:
    return NormalDist().inv_cdf(1 - alpha)


def flips(base: Sequence[float], variant: Sequence[float]) -> Flips:
    pairs = list(zip(base, variant, strict=True))
    return Flips(
        sum(1 for b, c in pairs if b and c),
        sum(1 for b, c in pairs if b and not c),
        sum(1 for b, c in pairs if not b and c),
        sum(1 for b, c in pairs if not b and not c),
    )


def score_z(cells: Flips, ratio: float) -> float:
    """The score statistic of mean(c - ratio * b) > 0: positive when the variant keeps more than
    `ratio` of the base's score."""
    counts = (cells.both, cells.harmful, cells.beneficial, cells.neither)
    weights = (1 - ratio, -ratio, 1.0, 0.0)
    n = cells.n
    mean = sum(x * w for x, w in zip(counts, weights, strict=True)) / n
    probs = _restricted(counts, weights)
    variance = sum(p * w * w for p, w in zip(probs, weights, strict=True))
    if variance <= 0:
        return math.copysign(math.inf, mean) if mean else 0.0
    return mean / math.sqrt(variance / n)


def _restricted(counts: Sequence[int], weights: Sequence[float]) -> list[float]:
    """The cells' maximum-likelihood probabilities under mean(w) = 0: p_j = x_j / (n + l w_j)
    with l the root of sum x_j w_j / (n + l w_j) = 0; where that root falls outside the range
    that keeps every p_j positive, an empty cell at the range's end takes the rest."""
    n = sum(counts)
    lo = max((-n / w for w in weights if w > 0), default=-math.inf)
    hi = min((-n / w for w in weights if w < 0), default=math.inf)

    def slope(lam: float) -> float:
        return sum(x * w / (n + lam * w) for x, w in zip(counts, weights, strict=True) if x)

    span = hi - lo if math.isfinite(hi - lo) else 2 * n
    a = lo + span * 1e-12 if math.isfinite(lo) else -1e6 * n
    b = hi - span * 1e-12 if math.isfinite(hi) else 1e6 * n
    if slope(a) <= 0:
        lam, edge = a, lo
    elif slope(b) >= 0:
        lam, edge = b, hi
    else:
        edge = None
        for _ in range(200):
            lam = (a + b) / 2
            if slope(lam) > 0:
                a = lam
            else:
                b = lam
        lam = (a + b) / 2
    probs = [x / (n + lam * w) if x else 0.0 for x, w in zip(counts, weights, strict=True)]
    if edge is not None:  # the empty cell whose n + l w_j vanishes there holds the rest
        for j, (x, w) in enumerate(zip(counts, weights, strict=True)):
            if not x and w and math.isclose(n + edge * w, 0.0, abs_tol=1e-9 * n):
                probs[j] = max(0.0, 1.0 - sum(probs))
                break
    return probs


def paired_t(base: Sequence[float], variant: Sequence[float], ratio: float) -> float:
    d = [c - ratio * b for b, c in zip(base, variant, strict=True)]
    n = len(d)
    mean = sum(d) / n
    variance = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    if variance <= 0:
        return math.copysign(math.inf, mean) if mean else 0.0
    return mean / math.sqrt(variance / n)


def _bound(stat, z: float, lo: float = 1e-6, hi: float = 20.0) -> float:
    """The ratio where stat(ratio), decreasing, crosses z (lo or hi when it never does there)."""
    if stat(lo) <= z:
        return lo
    if stat(hi) >= z:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if stat(mid) > z:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def compare(
    base: Sequence[float], variant: Sequence[float], margin: float, alpha: float
) -> Comparison:
    """The variant's per-item scores against the base's, on the same items in the same order."""
    if len(base) != len(variant) or len(base) < 2:
        raise ValueError(
            f"need the same items, at least 2, scored on both: base {len(base)}, "
            f"variant {len(variant)}"
        )
    z = z_of(alpha)
    binary = all(v in (0, 1) for v in (*base, *variant))
    cells = flips(base, variant)
    if binary:

        def stat(ratio: float, cells: Flips = cells) -> float:
            return score_z(cells, ratio)

        method = f"paired score test, one-sided alpha {alpha:g}"
    else:

        def stat(ratio: float) -> float:
            return paired_t(base, variant, ratio)

        method = f"paired t on c - (1 - margin) b (asymptotic), one-sided alpha {alpha:g}"
    b_mean, c_mean = sum(base) / len(base), sum(variant) / len(variant)
    if b_mean <= 0:
        return _unmeasurable(cells, margin, alpha, method)
    comparison = _decide(stat, b_mean, c_mean, margin, z)
    return Comparison(
        **comparison,
        margin=margin,
        alpha=alpha,
        n=len(base),
        harmful=cells.harmful,
        beneficial=cells.beneficial,
        detectable=_detectable(comparison["lower"], comparison["upper"], z),
        needed=_needed(cells, margin, z) if binary else None,
        method=method,
    )


def compare_unpaired(
    base: float, base_se: float, variant: float, variant_se: float, margin: float, alpha: float
) -> Comparison:
    """From aggregate scores and their standard errors alone (no per-item scores)."""
    z = z_of(alpha)

    def stat(ratio: float) -> float:
        se = math.hypot(variant_se, ratio * base_se)
        diff = variant - ratio * base
        return diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0

    method = f"unpaired, from the standard errors (asymptotic), one-sided alpha {alpha:g}"
    if base <= 0:
        return _unmeasurable(Flips(0, 0, 0, 0), margin, alpha, method)
    comparison = _decide(stat, base, variant, margin, z)
    return Comparison(
        **comparison,
        margin=margin,
        alpha=alpha,
        n=0,
        harmful=0,
        beneficial=0,
        detectable=_detectable(comparison["lower"], comparison["upper"], z),
        needed=None,
        method=method,
    )


def _decide(stat, b_mean: float, c_mean: float, margin: float, z: float) -> dict:
    at_margin = stat(1 - margin)
    decision: Decision = "pass" if at_margin > z else "fail" if at_margin < -z else "inconclusive"
    return {
        "decision": decision,
        "loss": 1 - c_mean / b_mean,
        "upper": 1 - _bound(stat, z),
        "lower": 1 - _bound(stat, -z),
    }


def _detectable(lower: float, upper: float, z: float) -> float | None:
    """About the loss the suite shows to be above 0 with POWER: (z_alpha + z_power) standard
    errors, the standard error read off the interval's width (2 z of them)."""
    if not (math.isfinite(lower) and math.isfinite(upper)):
        return None
    return (z + NormalDist().inv_cdf(POWER)) * (upper - lower) / (2 * z)


def _needed(cells: Flips, margin: float, z: float) -> int | None:
    """Items an identical variant would need to pass, when this suite is too small for that
    (the statistic grows as the square root of the items at fixed shares); None when it passes."""
    at = score_z(cells.identical(), 1 - margin)
    return None if at > z else math.ceil(cells.n * (z / at) ** 2) + 1


def _unmeasurable(cells: Flips, margin: float, alpha: float, method: str) -> Comparison:
    return Comparison(
        decision="inconclusive",
        loss=math.nan,
        lower=-math.inf,
        upper=math.inf,
        margin=margin,
        alpha=alpha,
        n=cells.n,
        harmful=cells.harmful,
        beneficial=cells.beneficial,
        detectable=None,
        needed=None,
        method=method + "; the base scores 0, so no loss can be measured",
    )
