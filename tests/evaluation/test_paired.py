"""Mirrored pairs: the paired latency sign test keeps its power on the bimodal, heavy-tailed
latency two engines sharing two cores produce, the quality test judges answers against what was
accepted, sessions are thinned to independent pairs, and the answers' measures say what differs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from configs.home import REPO
from configs.rollout import AnalysisPolicy, QualityPolicy, load_rollout_policy
from evaluation.canary import ArmSamples, analyse
from evaluation.paired import (
    balanced_at,
    independent,
    latency_table,
    mirrored_arms,
    pair_counts,
    pair_table,
    quality_summary,
)
from evaluation.quality.agreement import length_ratio, refuses, score, token_f1

# The demo policy's analysis (configs/rollout/demo.yaml), first step.
POLICY = load_rollout_policy(REPO / "configs" / "rollout" / "demo.yaml").stages()[0].analysis


def contended(rng: np.random.Generator, n: int) -> np.ndarray:
    """A shared factor per moment: most requests quick, one in five stuck behind the other
    engine's work for 10-40x as long (the shape measured with two vLLM engines on two cores)."""
    stuck = rng.random(n) < 0.2
    return np.where(stuck, rng.uniform(10, 40, n), 1.0)


def side(ttft: float, itl: float, e2e: float, text: str = "w0 w1 w2", ok: bool = True) -> dict:
    return {
        "ok": ok,
        "status": 200 if ok else 500,
        "text": text if ok else "",
        "finish_reason": "length",
        "prompt_tokens": 9,
        "completion_tokens": len(text.split()) if ok else 0,
        "ttft_s": ttft if ok else None,
        "itl_s": itl if ok else None,
        "e2e_s": e2e if ok else None,
    }


def pairs(
    seed: int,
    n: int,
    slower: float = 1.0,
    canary_text: str = "w0 w1 w2",
    sessions: int | None = None,
) -> list[dict]:
    """n mirrored pairs: each request's own length, a moment's shared contention, and a small
    independent noise per engine; the canary `slower` on every request."""
    rng = np.random.default_rng(seed)
    length = rng.lognormal(0, 0.6, n)
    shared = contended(rng, n)
    out = []
    for i in range(n):
        base = 0.09 * length[i] * shared[i]
        noise = rng.lognormal(0, 0.15, (2, 3))
        s = side(base * noise[0, 0], 0.03 * noise[0, 1], 0.6 * base * noise[0, 2])
        c = side(
            slower * base * noise[1, 0],
            slower * 0.03 * noise[1, 1],
            slower * 0.6 * base * noise[1, 2],
            canary_text,
        )
        out.append(
            {
                "id": f"r{i}",
                "source": "synthetic",
                "session": None if sessions is None else f"s{i % sessions}",
                "logprob_drop": None,  # the engines gave no log-probabilities: judged by text
                "request": {"messages": [{"role": "user", "content": f"q{i}"}]},
                "stable": s,
                "canary": c,
            }
        )
    return out


def judge(mirrored: list[dict], policy: AnalysisPolicy = POLICY, balanced: bool = False):
    stable = ArmSamples(requests=len(mirrored), errors=0, source="synthetic")
    counts = pair_counts(mirrored, policy, balanced)
    return analyse([stable], mirrored_arms(mirrored), policy, counts)


def first_decision(mirrored: list[dict], policy: AnalysisPolicy = POLICY) -> tuple[str, int]:
    for n in range(10, len(mirrored) + 1, 5):
        decision = judge(mirrored[:n], policy).decision
        if decision != "inconclusive":
            return decision, n
    return "inconclusive", len(mirrored)


def test_identical_engines_under_contention_are_not_worse_within_a_few_hundred_pairs():
    outcomes = [first_decision(pairs(seed, 400)) for seed in range(20)]
    assert all(d == "not_worse" for d, _ in outcomes), outcomes
    assert np.median([n for _, n in outcomes]) <= 200


def test_paired_test_decides_where_independent_requests_on_the_same_latencies_cannot():
    mirrored = pairs(1, 200)
    assert judge(mirrored).decision == "not_worse"
    # the same latencies as two unpaired arms: the plug-in variance of a bimodal tail
    as_arms = [
        ArmSamples(
            requests=200,
            errors=0,
            ttft_s=[p[arm]["ttft_s"] for p in mirrored],
            tpot_s=[p[arm]["itl_s"] for p in mirrored],
            e2e_s=[p[arm]["e2e_s"] for p in mirrored],
            source="synthetic",
        )
        for arm in ("stable", "canary")
    ]
    unpaired = analyse([as_arms[0]], [as_arms[1]], POLICY)
    assert unpaired.decision == "inconclusive"
    assert any(t.metric == "ttft" and t.decision == "inconclusive" for t in unpaired.tests)


