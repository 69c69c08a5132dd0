"""Non-inferiority of a variant against its base: the decisions on planted losses, the flips, the
suite too small for its margin, and the error rate at the margin over simulated suites."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.benchmarks.gates import AT_MARGIN, pass_rate, run
from evaluation.quality.noninferiority import Flips, compare, compare_unpaired, flips, score_z

MARGIN, ALPHA = 0.10, 0.05


def items(both: int, harmful: int, beneficial: int, neither: int) -> tuple[list[int], list[int]]:
    """Per-item 0/1 scores (base, variant) with those cells, interleaved like a real suite."""
    cells = [(1, 1)] * both + [(1, 0)] * harmful + [(0, 1)] * beneficial + [(0, 0)] * neither
    order = np.random.default_rng(len(cells)).permutation(len(cells))
    base, variant = zip(*(cells[i] for i in order), strict=True)
    return list(base), list(variant)


@pytest.mark.parametrize("n", [10, 27, 58, 231, 1000, 5000])
def test_a_planted_loss_beyond_the_margin_never_passes_at_any_suite_size(n):
    # The base right on 70% of the items; the variant loses 15% of them (relative), some items
    # flipping each way.
    right = round(0.7 * n)
    harmful = max(1, round(0.2 * right))
    beneficial = max(0, harmful - math.ceil(0.15 * right))
    base, variant = items(right - harmful, harmful, beneficial, n - right - beneficial)
    result = compare(base, variant, MARGIN, ALPHA)
    assert result.loss > MARGIN
    assert result.decision != "pass" and result.upper > MARGIN
    if n >= 1000:  # and a large suite shows it
        assert result.decision == "fail" and result.lower > MARGIN


def test_an_identical_variant_passes_on_a_suite_big_enough_and_is_inconclusive_on_a_small_one():
    small = compare(*items(19, 0, 0, 8), MARGIN, ALPHA)  # 27 items, the base right on 19
    assert small.decision == "inconclusive" and small.loss == 0.0
    assert small.too_small and small.needed is not None
    assert "suite too small for its margin" in small.describe()
    # The same shares on the number of items it said it needs: passes, and is big enough.
    n = small.needed
    right = round(19 / 27 * n)
    big = compare(*items(right, 0, 0, n - right), MARGIN, ALPHA)
    assert big.decision == "pass" and big.upper < MARGIN and not big.too_small
    # A few items fewer than that still do not pass.
    n = small.needed - 6
    right = round(19 / 27 * n)
    assert compare(*items(right, 0, 0, n - right), MARGIN, ALPHA).decision == "inconclusive"


def test_flips_are_counted_both_ways():
    base = [1, 1, 1, 0, 0, 1, 0, 1]
    variant = [1, 0, 1, 1, 0, 0, 0, 1]
    assert flips(base, variant) == Flips(both=3, harmful=2, beneficial=1, neither=2)
    result = compare(base, variant, MARGIN, ALPHA)
    assert (result.harmful, result.beneficial, result.n) == (2, 1, 8)
    assert result.loss == pytest.approx(1 - (4 / 8) / (5 / 8))
    assert "2 harmful and 1 beneficial flips in 8 items" in result.describe()


def test_the_interval_decides_exactly_as_the_test_at_the_margin():
    for cells in [(150, 12, 10, 59), (150, 30, 5, 46), (60, 3, 2, 35), (400, 20, 19, 161)]:
        result = compare(*items(*cells), MARGIN, ALPHA)
        at = score_z(Flips(*cells), 1 - MARGIN)
        assert (result.upper < MARGIN) == (at > 1.6449) == (result.decision == "pass")
        assert (result.lower > MARGIN) == (at < -1.6449) == (result.decision == "fail")
        assert result.lower <= result.loss <= result.upper


def test_scores_between_0_and_1_take_the_paired_t():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 1.0, 400)
    result = compare(list(base), list(base * 0.99), MARGIN, ALPHA)
    assert result.decision == "pass" and "paired t" in result.method
    assert result.loss == pytest.approx(0.01)
    result = compare(list(base), list(base * 0.7), MARGIN, ALPHA)
    assert result.decision == "fail"


def test_aggregate_scores_alone_are_judged_from_their_standard_errors():
    assert compare_unpaired(0.70, 0.01, 0.69, 0.01, MARGIN, ALPHA).decision == "pass"
    assert compare_unpaired(0.70, 0.03, 0.69, 0.03, MARGIN, ALPHA).decision == "inconclusive"
    assert compare_unpaired(0.70, 0.01, 0.50, 0.01, MARGIN, ALPHA).decision == "fail"


def test_a_base_that_scores_nothing_measures_no_loss():
    result = compare([0, 0, 0, 0], [0, 1, 0, 0], MARGIN, ALPHA)
    assert result.decision == "inconclusive" and "base scores 0" in result.method


def test_mismatched_items_are_refused_with_the_counts():
    with pytest.raises(ValueError, match="base 3, variant 2"):
        compare([1, 0, 1], [1, 0], MARGIN, ALPHA)


# Variants whose true loss is exactly the margin, with flips one way or both, at several base
# accuracies, on the demo's suite sizes and larger (the benchmark's own table and draws): the
# share of simulated suites on which each passes is the gate's false-pass rate, at most alpha.
SEEDS = 2000


@pytest.mark.parametrize("n", [27, 58, 231, 1000])
def test_a_variant_at_the_margin_passes_no_more_often_than_alpha(n):
    rates = [
        pass_rate(shares, n, SEEDS, MARGIN, ALPHA, seed)
        for seed, shares in enumerate(AT_MARGIN.values())
    ]
    pooled = sum(rates) / len(rates)  # 8,000 simulated suites
    se = math.sqrt(ALPHA * (1 - ALPHA) / (SEEDS * len(rates)))
    assert pooled <= ALPHA + 2 * se, rates  # at most alpha, up to the simulation's own noise
    assert max(rates) <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / SEEDS), rates


def test_the_benchmark_reports_each_size_with_its_interval(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIPWAY_HOME", str(tmp_path))
    result = run(seeds=400, margin=MARGIN, alpha=ALPHA)
    assert [s["items"] for s in result["sizes"]] == [27, 58, 105, 231, 1000]
    for size in result["sizes"]:
        low, high = size["interval_95"]
        assert low <= size["false_pass_rate"] <= high and high - low < 0.04
    # An identical variant: hopeless on 27 items, sure on 1000.
    assert result["sizes"][0]["identical_pass_rate"] < 0.05
    assert result["sizes"][-1]["identical_pass_rate"] == 1.0
    assert (tmp_path / "bench" / "gates.json").is_file()
