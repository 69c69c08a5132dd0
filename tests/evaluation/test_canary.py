"""Canary statistics: seeded streams of requests, judged after every request as the rollout does."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from configs.rollout import AnalysisPolicy, Slos, load_rollout_policy
from evaluation.benchmarks.canary import running_stats
from evaluation.canary import ArmSamples, ArmStats, analyse, decide, evidence
from flows.cli import cli

POLICY = AnalysisPolicy()
MEDIANS = (0.2, 0.03, 3.0)  # TTFT, TPOT, e2e seconds
SIGMAS = (0.5, 0.25, 0.6)


def stream(
    seed: int,
    n: int,
    share: float,
    canary_errors: float,
    stable_errors: float = 0.001,
    slower: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """n requests in arrival order: which went to the canary, which failed, log latencies."""
    rng = np.random.default_rng(seed)
    canary = rng.random(n) < share
    failed = rng.random(n) < np.where(canary, canary_errors, stable_errors)
    logs = [
        np.log(m) + np.where(canary, np.log(slower), 0.0) + s * rng.standard_normal(n)
        for m, s in zip(MEDIANS, SIGMAS, strict=True)
    ]
    return canary, failed, logs


def looks(
    canary: np.ndarray, failed: np.ndarray, logs: list[np.ndarray], policy: AnalysisPolicy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(worse, not_worse, canary requests) after every request."""
    s = running_stats(~canary, failed, logs, {}, ArmStats.empty())
    c = running_stats(canary, failed, logs, {}, ArmStats.empty())
    worse, not_worse = decide(evidence(s, c, policy), c.requests, policy.min_samples)
    return worse, not_worse, np.asarray(c.requests)


def samples(
    canary: np.ndarray,
    failed: np.ndarray,
    logs: list[np.ndarray],
    arm: bool,
    source: str = "organic",
) -> ArmSamples:
    mask = canary == arm
    ok = mask & ~failed
    ttft, tpot, e2e = (np.exp(log[ok]) for log in logs)
    n, errors = int(mask.sum()), int((mask & failed).sum())
    return ArmSamples(n, errors, ttft, tpot, e2e, source)  # type: ignore[arg-type]


def first(flags: np.ndarray, requests: np.ndarray) -> float:
    return float(requests[np.argmax(flags)]) if flags.any() else np.inf


# ---- error rate --------------------------------------------------------------------------------


def test_error_regression_is_worse_within_150_canary_requests() -> None:
    needed = []
    for seed in range(200):
        worse, _, requests = looks(*stream(seed, 4000, 0.05, canary_errors=0.05), POLICY)
        needed.append(first(worse, requests))
    assert np.median(needed) <= 100
    assert np.mean(np.asarray(needed) <= 150) >= 0.8


def test_error_regression_through_analyse_names_the_error_rate() -> None:
    canary, failed, logs = stream(3, 6000, 0.05, canary_errors=0.05)
    for end in range(100, 6001, 100):
        result = analyse(
            samples(canary[:end], failed[:end], [x[:end] for x in logs], False),
            samples(canary[:end], failed[:end], [x[:end] for x in logs], True),
            POLICY,
        )
        if result.decision != "inconclusive":
            break
    assert result.decision == "worse"
    error = next(t for t in result.tests if t.metric == "error_rate")
    assert error.decision == "worse" and error.p_worse <= POLICY.alpha
    assert result.reasons[1].startswith("error rate: canary")


def test_analyse_agrees_with_every_look() -> None:
    canary, failed, logs = stream(7, 3000, 0.2, canary_errors=0.01, slower=1.1)
    s = running_stats(~canary, failed, logs, {}, ArmStats.empty())
    c = running_stats(canary, failed, logs, {}, ArmStats.empty())
    vectorised = evidence(s, c, POLICY)
    for end in (200, 1500, 3000):
        one = analyse(
            samples(canary[:end], failed[:end], [x[:end] for x in logs], False),
            samples(canary[:end], failed[:end], [x[:end] for x in logs], True),
            POLICY,
        )
        for test, every in zip(one.tests, vectorised, strict=True):
            assert test.metric == every.metric
            assert test.p_worse == pytest.approx(min(1.0, np.exp(-every.log_e_worse[end - 1])))
            assert test.canary == pytest.approx(every.canary[end - 1], nan_ok=True)