def test_a_canary_half_again_as_slow_is_worse_in_pairs():
    decision, n = first_decision(pairs(2, 400, slower=1.5))
    assert decision == "worse" and n <= 100
    reasons = " ".join(judge(pairs(2, 100, 1.5)).reasons)
    assert re.search(
        r"ttft_paired: canary/stable ratio 1\.[45]\d \(paired estimate\) over 100 mirrored pairs "
        r"\(worse beyond 1\.25\): worse",
        reasons,
    ), reasons


def test_aa_pairs_are_rarely_worse_when_watched_after_every_pair():
    # never 'not worse': watch every look to the end
    policy = POLICY.model_copy(update={"min_samples": 10**6})
    worse = sum(first_decision(pairs(seed, 150), policy)[0] == "worse" for seed in range(60))
    assert worse <= 2  # alpha 0.01 over the whole watch


def stuck_on_one_side(mirrored: list[dict], every: int, factor: float, seed: int) -> list[dict]:
    """Every `every`-th pair held up on one side only, at random (the other engine's work took
    the core at that moment): identical engines whose log ratios have a heavy tail both ways."""
    rng = np.random.default_rng(seed)
    for pair in mirrored[::every]:
        half = pair["canary" if rng.random() < 0.5 else "stable"]
        half["ttft_s"] *= factor
        half["e2e_s"] *= factor
    return mirrored


def test_clipped_scores_promote_identical_engines_a_heavy_tail_holds_back_unclipped():
    plain = POLICY.model_copy(update={"paired_clip": None})
    clipped = [first_decision(stuck_on_one_side(pairs(s, 400), 5, 20, s)) for s in range(10)]
    unclipped = [
        first_decision(stuck_on_one_side(pairs(s, 400), 5, 20, s), plain) for s in range(10)
    ]
    assert all(d == "not_worse" for d, _ in clipped), clipped
    # 120 pairs: the error-rate bound's own need (no error in the canary's first 120 requests)
    assert max(n for _, n in clipped) <= 150, clipped
    assert np.median([n for _, n in unclipped]) >= 250, unclipped


def test_a_heavy_tail_hides_neither_a_slow_canary_nor_keeps_alpha_from_holding():
    slow = [first_decision(stuck_on_one_side(pairs(s, 200, 1.5), 4, 10, s)) for s in range(5)]
    assert all(d == "worse" and n <= 60 for d, n in slow), slow
    policy = POLICY.model_copy(update={"min_samples": 10**6})  # watch every look to the end
    watched = [stuck_on_one_side(pairs(s, 150), 4, 10, s) for s in range(60)]
    assert sum(first_decision(m, policy)[0] == "worse" for m in watched) <= 2


def test_the_paired_ratio_is_the_geometric_mean_unclipped_and_steadier_clipped():
    plain = POLICY.model_copy(update={"paired_clip": None})
    unclipped, clipped = [], []
    for seed in range(20):
        mirrored = stuck_on_one_side(pairs(seed, 80), 5, 20, seed)
        logs = [np.log(p["canary"]["ttft_s"] / p["stable"]["ttft_s"]) for p in mirrored]
        assert ratio(judge(mirrored, plain)) == pytest.approx(np.exp(np.mean(logs)))
        unclipped.append(np.mean(logs))
        clipped.append(np.log(ratio(judge(mirrored))))
    # the pairs held up on one side swing the geometric mean of identical engines; clipped
    # scores move the estimate a third as much (SDs 0.14 and 0.05 over these seeds)
    assert np.std(clipped) < 0.5 * np.std(unclipped)


def lagging_copies(mirrored: list[dict], lag: float, to_stable_every: int) -> list[dict]:
    """Every `to_stable_every`-th pair copied to stable (a live canary request), the rest to the
    canary, and each copy `lag` x slower than its original."""
    for i, pair in enumerate(mirrored):
        to_canary = i % to_stable_every != 0
        pair["copied_to"] = "canary" if to_canary else "stable"
        copy = pair["canary" if to_canary else "stable"]
        for field in ("ttft_s", "itl_s", "e2e_s"):
            copy[field] *= lag
    return mirrored


