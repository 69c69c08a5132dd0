"""Simulated rollouts with mirroring: a shadow phase, then every step judged on mirrored pairs
(latency by the paired score test, answers by the quality test, errors on live requests and
copies together), beside the same policy on independent requests and Flagger at its documented
settings, on the latency shapes real engines produce.

Each request is drawn as the pair of latencies the two engines would show for it at the same
moment, so a copy's pair shares the request and the moment and a live request shows one side:

- lognormal: a per-request factor (its length) shared by both, and a little noise of each
  engine's own (the independent-request benchmark's spread, split into the two);
- bimodal: as lognormal, and one request in five caught behind the other engine's work for 10-40x
  as long, on both sides at once (the shape two vLLM engines sharing cores produced);
- recorded: pairs drawn from latencies recorded from two vLLM engines (SmolLM2-135M bf16 and
  W8A8) side by side on a 2-core machine, each on a core of its own, or both on one core and
  overloaded (evaluation/datasets/recorded_pairs*.jsonl, provenance in RECORDED.md); an A/A
  canary gets each pair in a random order, the W8A8 candidate its recorded side. Even arrival
  indexes tune, odd ones are held out: the figures use the held-out half unless --tuning.

Scenario changes on the canary side: a latency factor, an error rate, a share of degraded answers
(at normal speed), sessions (a factor per session on each side, so a session's requests are
alike), a cold start (the canary's first requests 3x slower, a cold prefix cache), and a copy
that is slower than its original (it starts a moment later, on the other engine's queue).

Copies go both ways, as the gateway sends them: stable's requests to the canary, and at a live
step the canary's to stable, all under one rate cap.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from configs.home import REPO
from configs.rollout import RolloutPolicy, ShadowPolicy, Stage
from evaluation.benchmarks.canary import (
    Flagger,
    Run,
    Step,
    Summary,
    _last,
    flagger_run,
    rollout_of,
    running_stats,
    summarise,
)
from evaluation.canary import (
    LATENCY_METRICS,
    ArmStats,
    LogMoments,
    PairCounts,
    decide,
    evidence,
    inside_clip,
    paired_scores,
    slo_targets,
)
from evaluation.paired import balanced_at

DATASETS = REPO / "evaluation" / "datasets"
# Provenance of both in evaluation/datasets/RECORDED.md.
RECORDED = {
    "recorded": DATASETS / "recorded_pairs.jsonl",  # each engine on a core of its own
    "recorded-shared-core": DATASETS / "recorded_pairs_shared_core.jsonl",  # both on one core
}
MEDIANS = (0.2, 0.03, 3.0)  # TTFT, TPOT, e2e seconds, as the independent-request benchmark
SHARED, OWN = (0.45, 0.2, 0.55), (0.2, 0.1, 0.2)  # log sd of the request's and each engine's part

LATENCY_SLOS = ("ttft_p99_s", "tpot_p99_s", "e2e_p99_s")

Draw = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]  # (2, 3, n) logs


@dataclass(frozen=True)
class Scenario:
    name: str
    latency: str = "lognormal"  # lognormal, bimodal, or a RECORDED key (+ "-candidate")
    canary_error_rate: float = 0.001
    latency_factor: float = 1.0
    degraded: float = 0.0  # share of the canary's answers degraded
    session_size: int | None = None  # requests per session, sessions interleaved
    cold: int = 0  # the canary's first requests (live or copies) 3x slower
    copy_lag: float = 1.0  # a copy's latency over its original's, on either engine
    good: bool = True  # a good canary: rolling it back is a false rollback


SCENARIOS = (
    Scenario("A/A, lognormal"),
    Scenario("A/A, bimodal (contended cores)", "bimodal"),
    Scenario("A/A, recorded vLLM pairs (own cores)", "recorded"),
    Scenario("A/A, recorded vLLM pairs (one shared core)", "recorded-shared-core"),
    Scenario("W8A8 vs bf16, recorded (own cores)", "recorded-candidate"),
    Scenario("A/A, sessions of 5", "bimodal", session_size=5),
    Scenario("A/A, cold-cache canary", "bimodal", cold=30),
    Scenario("A/A, a copy 10% slower than its original", "bimodal", copy_lag=1.1),
    Scenario("errors 5% vs 0.1%", "bimodal", canary_error_rate=0.05, good=False),
    Scenario("latency +30%", "bimodal", latency_factor=1.3, good=False),
    Scenario("answers 60% degraded, normal speed", "bimodal", degraded=0.6, good=False),
    Scenario("answers 45% degraded (near the margin)", "bimodal", degraded=0.45, good=False),
)


def load_recorded(path: Path, held_out: bool = True) -> np.ndarray:
    """(pairs, 2, 3) seconds: [stable side A, candidate side B] x (TTFT, TPOT, e2e)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if (r["index"] % 2 == 1) == held_out]
    return np.asarray([[r["A"], r["B"]] for r in keep], dtype=np.float64)


