"""The drift check's decision rule: when a feature has drifted, with the false alarms bounded.

A feature drifts when BOTH hold:
- its two-sample test rejects at the feature's share of the alarm budget, and
- its effect size reaches the feature's floor (configs/drift.yaml), so that a large sample does
  not alarm on a change too small to matter.

The alarm budget (configs/drift.yaml: false_alarm_rate alpha over horizon_looks looks H; by
default 0.05 over a week of the hourly schedule, 168 looks). Each look spends alpha / H, split
evenly over the k features it compares: each test runs at alpha / (H k). By the union bound
(Bonferroni), on traffic that did not change the chance that ANY feature is flagged at ANY look
of the horizon is at most the sum of those levels, alpha, whatever the dependence between
features and looks. The floors only take verdicts away, so the bound stands with them. It holds
per horizon: over a year of hourly looks, expect at most 52 x alpha false alarms; a look run by
hand (`slipway drift`) spends budget too.

What each feature kind is tested and measured with (the effect sizes are Evidently's, and the
report shows them; tests/evaluation/test_drift.py checks the numbers are equal):
- numbers (tokens, latency, TTFT, prompt descriptors): Kolmogorov-Smirnov two-sample test, p from
  the asymptotic Kolmogorov distribution (conservative at finite samples; ties, as in token
  counts, make it more so); effect size: the Wasserstein distance over the reference's standard
  deviation (Evidently's "wasserstein", normed).
- tenant: Pearson's chi-square test of homogeneity on the counts; effect size: Jensen-Shannon
  distance of the shares (natural log; Evidently's "jensenshannon").
- is_error: two-proportion z-test, pooled (Evidently's "z"); effect size: the absolute change in
  the error rate.

Every function takes a batch: arrays with one row per look, so that the benchmark can simulate
a hundred thousand looks in numpy (evaluation/benchmarks/drift.py) with the very code a check runs.
NaN marks a missing value (TTFT of a non-streamed request, descriptors of an unlogged prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special, stats

NUMBER_TEST, TENANT_TEST, ERROR_TEST = "ks", "chisquare", "z"
NUMBER_EFFECT, TENANT_EFFECT, ERROR_EFFECT = "wasserstein", "jensenshannon", "abs_rate_change"


@dataclass(frozen=True)
class Stats:
    """Per look: the test's p-value and the effect size (arrays, one entry per look)."""

    p_value: np.ndarray
    effect: np.ndarray


def feature_level(false_alarm_rate: float, horizon_looks: int, compared: int) -> float:
    """The level each feature's test runs at: the look's share of the budget, split over the
    features it compares."""
    return false_alarm_rate / horizon_looks / max(compared, 1)


def drifted(stats: Stats, level: float, floor: float) -> np.ndarray:
    """The verdict: the test rejects at `level` and the effect reaches `floor`."""
    return (stats.p_value < level) & (stats.effect >= floor)


def numbers(reference: np.ndarray, current: np.ndarray) -> Stats:
    """KS p-value and normed Wasserstein distance per row of `reference` (looks x n1) against
    `current` (looks x n2); NaNs are left out. A row with no values on a side gets p 1, effect 0."""
    ref = np.atleast_2d(np.asarray(reference, dtype="float64"))
    cur = np.atleast_2d(np.asarray(current, dtype="float64"))
    n1 = np.sum(~np.isnan(ref), axis=1)
    n2 = np.sum(~np.isnan(cur), axis=1)
    empty = (n1 == 0) | (n2 == 0)
    values = np.concatenate([ref, cur], axis=1)
    order = np.argsort(values, axis=1)  # NaNs sort last; the order among equal values is moot
    v = np.take_along_axis(values, order, axis=1)
    known = ~np.isnan(v)
    up, down = 1.0 / np.maximum(n1, 1)[:, None], -1.0 / np.maximum(n2, 1)[:, None]
    # F_ref - F_cur just after each value (NaN steps come last and are never read); it is a
    # difference of the two ECDFs only after the last of equal values.
    gap = np.abs(np.cumsum(np.where(order < ref.shape[1], up, down), axis=1))
    last = known
    last[:, :-1] &= v[:, 1:] != v[:, :-1]
    d = np.max(np.where(last, gap, 0.0), axis=1)
    # W1 = integral of |F_ref - F_cur| dx, a step function between consecutive values.
    widths = np.diff(v, axis=1)
    widths[np.isnan(widths)] = 0.0
    w1 = np.sum(gap[:, :-1] * widths, axis=1)
    mean = np.nansum(ref, axis=1, keepdims=True) / np.maximum(n1, 1)[:, None]
    std = np.sqrt(np.nansum((ref - mean) ** 2, axis=1) / np.maximum(n1, 1))  # np.std's, ddof 0
    norm = np.maximum(std, 0.001)
    p = special.kolmogorov(np.sqrt(n1 * n2 / np.maximum(n1 + n2, 1)) * d)
    return Stats(np.where(empty, 1.0, p), np.where(empty, 0.0, w1 / norm))


def categories(reference: np.ndarray, current: np.ndarray) -> Stats:
    """Chi-square homogeneity p-value and Jensen-Shannon distance per row of category counts
    (looks x categories) of the reference against the current window."""
    ref = np.atleast_2d(np.asarray(reference, dtype="float64"))
    cur = np.atleast_2d(np.asarray(current, dtype="float64"))
    n1, n2 = ref.sum(axis=1, keepdims=True), cur.sum(axis=1, keepdims=True)
    total = ref + cur
    seen = total > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        e1, e2 = total * n1 / (n1 + n2), total * n2 / (n1 + n2)
        chi2 = np.sum(np.where(seen, (ref - e1) ** 2 / e1 + (cur - e2) ** 2 / e2, 0.0), axis=1)
        dof = seen.sum(axis=1) - 1
        p = np.where(dof > 0, stats.chi2.sf(chi2, np.maximum(dof, 1)), 1.0)
        a, b = ref / n1, cur / n2
        m = (a + b) / 2
        js = np.sqrt(np.maximum(np.sum(special.rel_entr(a, m) + special.rel_entr(b, m), 1), 0) / 2)
    empty = (n1[:, 0] == 0) | (n2[:, 0] == 0)
    return Stats(np.where(empty, 1.0, p), np.where(empty, 0.0, js))


def proportions(ref_hits, ref_n, cur_hits, cur_n) -> Stats:
    """Pooled two-proportion z-test p-value (two-sided) and |current rate - reference rate|, per
    look, from counts."""
    x1, n1, x2, n2 = (np.asarray(a, dtype="float64") for a in (ref_hits, ref_n, cur_hits, cur_n))
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, (p1 - p2) / se, 0.0)
    return Stats(np.atleast_1d(2 * stats.norm.sf(np.abs(z))), np.atleast_1d(np.abs(p2 - p1)))


def clopper_pearson(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval of a rate seen `hits` times in `n` trials."""
    tail = (1 - confidence) / 2
    lo = float(stats.beta.ppf(tail, hits, n - hits + 1)) if hits else 0.0
    hi = float(stats.beta.ppf(1 - tail, hits + 1, n - hits)) if hits < n else 1.0
    return lo, hi