def test_aa_is_rarely_worse_when_watched_after_every_request() -> None:
    # Errors at 1% so the error test sees plenty; 300 rollouts watched after every request.
    false_worse = 0
    for seed in range(300):
        worse, _, _ = looks(*stream(1000 + seed, 4000, 0.25, 0.01, stable_errors=0.01), POLICY)
        false_worse += bool(worse.any())
    assert false_worse / 300 <= 0.02


# ---- latency -----------------------------------------------------------------------------------


def test_latency_regression_is_worse() -> None:
    canary, failed, logs = stream(11, 4000, 0.1, canary_errors=0.001, slower=1.3)
    result = analyse(
        samples(canary, failed, logs, False), samples(canary, failed, logs, True), POLICY
    )
    assert result.decision == "worse"
    tpot = next(t for t in result.tests if t.metric == "tpot")
    assert tpot.decision == "worse"
    assert tpot.canary / tpot.stable == pytest.approx(1.3, rel=0.05)


def test_identical_latency_is_eventually_not_worse() -> None:
    promoted = 0
    for seed in range(50):
        worse, not_worse, requests = looks(*stream(2000 + seed, 8000, 0.25, 0.001), POLICY)
        assert not worse.any()
        promoted += first(not_worse, requests) <= 1000
    assert promoted >= 48


def test_not_worse_waits_for_min_samples() -> None:
    canary, failed, logs = stream(5, 20000, 0.5, canary_errors=0.0, stable_errors=0.0)
    policy = POLICY.model_copy(update={"min_samples": 5000})
    _, not_worse, requests = looks(canary, failed, logs, policy)
    assert first(not_worse, requests) == 5000
    early = analyse(
        samples(canary[:2000], failed[:2000], [x[:2000] for x in logs], False),
        samples(canary[:2000], failed[:2000], [x[:2000] for x in logs], True),
        policy,
    )
    assert early.decision == "inconclusive"
    assert "fewer than 5000 canary requests so far" in early.reasons


# ---- SLOs --------------------------------------------------------------------------------------


def test_slo_breach_is_worse_even_when_stable_is_alike() -> None:
    canary, failed, logs = stream(13, 4000, 0.5, canary_errors=0.001)
    policy = POLICY.model_copy(update={"slos": Slos(ttft_p99_s=0.3)})  # stable's p99 is ~0.64 s
    result = analyse(
        samples(canary, failed, logs, False), samples(canary, failed, logs, True), policy
    )
    assert result.decision == "worse"
    slo = next(t for t in result.tests if t.metric == "ttft_p99")
    assert slo.kind == "slo" and slo.decision == "worse" and slo.canary > 0.01
    assert all(t.decision != "worse" for t in result.tests if t.kind == "comparison")


def test_error_ceiling_breach_is_worse() -> None:
    policy = POLICY.model_copy(update={"slos": Slos(error_rate=0.05)})
    stable = ArmSamples(requests=1000, errors=100)
    result = analyse(stable, ArmSamples(requests=400, errors=60), policy)
    ceiling = next(t for t in result.tests if t.metric == "error_rate_ceiling")
    assert ceiling.decision == "worse"
    assert result.decision == "worse"


# ---- organic and synthetic ---------------------------------------------------------------------


def test_synthetic_is_judged_apart_and_used_only_while_organic_is_short() -> None:
    organic = stream(17, 600, 0.1, canary_errors=0.001)  # ~60 canary requests < min_samples
    synthetic = stream(18, 6000, 0.1, canary_errors=0.001)
    stable = [samples(*organic, False), samples(*synthetic, False, "synthetic")]
    canary = [samples(*organic, True), samples(*synthetic, True, "synthetic")]
    result = analyse(stable, canary, POLICY)
    assert result.basis == "organic+synthetic"
    assert set(result.verdicts) == {"organic", "synthetic", "organic+synthetic"}
    assert result.verdicts["organic"].n_canary < POLICY.min_samples
    assert result.verdicts["organic+synthetic"].n_canary == sum(a.requests for a in canary)
    assert result.reasons[0].startswith("decision from organic+synthetic traffic")


def test_bad_synthetic_traffic_does_not_decide_for_enough_organic() -> None:
    organic = stream(19, 4000, 0.25, canary_errors=0.001)
    synthetic = stream(20, 4000, 0.25, canary_errors=0.3)  # e.g. synthetic prompts that break
    stable = [samples(*organic, False), samples(*synthetic, False, "synthetic")]
    canary = [samples(*organic, True), samples(*synthetic, True, "synthetic")]
    result = analyse(stable, canary, POLICY)
    assert result.basis == "organic"
    assert result.verdicts["synthetic"].decision == "worse"
    assert result.decision != "worse"


