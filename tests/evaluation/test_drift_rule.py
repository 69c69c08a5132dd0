"""The drift check's decision rule and its alarm budget: the statistics against scipy's, the
floors against a large sample's trivia, the config's errors, and the simulation (a fast version
of `slipway bench drift`): on stationary traffic the family-wise false-alarm rate over a week of
hourly looks at every feature stays within the configured rate, where the old rule's does not,
and a planted shift is caught in a few looks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import spatial, stats

from configs.drift import DriftConfig, load_drift_config
from configs.loader import ConfigError
from evaluation.benchmarks import drift as bench
from evaluation.monitoring import drift_rule as rule

CONFIG = DriftConfig()


def test_numbers_are_scipys_ks_and_normed_wasserstein_with_ties_and_gaps():
    rng = np.random.default_rng(3)
    ref = rng.poisson(20, 400).astype(float)  # token counts: many ties
    cur = rng.poisson(22, 300).astype(float)
    ref[::7] = np.nan  # values the check does not have (TTFT of a non-stream)
    got = rule.numbers(ref[None], cur[None])
    r = ref[~np.isnan(ref)]
    assert got.effect[0] == pytest.approx(stats.wasserstein_distance(r, cur) / np.std(r))
    d = stats.ks_2samp(r, cur).statistic
    en = len(r) * len(cur) / (len(r) + len(cur))
    assert got.p_value[0] == pytest.approx(stats.kstwobign.sf(np.sqrt(en) * d))
    assert 0 < got.p_value[0] < 0.01  # a shift of a tenth: the test sees it
    # A batch of looks gives each look's own figures.
    batch = rule.numbers(np.stack([ref, ref]), np.stack([cur, ref[:300]]))
    assert batch.p_value[0] == got.p_value[0] and batch.effect[1] < got.effect[0]


def test_categories_and_proportions_are_the_textbook_tests():
    ref, cur = np.array([600, 300, 100, 0]), np.array([500, 300, 180, 20])
    got = rule.categories(ref[None], cur[None])
    seen = np.stack([ref, cur])[:, (ref + cur) > 0]
    _, p, dof, _ = stats.chi2_contingency(seen, correction=False)
    assert got.p_value[0] == pytest.approx(p) and dof == 3
    assert got.effect[0] == pytest.approx(spatial.distance.jensenshannon(ref, cur))
    z = rule.proportions(10, 1000, 60, 1000)
    pooled = 70 / 2000
    expected = 2 * stats.norm.sf(0.05 / np.sqrt(pooled * (1 - pooled) * 2 / 1000))
    assert z.p_value[0] == pytest.approx(expected) and z.effect[0] == pytest.approx(0.05)


def test_the_floor_keeps_a_large_sample_from_alarming_on_trivia():
    rng = np.random.default_rng(1)
    ref = rng.lognormal(np.log(800), 0.5, 50_000)
    cur = rng.lognormal(np.log(800 * 1.03), 0.5, 50_000)  # 3% slower: real, and trivial
    got = rule.numbers(ref[None], cur[None])
    level = rule.feature_level(CONFIG.false_alarm_rate, CONFIG.horizon_looks, 9)
    assert got.p_value[0] < level  # the test alone would alarm
    assert got.effect[0] < CONFIG.num_floor and not rule.drifted(got, level, CONFIG.num_floor)[0]
    slower = rule.numbers(ref[None], (cur * 1.3)[None])
    assert rule.drifted(slower, level, CONFIG.num_floor)[0]


def test_the_budget_is_split_over_the_horizon_and_the_features():
    assert rule.feature_level(0.05, 168, 9) == pytest.approx(0.05 / 168 / 9)
    config = load_drift_config()  # configs/drift.yaml
    assert (config.false_alarm_rate, config.horizon_looks) == (0.05, 168)
    assert config.floor("latency_ms") == 0.1 and config.floor("is_error") == 0.01
    assert DriftConfig(floors={"latency_ms": 0.2}).floor("latency_ms") == 0.2


@pytest.mark.parametrize(
    ("yaml", "named"),
    [
        ("false_alarm_rate: 1.5", "false_alarm_rate"),
        ("horizon_looks: 0", "horizon_looks"),
        ("floors: {latency: 0.2}", r"floors\.latency\.\[key\]"),
        ("floors: {latency_ms: -1}", "floors.latency_ms"),
        ("num_threshold: 0.1", "num_threshold"),  # the old distance threshold: now a floor
    ],
)
def test_a_bad_budget_or_floor_is_named(tmp_path, yaml, named):
    path = tmp_path / "drift.yaml"
    path.write_text(yaml + "\n")
    with pytest.raises(ConfigError, match=rf"  {named}: "):
        load_drift_config(path)


def test_simulated_false_alarms_stay_within_the_budget_and_the_old_rule_does_not():
    """300 horizons of a week of hourly looks at 100 requests a window (min_rows, where the
    floors help least); the upper 95% bound of the rule's family-wise rate within the budget."""
    found = bench.false_alarms(300, 100, CONFIG, seed=11)
    rates = found["family_wise"]
    assert rates["rule"]["horizons"] == 300
    assert rates["rule"]["ci95"][1] <= CONFIG.false_alarm_rate
    assert rates["test"]["ci95"][1] <= CONFIG.false_alarm_rate  # the budget, without the floors
    assert rates["rule/numbers"]["ci95"][1] <= CONFIG.false_alarm_rate  # distance features too
    # The old rule (a distance of 0.1 at every look) alarms almost every week at this size.
    assert rates["old"]["ci95"][0] > 0.5
    assert (
        found["features_compared"]["latency_ms"] == 1.0
        and "ttft_ms" not in found["features_compared"]
    )  # half the requests stream: 50 TTFTs a window, below min_rows


def test_the_simulation_sees_a_budget_not_split_over_the_looks():
    """The same simulation fails a rule that spends the whole budget at every look (a horizon of
    one look) while 168 are taken: what the test above guards against is measurable."""
    found = bench.false_alarms(100, 100, DriftConfig(horizon_looks=1), seed=12, looks=168)
    assert found["looks"] == 168
    assert found["family_wise"]["test"]["ci95"][0] > CONFIG.false_alarm_rate


def test_a_planted_shift_is_caught_and_the_looks_it_took_are_counted():
    """Latency and TTFT x1.3 and a new tenant mix from the second day on."""
    quick = bench.planted_shift(100, 1000, CONFIG, seed=5)
    for key in ("latency_ms", "alarm"):  # 1,000 requests a window: at the first look
        assert quick[key]["caught_within_horizon"]["rate"] == 1.0
        assert quick[key]["looks_max"] == 1
    slow = bench.planted_shift(100, 100, CONFIG, seed=6)
    assert slow["latency_ms"]["caught_within_horizon"]["ci95"][0] > 0.9
    assert slow["latency_ms"]["looks_median"] > 1  # 100 requests: it takes a few looks
    # Two of the five features compared at this size (tenant at once, latency later): 40%.
    assert slow["alarm"]["caught_within_horizon"]["ci95"][0] > 0.9
    assert bench.alarm_lines({}) == "false-alarm simulation skipped (--horizons 0)"
