"""Simulation benchmark of the canary analysis: how fast a bad canary is rolled back, how often a
good one is, and how long a good one takes to promote, next to a Flagger-like static analysis.

    python -m evaluation.benchmarks.canary --runs 1000 --out DIR

Each simulated rollout follows the rollout policy (configs/rollout/default.yaml unless --policy):
Poisson arrivals at --rate requests per second, each routed to the canary with the step's weight;
errors are Bernoulli, latencies lognormal (TTFT, TPOT and end-to-end drawn independently), and the
analysis looks after every request, through the same functions `analyse` uses. Writes canary.json
and canary.md to DIR (default $SLIPWAY_HOME/bench).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import click
import numpy as np
from scipy.stats import beta as beta_dist

from configs.home import Home
from configs.loader import ConfigError
from configs.rollout import RolloutPolicy, Stage, load_rollout_policy
from evaluation.canary import (
    LATENCY_METRICS,
    ArmStats,
    Decision,
    LogMoments,
    Metric,
    decide,
    evidence,
    slo_targets,
)

Outcome = Literal["rollback", "promote", "pause"]


@dataclass(frozen=True)
class Scenario:
    name: str
    canary_error_rate: float
    latency_factor: float


@dataclass(frozen=True)
class Traffic:
    """The simulated service: stable's behaviour, which an A/A canary copies."""

    rate: float = 10.0
    error_rate: float = 0.001
    median_s: tuple[float, float, float] = (0.2, 0.03, 3.0)  # TTFT, TPOT, e2e
    sigma: tuple[float, float, float] = (0.5, 0.25, 0.6)  # of log latency


SCENARIOS = (
    Scenario("errors 5% vs 0.1%", 0.05, 1.0),
    Scenario("latency +30%", 0.001, 1.3),
    Scenario("A/A", 0.001, 1.0),
)


@dataclass(frozen=True)
class Flagger:
    """Flagger's canary analysis as its docs configure it: a check every `interval`, traffic up by
    `step_weight` per passed check to `max_weight`, then promotion; rollback once `threshold`
    checks have failed (counted over the whole analysis, not reset by a pass). Checks: request
    success rate >= 99% over the last minute, and p99 request duration over the last 30 s under
    a fixed ceiling (here 1.2 x stable's true end-to-end p99, a tuned operator's choice)."""

    interval_s: float = 60.0
    threshold: int = 5
    step_weight: int = 10
    max_weight: int = 50
    min_success_pct: float = 99.0
    duration_window_s: float = 30.0
    duration_headroom: float = 1.2
    max_checks: int = 60


@dataclass(frozen=True)
class Step:
    decision: Decision
    seconds: float
    canary_requests: int


@dataclass(frozen=True)
class Run:
    outcome: Outcome
    seconds: float
    canary_requests: int


# ---- Slipway -------------------------------------------------------------------------------------


def _log_latencies(
    rng: np.random.Generator, n: int, traffic: Traffic, factor: np.ndarray
) -> list[np.ndarray]:
    return [
        np.log(m) + np.log(factor) + s * rng.standard_normal(n)
        for m, s in zip(traffic.median_s, traffic.sigma, strict=True)
    ]


def running_stats(
    mask: np.ndarray,
    failed: np.ndarray,
    logs: list[np.ndarray],
    targets: dict[Metric, float],
    before: ArmStats,
) -> ArmStats:
    """Running totals of one arm after every request, on top of `before` (the earlier requests)."""
    ok = mask & ~failed

    def moments(log: np.ndarray) -> LogMoments:
        return LogMoments(
            np.cumsum(ok),
            np.cumsum(np.where(ok, log, 0.0)),
            np.cumsum(np.where(ok, log * log, 0.0)),
        )

    by_metric = dict(zip(LATENCY_METRICS, logs, strict=True))
    now = ArmStats(
        requests=np.cumsum(mask),
        errors=np.cumsum(mask & failed),
        ttft=moments(by_metric["ttft"]),
        tpot=moments(by_metric["tpot"]),
        e2e=moments(by_metric["e2e"]),
        over_slo={m: np.cumsum(ok & (by_metric[m] > np.log(t))) for m, t in targets.items()},
    )
    return now + before


def _last(stats: ArmStats) -> ArmStats:
    def last(x: object) -> float:
        return float(np.asarray(x)[-1])

    def moments(m: LogMoments) -> LogMoments:
        return LogMoments(last(m.n), last(m.total), last(m.squares))

    return ArmStats(
        requests=last(stats.requests),
        errors=last(stats.errors),
        ttft=moments(stats.ttft),
        tpot=moments(stats.tpot),
        e2e=moments(stats.e2e),
        over_slo={m: last(v) for m, v in stats.over_slo.items()},
    )