def test_organic_only_has_one_verdict() -> None:
    data = stream(21, 2000, 0.2, canary_errors=0.001)
    result = analyse(samples(*data, False), samples(*data, True), POLICY)
    assert result.basis == "organic" and set(result.verdicts) == {"organic"}


# ---- inputs ------------------------------------------------------------------------------------


def test_samples_reject_impossible_counts_and_latencies() -> None:
    with pytest.raises(ValueError, match="errors <= requests"):
        ArmSamples(requests=3, errors=4)
    with pytest.raises(ValueError, match="ttft_s must hold finite latencies > 0"):
        ArmSamples(requests=3, errors=0, ttft_s=np.array([0.1, -1.0]))
    with pytest.raises(ValueError, match="source"):
        ArmSamples(requests=3, errors=0, source="replayed")  # type: ignore[arg-type]


def test_no_stable_traffic_is_an_error() -> None:
    with pytest.raises(ValueError, match="stable served no requests"):
        analyse(ArmSamples(0, 0), ArmSamples(10, 0), POLICY)


def test_samples_from_gateway_snapshot() -> None:
    snapshot = {
        "requests": 5,
        "errors": 1,
        "ttft_s": {"count": 4, "samples": [0.1, 0.2, 0.3, 0.4]},
        "itl_s": {"count": 4, "samples": [0.01, 0.02, 0.03, 0.04]},
        "e2e_s": {"count": 4, "samples": [1.0, 2.0, 3.0, 4.0]},
    }
    arm = ArmSamples.from_snapshot(snapshot, source="synthetic")
    assert (arm.requests, arm.errors, arm.source) == (5, 1, "synthetic")
    assert arm.tpot_s.tolist() == [0.01, 0.02, 0.03, 0.04]


# ---- benchmark ---------------------------------------------------------------------------------


def test_bench_writes_json_and_table(tmp_path) -> None:
    out = tmp_path / "bench"
    result = CliRunner().invoke(cli, ["bench", "canary", "--runs", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "canary.json").read_text())
    rows = {(r["method"], r["scenario"]) for r in report["results"]}
    assert ("slipway", "errors 5% vs 0.1%") in rows and ("flagger", "A/A") in rows
    assert "| slipway | A/A |" in (out / "canary.md").read_text()
    assert report["policy"] == load_rollout_policy().model_dump(mode="json")
    mirrored = report["mirrored"]
    found = {(r["method"], r["scenario"]) for r in mirrored["results"]}
    assert ("slipway, mirrored", "A/A, recorded vLLM pairs (own cores)") in found
    assert ("slipway, mirrored, no cache strata", "A/A, cold-cache canary") in found
    assert ("flagger (1m, +5%, 10 fails)", "answers 60% degraded, normal speed") in found
    assert mirrored["recorded"]["recorded"] == {
        "file": "recorded_pairs.jsonl",
        "pairs": 100,  # the odd half: held out from tuning
        "held_out": True,
    }
    assert "## With mirroring, on real latency shapes" in (out / "canary.md").read_text()


def test_mirrored_simulation_catches_bad_answers_in_the_shadow_phase_and_promotes_aa() -> None:
    from evaluation.benchmarks import canary_mirrored as sim

    policy = sim.mirrored_policy(sim.without_latency_slos(load_rollout_policy()), rate=10.0)
    recorded = sim.load_recorded(sim.RECORDED["recorded"], held_out=False)
    by_name = {s.name: s for s in sim.SCENARIOS}

    def outcomes(name: str, runs: int = 20, **options) -> list:
        scenario = by_name[name]
        draw = sim.drawer(scenario, recorded)
        rng = np.random.default_rng(3)
        return [
            sim.simulate_rollout(rng, policy, 10.0, scenario, draw, **options) for _ in range(runs)
        ]

    bad = outcomes("answers 60% degraded, normal speed")
    assert all(r.outcome == "rollback" and r.canary_requests == 0 for r in bad)  # nobody saw it
    aa = outcomes("A/A, recorded vLLM pairs (own cores)")
    assert all(r.outcome == "promote" for r in aa)
    cold = outcomes("A/A, cold-cache canary", runs=10)
    assert all(r.outcome == "promote" for r in cold)
    naive = outcomes("A/A, cold-cache canary", runs=10, strata=False)
    assert all(r.outcome == "rollback" for r in naive)  # the cold start alone rolls it back
    lagging = outcomes("A/A, a copy 10% slower than its original", runs=10)
    assert all(r.outcome == "promote" for r in lagging)