def ratio(analysis, metric: str = "ttft_paired") -> float:
    return next(t.canary for t in analysis.tests if t.metric == metric)


def test_a_live_steps_pairs_are_balanced_over_the_two_directions_of_copying():
    # A 25% step: three in four pairs are stable's requests copied to the canary. Each copy is
    # 20% slower than its original: pooled, an identical canary looks 10% slower.
    mirrored = lagging_copies(pairs(4, 400), lag=1.2, to_stable_every=4)
    pooled, balanced = judge(mirrored), judge(mirrored, balanced=True)
    assert 1.07 < ratio(pooled) < 1.13
    assert 0.96 < ratio(balanced) < 1.04
    assert balanced.decision == "not_worse"
    reasons = " ".join(balanced.reasons)
    assert "over 400 mirrored pairs" in reasons, reasons


def test_a_canary_half_again_as_slow_is_worse_in_balanced_pairs():
    mirrored = lagging_copies(pairs(2, 200, slower=1.5), lag=1.2, to_stable_every=4)
    analysis = judge(mirrored, balanced=True)
    assert analysis.decision == "worse" and 1.4 < ratio(analysis) < 1.6


def test_balanced_pairs_wait_for_half_the_burn_in_in_each_direction():
    mirrored = lagging_copies(pairs(5, 200), lag=1.0, to_stable_every=10**6)  # all to the canary
    analysis = judge(mirrored, balanced=True)
    assert {t.decision for t in analysis.tests if t.metric.endswith("_paired")} == {"inconclusive"}
    assert analysis.decision == "inconclusive"
    assert judge(mirrored).decision == "not_worse"  # pooled, the shadow phase's way


@pytest.mark.parametrize(
    "weight, balanced", [(0, False), (5, False), (19, False), (20, True), (50, True), (80, True)]
)
def test_steps_balance_where_each_direction_carries_a_fifth_of_the_pairs(weight, balanced):
    assert balanced_at(weight) is balanced


def test_garbled_answers_at_normal_speed_are_worse_and_identical_ones_are_not():
    garbled = judge(pairs(3, 60, canary_text="z9 z8 z7"))
    assert garbled.decision == "worse"
    quality = next(t for t in garbled.tests if t.metric == "quality")
    assert quality.decision == "worse" and quality.canary == 1.0
    same = judge(pairs(3, 200))
    assert next(t for t in same.tests if t.metric == "quality").decision == "not_worse"


@pytest.mark.parametrize(("degraded", "expected"), [(0.05, "not_worse"), (0.6, "worse")])
def test_quality_is_judged_against_the_accepted_share(degraded, expected):
    mirrored = pairs(4, 300)
    rng = np.random.default_rng(5)
    for p in mirrored:
        if rng.random() < degraded:
            p["canary"] = {**p["canary"], "text": "entirely other words"}
    quality = next(t for t in judge(mirrored).tests if t.metric == "quality")
    assert quality.decision == expected


def test_a_failed_copy_counts_as_a_canary_error():
    mirrored = pairs(6, 100)
    for p in mirrored[::2]:
        p["canary"] = side(0, 0, 0, ok=False)
    assert pair_counts(mirrored, POLICY).canary_failed == 50
    analysis = judge(mirrored)
    assert analysis.decision == "worse"
    assert next(t for t in analysis.tests if t.metric == "error_rate").decision == "worse"


def test_sessions_are_thinned_to_their_first_pair():
    mirrored = pairs(7, 100, sessions=10)
    kept = independent(mirrored)
    assert [p["session"] for p in kept] == [f"s{i}" for i in range(10)]
    assert pair_counts(mirrored, POLICY).n == 10
    assert len(independent(pairs(7, 100))) == 100  # no session key: every pair stands alone


def test_pair_table_and_summary_show_the_evidence():
    mirrored = pairs(8, 10)
    mirrored[0]["canary"] = {**mirrored[0]["canary"], "text": "other"}
    rows = pair_table(mirrored, POLICY)
    assert len(rows) == 10 and rows[0]["degraded"] and not rows[1]["degraded"]
    assert rows[1]["exact"] and rows[1]["ttft_ratio"] > 0
    assert {r["copied_to"] for r in rows} == {"canary"}  # which side answered no client
    assert quality_summary(rows) == (
        "10 mirrored pairs: 90% identical answers, median token agreement 1.00, 1 degraded (10%)"
    )