def simulate_step(
    rng: np.random.Generator, stage: Stage, traffic: Traffic, scenario: Scenario
) -> Step:
    """One step, judged after every request until a decision or the step's time limit.

    Simulated in chunks of doubling length that stop at the first decision, so a step decided early
    costs little; arrivals in disjoint chunks are independent, as in one Poisson process."""
    targets = slo_targets(stage.analysis)
    stable = canary = ArmStats.empty(targets)
    # The first chunk should hold about twice min_samples canary requests.
    canary_rate = traffic.rate * stage.weight / 100
    start, span = 0.0, max(30.0, 2 * stage.analysis.min_samples / canary_rate)
    while start < stage.max_seconds:
        span = min(span, stage.max_seconds - start)
        n = rng.poisson(traffic.rate * span)
        arrivals = start + np.sort(rng.uniform(0, span, n))
        to_canary = rng.random(n) < stage.weight / 100
        failed = rng.random(n) < np.where(to_canary, scenario.canary_error_rate, traffic.error_rate)
        logs = _log_latencies(rng, n, traffic, np.where(to_canary, scenario.latency_factor, 1.0))
        start, span = start + span, 2 * span
        if n == 0:
            continue
        s = running_stats(~to_canary, failed, logs, targets, stable)
        c = running_stats(to_canary, failed, logs, targets, canary)
        worse, not_worse = decide(
            evidence(s, c, stage.analysis), c.requests, stage.analysis.min_samples
        )
        decided = worse | not_worse
        if decided.any():
            i = int(np.argmax(decided))
            served = int(np.asarray(c.requests)[i])
            return Step("worse" if worse[i] else "not_worse", float(arrivals[i]), served)
        stable, canary = _last(s), _last(c)
    return Step("inconclusive", stage.max_seconds, int(np.asarray(canary.requests)))


def simulate_rollout(
    rng: np.random.Generator, policy: RolloutPolicy, traffic: Traffic, scenario: Scenario
) -> Run:
    return rollout_of(policy, lambda stage: simulate_step(rng, stage, traffic, scenario))


def rollout_of(policy: RolloutPolicy, judge: Callable[[Stage], Step]) -> Run:
    """The policy's stages judged in turn by `judge`, until one is worse or undecided."""
    seconds, requests = 0.0, 0
    for stage in policy.stages():
        step = judge(stage)
        seconds, requests = seconds + step.seconds, requests + step.canary_requests
        if step.decision == "worse":
            return Run("rollback", seconds, requests)
        if step.decision == "inconclusive":
            return Run(
                "rollback" if policy.on_inconclusive == "rollback" else "pause", seconds, requests
            )
    return Run("promote", seconds, requests)


# ---- Flagger -------------------------------------------------------------------------------------


def simulate_flagger(
    rng: np.random.Generator, flagger: Flagger, traffic: Traffic, scenario: Scenario
) -> Run:
    """Flagger on lognormal end-to-end latency; its ceiling is 1.2 x stable's true p99."""
    p99 = traffic.median_s[2] * np.exp(2.326 * traffic.sigma[2])

    def e2e(rng: np.random.Generator, n: int) -> np.ndarray:
        return traffic.median_s[2] * np.exp(traffic.sigma[2] * rng.standard_normal(n))

    return flagger_run(rng, flagger, traffic.rate, scenario, e2e, p99)


def flagger_run(
    rng: np.random.Generator,
    flagger: Flagger,
    rate: float,
    scenario: Scenario,
    e2e: Callable[[np.random.Generator, int], np.ndarray],
    stable_p99: float,
) -> Run:
    """Flagger's loop: at each tick, roll back if the failed checks reached the threshold, else
    check the last interval: a failure counts, a pass advances the weight or, at max, promotes.
    `e2e` draws a canary's end-to-end latencies before the scenario's factor."""
    ceiling = stable_p99 * flagger.duration_headroom
    weight, failed_checks, requests = flagger.step_weight, 0, 0
    for tick in range(1, flagger.max_checks + 1):
        now = tick * flagger.interval_s
        if failed_checks >= flagger.threshold:
            return Run("rollback", now, requests)
        n = rng.poisson(rate * weight / 100 * flagger.interval_s)
        requests += n
        errors = rng.binomial(n, scenario.canary_error_rate)
        ok = n - errors
        recent = int(rng.binomial(ok, flagger.duration_window_s / flagger.interval_s))
        latencies = e2e(rng, recent) * scenario.latency_factor
        # No traffic in a window gives Prometheus no value, which Flagger counts as a failed check.
        passed = (
            n > 0
            and 100 * ok / n >= flagger.min_success_pct
            and latencies.size > 0
            and np.quantile(latencies, 0.99) <= ceiling
        )
        if not passed:
            failed_checks += 1
        elif weight < flagger.max_weight:
            weight += flagger.step_weight
        else:
            return Run("promote", now, requests)
    return Run("pause", flagger.max_checks * flagger.interval_s, requests)


# ---- report --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Outcomes of many rollouts of one scenario; requests and seconds to rollback or promotion."""

    runs: int
    rollback_rate: float
    rollback_rate_ci95: tuple[float, float]
    promote_rate: float
    pause_rate: float
    rollback_canary_requests: tuple[float, float] | None  # median, p90
    rollback_seconds: tuple[float, float] | None
    promote_seconds: tuple[float, float] | None


def _median_p90(values: list[float]) -> tuple[float, float] | None:
    return (float(np.median(values)), float(np.quantile(values, 0.9))) if values else None