def drawer(scenario: Scenario, recorded: np.ndarray | None) -> Draw:
    def lognormal(rng: np.random.Generator, n: int) -> np.ndarray:
        shared = np.stack([s * rng.standard_normal(n) for s in SHARED])
        own = np.stack([[o * rng.standard_normal(n) for o in OWN] for _ in range(2)])
        return np.log(MEDIANS)[None, :, None] + shared[None] + own

    def bimodal(rng: np.random.Generator, n: int) -> np.ndarray:
        logs = lognormal(rng, n)
        stuck = rng.random(n) < 0.2
        factor = np.where(stuck, np.log(rng.uniform(10, 40, n)), 0.0)
        logs[:, 0] += factor  # waiting for the core delays the first token
        logs[:, 2] += factor
        return logs

    def from_recorded(rng: np.random.Generator, n: int) -> np.ndarray:
        assert recorded is not None
        picked = recorded[rng.integers(0, len(recorded), n)]  # (n, 2, 3)
        if not scenario.latency.endswith("-candidate"):  # A/A: either side may be the canary's
            swap = rng.random(n) < 0.5
            picked = np.where(swap[:, None, None], picked[:, ::-1], picked)
        return np.log(np.transpose(picked, (1, 2, 0)))

    shapes = {"lognormal": lognormal, "bimodal": bimodal}
    return shapes.get(scenario.latency, from_recorded)  # type: ignore[return-value]