def test_latency_table_keeps_every_pairs_timings_and_cache_state():
    mirrored = pairs(8, 12)
    mirrored[0]["stable"] = {**mirrored[0]["stable"], "cached_tokens": 128}
    mirrored[0]["canary"] = {**mirrored[0]["canary"], "cached_tokens": 0}
    mirrored[1]["canary"] = side(0, 0, 0, ok=False)  # no latency to compare
    rows = latency_table(mirrored)
    assert len(rows) == 11
    first = rows[0]
    assert first["stable_ttft_ms"] == round(mirrored[0]["stable"]["ttft_s"] * 1e3, 2)
    assert first["canary_e2e_ms"] == round(mirrored[0]["canary"]["e2e_s"] * 1e3, 2)
    assert (first["stable_cached_tokens"], first["canary_cached_tokens"]) == (128, 0)
    assert not first["compared"] and all(r["compared"] for r in rows[1:])


def test_answer_measures():
    policy = QualityPolicy()
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("the cat sat", "a dog ran") == 0.0
    assert token_f1("a b c d", "a b x y") == pytest.approx(0.5)
    assert refuses("I'm sorry, but I can't help with that.") and not refuses("Sorry to hear.")
    assert length_ratio(4, 16) == 4.0 and length_ratio(0, 0) == 1.0
    # one early divergence of a greedy answer still mostly agrees
    close = score(
        {},
        side(1, 1, 1, "Paris is the capital of France"),
        side(1, 1, 1, "The capital of France is Paris"),
        policy,
    )
    assert not close.exact and not close.degraded
    json_asked = {"response_format": {"type": "json_object"}}
    broken = score(json_asked, side(1, 1, 1, '{"a": 1}'), side(1, 1, 1, '{"a": 1'), policy)
    assert not broken.format_ok and broken.degraded
    # The Responses API asks for JSON in text.format: the same verdict.
    responses_json = {"input": "x", "text": {"format": {"type": "json_object"}}}
    also = score(responses_json, side(1, 1, 1, '{"a": 1}'), side(1, 1, 1, '{"a": 1'), policy)
    assert not also.format_ok and also.degraded
    refused = score({}, side(1, 1, 1, "Paris."), side(1, 1, 1, "I cannot answer that."), policy)
    assert refused.refusal and refused.degraded
    longer = score({}, side(1, 1, 1, "a b"), side(1, 1, 1, "a b " + "c " * 10), policy)
    assert longer.length_ratio == 6.0 and longer.degraded


def test_latency_is_compared_within_a_prefix_cache_stratum():
    mirrored = pairs(9, 40)
    for p in mirrored[:10]:  # stable served these prompts from its cache, the cold canary did not
        p["stable"] = {**p["stable"], "cached_tokens": 64}
        p["canary"] = {**p["canary"], "cached_tokens": 0}
    for p in mirrored[10:15]:  # both from the cache, stable more of the prompt
        p["stable"] = {**p["stable"], "cached_tokens": 256}
        p["canary"] = {**p["canary"], "cached_tokens": 128}
    for p in mirrored[15:20]:  # both from the cache, as much of it
        p["stable"] = {**p["stable"], "cached_tokens": 128}
        p["canary"] = {**p["canary"], "cached_tokens": 128}
    counts = pair_counts(mirrored, POLICY)
    assert counts.n == 40 and counts.scored == 40  # the answers are judged all the same
    assert np.asarray(counts.scores["ttft"].n) == 25


def test_a_small_drop_in_log_probability_is_not_degraded_whatever_the_words():
    policy = QualityPolicy()
    stable, canary = (
        side(1, 1, 1, "The water cycle is a machine"),
        side(1, 1, 1, "Rain falls and rivers run far"),
    )
    assert score({}, stable, canary, policy).degraded  # by words alone
    assert not score({}, stable, canary, policy, logprob_drop=0.07).degraded
    assert score({}, stable, canary, policy, logprob_drop=0.9).degraded
    mirrored = pairs(10, 30)
    for p in mirrored[:10]:
        del p["logprob_drop"]  # not scored yet: not judged yet
    assert pair_counts(mirrored, POLICY).scored == 20