def _clopper_pearson(k: int, n: int) -> tuple[float, float]:
    lo = float(beta_dist.ppf(0.025, k, n - k + 1)) if k > 0 else 0.0
    hi = float(beta_dist.ppf(0.975, k + 1, n - k)) if k < n else 1.0
    return lo, hi


def summarise(runs: list[Run]) -> Summary:
    rollbacks = [r for r in runs if r.outcome == "rollback"]
    promoted = [r for r in runs if r.outcome == "promote"]
    return Summary(
        runs=len(runs),
        rollback_rate=len(rollbacks) / len(runs),
        rollback_rate_ci95=_clopper_pearson(len(rollbacks), len(runs)),
        promote_rate=len(promoted) / len(runs),
        pause_rate=sum(r.outcome == "pause" for r in runs) / len(runs),
        rollback_canary_requests=_median_p90([r.canary_requests for r in rollbacks]),
        rollback_seconds=_median_p90([r.seconds for r in rollbacks]),
        promote_seconds=_median_p90([r.seconds for r in promoted]),
    )


def markdown(results: list[tuple[str, str, Summary]]) -> str:
    def pair(values: tuple[float, float] | None) -> str:
        return "-" if values is None else f"{values[0]:.0f} / {values[1]:.0f}"

    lines = [
        (
            "| method | scenario | rolled back (95% CI) | paused "
            "| canary requests to rollback (median / p90) | seconds to rollback (median / p90) "
            "| seconds to promote (median / p90) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for method, scenario, s in results:
        lo, hi = s.rollback_rate_ci95
        lines.append(
            f"| {method} | {scenario} | {s.rollback_rate:.1%} ({lo:.1%}-{hi:.1%}) "
            f"| {s.pause_rate:.1%} | {pair(s.rollback_canary_requests)} "
            f"| {pair(s.rollback_seconds)} | {pair(s.promote_seconds)} |"
        )
    return "\n".join(lines) + "\n"


def run(
    runs: int,
    rate: float,
    seed: int,
    policy_path: Path,
    out: Path | None,
    mirrored_run: Callable[..., tuple[list[tuple[str, str, Summary]], dict]],
    aa_runs: int | None = None,
    tuning: bool = False,
) -> None:
    """Simulate canary rollouts: Slipway's sequential analysis vs a Flagger-like static one, on
    independent lognormal requests, then with mirroring on real latency shapes
    (`mirrored_run`, canary_mirrored.run; `aa_runs` rollouts per good canary, default `runs`)."""
    try:
        policy = load_rollout_policy(policy_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    traffic, flagger = Traffic(rate=rate), Flagger()
    started = time.perf_counter()
    results: list[tuple[str, str, Summary]] = []
    for i, scenario in enumerate(SCENARIOS):
        rng = np.random.default_rng([seed, i, 0])
        sims = [simulate_rollout(rng, policy, traffic, scenario) for _ in range(runs)]
        results.append(("slipway", scenario.name, summarise(sims)))
        rng = np.random.default_rng([seed, i, 1])
        sims = [simulate_flagger(rng, flagger, traffic, scenario) for _ in range(runs)]
        results.append(("flagger", scenario.name, summarise(sims)))
    mirrored, mirrored_info = mirrored_run(
        runs, aa_runs or runs, rate, seed, policy, held_out=not tuning
    )
    elapsed = round(time.perf_counter() - started, 1)

    out = out or Home.from_env().root / "bench"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "runs": runs,
        "seed": seed,
        "seconds": elapsed,
        "traffic": asdict(traffic),
        "scenarios": [asdict(s) for s in SCENARIOS],
        "policy": policy.model_dump(mode="json"),
        "flagger": asdict(flagger),
        "results": [{"method": m, "scenario": sc, **asdict(s)} for m, sc, s in results],
        "mirrored": {
            **mirrored_info,
            "aa_runs": aa_runs or runs,
            "results": [{"method": m, "scenario": sc, **asdict(s)} for m, sc, s in mirrored],
        },
    }
    (out / "canary.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(results)
    (out / "canary.md").write_text(
        f"# Canary analysis benchmark\n\n{runs} rollouts per row, {rate:g} requests/s in all, "
        f"seed {seed}. Slipway: steps {policy.steps}, judged after every request. Flagger: a "
        f"check every {flagger.interval_s:g} s, +{flagger.step_weight}% per passed check up to "
        f"{flagger.max_weight}%, rollback after {flagger.threshold} failed checks.\n\n{table}"
        f"\n## With mirroring, on real latency shapes\n\n{aa_runs or runs} rollouts per good "
        f"canary, {runs} per bad one; a shadow phase, then every step judged on mirrored pairs "
        f"(alpha {policy.analysis.alpha:g}). Recorded pairs: "
        f"{'tuning half' if tuning else 'held-out half'}.\n\n{markdown(mirrored)}"
    )
    click.echo(
        f"{table}\n{markdown(mirrored)}\n{elapsed} s; wrote {out / 'canary.json'} and "
        f"{out / 'canary.md'}"
    )