def simulate_step(
    rng: np.random.Generator,
    stage: Stage,
    rate: float,
    scenario: Scenario,
    draw: Draw,
    total_before: int,
    thin_sessions: bool = True,
    factors: dict[tuple[int, int], float] | None = None,
    strata: bool = True,
    balanced: bool = True,
) -> tuple[Step, int]:
    """One step, judged after every request, and the canary's requests so far, copies too.

    Mirroring at `stage.mirror_rps` thins the arrivals, as the gateway's token bucket does at a
    steady rate. The step's canary requests are the live ones, those users got: copies reach no
    one. `strata`: a pair whose canary was still cache-cold is left out of the latency tests, as
    the engines' cached-token counts allow. `balanced`: a live step's latency is estimated over
    the two directions of copying apart where the gateway's analysis does (`balanced_at`), else
    pooled everywhere (the naive estimate)."""
    policy = stage.analysis
    targets = slo_targets(policy)
    stable = canary = ArmStats.empty(targets)
    margins = [getattr(policy.margins, m) or 0.0 for m in LATENCY_METRICS]
    # pairs, degraded, then per direction (copied to the canary, to stable): timed, the timed
    # scores' sums and sums of squares per metric; then the timed scores inside the clip
    pairs_before = np.zeros(19)
    failed_before = live_before = 0
    factors = {} if factors is None else factors
    weight = stage.weight / 100
    copy_share = min(1.0, stage.mirror_rps / rate) if stage.mirror_rps else 0.0
    lag = np.log(scenario.copy_lag)
    start, span = 0.0, 30.0
    seen_sessions: set[int] = set()
    arrivals_before = 0
    while start < stage.max_seconds:
        span = min(span, stage.max_seconds - start)
        n = rng.poisson(rate * span)
        times = start + np.sort(rng.uniform(0, span, n))
        start, span = start + span, 2 * span
        if n == 0:
            continue
        live = rng.random(n) < weight
        mirrored = rng.random(n) < copy_share
        copied, copied_back = ~live & mirrored, live & mirrored
        logs = draw(rng, n)  # (2, 3, n)
        stable_logs, canary_logs = logs[0], logs[1] + np.log(scenario.latency_factor)
        canary_served = np.cumsum(live | copied) + total_before
        cold = canary_served <= scenario.cold
        canary_logs = canary_logs + np.where(cold, np.log(3.0), 0.0)
        index = arrivals_before + np.arange(n)
        arrivals_before += n
        if scenario.session_size:
            sessions = _session_of(index, scenario.session_size)
            stable_logs = stable_logs + _session_factor(rng, sessions, 0, factors)[None, :]
            canary_logs = canary_logs + _session_factor(rng, sessions, 1, factors)[None, :]
        stable_failed = rng.random(n) < 0.001
        canary_failed = rng.random(n) < scenario.canary_error_rate
        s = running_stats(~live, stable_failed, list(stable_logs), targets, stable)
        # the canary arm: its live requests and the copies (counted for errors; their latency
        # is judged in pairs, not as independent samples)
        c = _with_copies(
            running_stats(live, canary_failed, list(canary_logs), targets, canary),
            copied,
            canary_failed,
        )
        live_served = np.cumsum(live) + live_before
        pair_ok = (copied | copied_back) & ~stable_failed & ~canary_failed
        if scenario.session_size and thin_sessions:
            first = np.zeros(n, dtype=bool)
            for i in np.flatnonzero(pair_ok):
                if sessions[i] not in seen_sessions:
                    seen_sessions.add(int(sessions[i]))
                    first[i] = True
            pair_ok = first
        timed = pair_ok & ~cold if strata else pair_ok
        # (3, n) paired log ratios, the copy the later half, scored as the analysis scores them
        logs = canary_logs - stable_logs + np.where(copied, lag, -lag)
        scores = np.stack(
            [paired_scores(r, m, policy.paired_clip) for r, m in zip(logs, margins, strict=True)]
        )
        inside = inside_clip(scores, policy.paired_clip) & timed
        degraded = pair_ok & (rng.random(n) < scenario.degraded)
        split = balanced and balanced_at(stage.weight)
        directions = (
            (timed & copied, timed & copied_back) if split else (timed, np.zeros_like(timed))
        )
        cum = np.stack(
            [
                np.cumsum(pair_ok),
                np.cumsum(degraded),
                *(
                    row
                    for way in directions
                    for row in (
                        np.cumsum(way),
                        *(np.cumsum(np.where(way, r, 0.0)) for r in scores),
                        *(np.cumsum(np.where(way, r * r, 0.0)) for r in scores),
                    )
                ),
                *np.cumsum(inside, axis=1),
            ]
        )
        cum = cum + pairs_before[:, None]
        failed_copies = np.cumsum(copied & canary_failed) + failed_before
        counts = PairCounts(
            n=cum[0],
            scores=_moments(cum, 2),
            inside={m: cum[16 + k] for k, m in enumerate(LATENCY_METRICS)},
            canary_failed=failed_copies,
            scored=cum[0],
            degraded=cum[1],
            reverse=_moments(cum, 9) if split else None,
        )
        paired = counts if stage.mirror_rps else None
        # as the rollout counts them: live requests and copies (the copies' arms)
        worse, not_worse = decide(evidence(s, c, policy, paired), c.requests, policy.min_samples)
        decided = worse | not_worse
        if decided.any():
            i = int(np.argmax(decided))
            step = Step("worse" if worse[i] else "not_worse", float(times[i]), int(live_served[i]))
            return step, int(canary_served[i])
        stable, canary = _last(s), _last(c)
        pairs_before, failed_before = cum[:, -1], int(failed_copies[-1])
        live_before, total_before = int(live_served[-1]), int(canary_served[-1])
    return Step("inconclusive", stage.max_seconds, live_before), total_before


def _moments(cum: np.ndarray, at: int) -> dict[str, LogMoments]:
    """One direction's running moments of each latency's score, from row `at` of `cum`: the
    count, then the three sums, then the three sums of squares."""
    return {
        m: LogMoments(cum[at], cum[at + 1 + k], cum[at + 4 + k])
        for k, m in enumerate(LATENCY_METRICS)
    }


def _with_copies(c: ArmStats, copied: np.ndarray, failed: np.ndarray) -> ArmStats:
    """The canary's arm with its copies counted among its requests and errors."""
    return ArmStats(
        requests=np.asarray(c.requests) + np.cumsum(copied),
        errors=np.asarray(c.errors) + np.cumsum(copied & failed),
        ttft=c.ttft,
        tpot=c.tpot,
        e2e=c.e2e,
        over_slo=c.over_slo,
    )


def _session_of(index: np.ndarray, size: int) -> np.ndarray:
    """Sessions of `size` requests, interleaved: ten sessions open at a time."""
    return (index // (10 * size)) * 10 + (index % 10)


def _session_factor(
    rng: np.random.Generator,
    sessions: np.ndarray,
    side: int,
    factors: dict[tuple[int, int], float],
) -> np.ndarray:
    """Each session's own log-latency factor on one side (its prompts, its cache state)."""
    for session in np.unique(sessions):
        factors.setdefault((int(session), side), float(0.4 * rng.standard_normal()))
    return np.asarray([factors[(int(s), side)] for s in sessions])


def simulate_rollout(
    rng: np.random.Generator,
    policy: RolloutPolicy,
    rate: float,
    scenario: Scenario,
    draw: Draw,
    thin_sessions: bool = True,
    strata: bool = True,
    balanced: bool = True,
) -> Run:
    """One rollout; its canary requests are those users got (live), copies excluded."""
    total, factors = 0, {}

    def judge(stage: Stage) -> Step:
        nonlocal total
        step, total = simulate_step(
            rng, stage, rate, scenario, draw, total, thin_sessions, factors, strata, balanced
        )
        return step

    return rollout_of(policy, judge)


def simulate_flagger(
    rng: np.random.Generator, flagger: Flagger, rate: float, scenario: Scenario, draw: Draw
) -> Run:
    """Flagger on the scenario's canary latencies; its e2e ceiling is 1.2 x stable's true p99,
    estimated from 20,000 draws."""
    stable_p99 = float(np.quantile(np.exp(draw(np.random.default_rng(7), 20_000)[0, 2]), 0.99))

    def e2e(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.exp(draw(rng, n)[1, 2]) if n else np.empty(0)

    return flagger_run(rng, flagger, rate, scenario, e2e, stable_p99)


# Flagger at the settings its docs show: the canary tutorial's (1 min, +10% to 50%, 5 failed
# checks), a slower progressive one (+5%, 10 failed checks) and a quicker one (30 s checks).
FLAGGERS = {
    "flagger (1m, +10%, 5 fails)": Flagger(),
    "flagger (1m, +5%, 10 fails)": Flagger(step_weight=5, threshold=10),
    "flagger (30s, +10%, 5 fails)": Flagger(interval_s=30.0, duration_window_s=30.0),
}


def without_latency_slos(policy: RolloutPolicy) -> RolloutPolicy:
    """Latency SLOs judge the service, not the comparison: a contended machine breaks them for
    stable and canary alike, so the benchmark leaves them out (the error ceiling stays)."""
    slos = policy.slos.model_copy(update=dict.fromkeys(LATENCY_SLOS))
    return policy.model_copy(update={"slos": slos})


def mirrored_policy(policy: RolloutPolicy, rate: float) -> RolloutPolicy:
    """The policy with a shadow phase and mirroring at every step (half the traffic's rate)
    unless it sets its own."""
    if policy.shadow is not None:
        return policy
    shadow = ShadowPolicy(rate_rps=rate / 2, min_pairs=policy.stages()[0].analysis.min_samples)
    return policy.model_copy(update={"shadow": shadow})


def run(
    runs: int, aa_runs: int, rate: float, seed: int, policy: RolloutPolicy, held_out: bool = True
) -> tuple[list[tuple[str, str, Summary]], dict]:
    """Every scenario: Slipway mirrored, Slipway on independent requests (no shadow, no pairs),
    Slipway mirrored without thinning sessions (the naive test, sessions only) or without
    clipping the pairs' log ratios (recorded latencies and a slow canary), and Flagger."""
    recorded = {name: load_recorded(path, held_out) for name, path in RECORDED.items()}
    policy = without_latency_slos(policy)
    mirrored = mirrored_policy(policy, rate)
    plain = policy.model_copy(update={"shadow": None})
    analysis = mirrored.analysis.model_copy(update={"paired_clip": None})
    unclipped = mirrored.model_copy(update={"analysis": analysis})
    results: list[tuple[str, str, Summary]] = []
    for i, scenario in enumerate(SCENARIOS):
        n = aa_runs if scenario.good else runs
        data = recorded.get(scenario.latency.removesuffix("-candidate"))
        draw = drawer(scenario, data)
        methods: dict[str, Callable[[np.random.Generator], Run]] = {
            "slipway, mirrored": lambda g, s=scenario, d=draw: simulate_rollout(
                g, mirrored, rate, s, d
            ),
            "slipway, independent requests": lambda g, s=scenario, d=draw: simulate_rollout(
                g, plain, rate, s, d
            ),
        }
        if scenario.session_size:
            methods["slipway, mirrored, sessions not thinned"] = lambda g, s=scenario, d=draw: (
                simulate_rollout(g, mirrored, rate, s, d, False)
            )
        if scenario.cold:
            methods["slipway, mirrored, no cache strata"] = lambda g, s=scenario, d=draw: (
                simulate_rollout(g, mirrored, rate, s, d, True, False)
            )
        if scenario.latency.startswith("recorded") or scenario.latency_factor != 1.0:
            methods["slipway, mirrored, log ratios unclipped"] = lambda g, s=scenario, d=draw: (
                simulate_rollout(g, unclipped, rate, s, d)
            )
        if scenario.copy_lag != 1.0:
            methods["slipway, mirrored, directions pooled"] = lambda g, s=scenario, d=draw: (
                simulate_rollout(g, mirrored, rate, s, d, balanced=False)
            )
        for name, flagger in FLAGGERS.items():
            methods[name] = lambda g, f=flagger, s=scenario, d=draw: simulate_flagger(
                g, f, rate, s, d
            )
        for j, (method, simulate) in enumerate(methods.items()):
            rng = np.random.default_rng([seed, i, j, 7])
            results.append((method, scenario.name, summarise([simulate(rng) for _ in range(n)])))
    info = {
        "scenarios": [asdict(s) for s in SCENARIOS],
        "mirrored_policy": mirrored.model_dump(mode="json"),
        "recorded": {
            name: {"file": RECORDED[name].name, "pairs": len(data), "held_out": held_out}
            for name, data in recorded.items()
        },
        "flaggers": {k: asdict(v) for k, v in FLAGGERS.items()},
    }
    return results, info
