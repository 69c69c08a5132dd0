"""Canary statistics: is the canary worse than stable, not worse, or is it too early to tell?

Pure functions over the gateway's per-backend samples since the step began. Every test is an
always-valid sequential test: its statistic is an e-process E_t (a nonnegative supermartingale
with E_0 = 1 when the null holds), so by Ville's inequality P(sup_t E_t >= 1/a) <= a. The rollout
may therefore look after every request, for as long as it likes, and keep its error rates.

- Error rate, canary vs stable. With s the canary's share of requests, each error lands on the
  canary with probability pi = s*p_c / (s*p_c + (1-s)*p_s). "Canary no worse than (1+m) x stable"
  is exactly pi <= pi0 = s(1+m) / (s(1+m) + 1 - s), whatever the stable's own rate, so the errors
  alone carry the test: a Bernoulli sequence of "was it the canary?", tested with a uniform Beta
  mixture over pi (the conditional test behind Fisher's exact test, made sequential). With
  errors at 5% vs 0.1% and 5% of traffic on the canary, four canary errors are enough.
  "Not worse" needs the canary's own error rate shown below stable's (1+m) plus an absolute
  tolerance: rare errors cannot be shown equal in a few hundred requests, a bound can.
- Latency (TTFT, TPOT, end-to-end), canary vs stable, on log latency: a margin becomes a ratio,
  and heavy right tails stop dominating. theta = mean log canary - mean log stable, the log of the
  ratio of geometric means (of medians, for lognormal latencies). The normal-mixture mSPRT
  (Johari et al. 2017, "Peeking at A/B tests"; asymptotic confidence sequences, Waudby-Smith et
  al. 2021) with plug-in variance v = s_c^2/n_c + s_s^2/n_s and mixture scale tau:
      log L(theta0) = 1/2 log(v / (v + tau^2)) + tau^2 (theta_hat - theta0)^2 / (2 v (v + tau^2))
  With delta = log(1 + margin): worse if theta_hat > delta and L(delta) >= 1/alpha; not worse
  (non-inferior) if theta_hat < delta and L(delta) >= 1/beta. L(theta0) only grows as theta0
  moves away from theta_hat, so each one-sided claim inherits the two-sided guarantee.
- Paired latency (mirroring: the same request sent to both at the same moment). Each pair gives
  r = log(canary latency / stable latency), tested against delta = log(1 + m) through its
  clipped score psi(r) = clip(r - delta, -c, c) (a Huber score; c = the policy's paired_clip).
  The pairing cancels what both halves share (the prompt's length, the load, the moment), and
  the clip keeps a pair stuck behind the other engine's work (TTFT ratios from 0.16 to 6 on two
  vLLM engines sharing two cores) from carrying the verdict alone. With theta the centre of the
  pairs' log ratios, symmetric around it (the halves are exchangeable but for the canary's own
  effect), E psi(r) has the sign of theta - delta: "worse" rejects E psi <= 0, "not worse" rejects
  E psi >= 0, by the same normal-mixture mSPRT as above on the mean score and its plug-in
  variance s_psi^2 / n. Measured on recorded pairs of two vLLM engines, c = 0.5 decides with 1.5x
  fewer pairs than the plain mean of the log ratios on TTFT and 2.1x on TPOT (each engine on a
  core of its own), 4.8x on TTFT when both share one core. The ratio reported is the one-step
  M-estimate exp(delta + mean psi / share of pairs inside the clip), on the test's side of the
  limit; with no clip, the geometric mean.
  At a live step requests are copied both ways, and the copy is not the original's equal: it
  starts a moment later, on the other engine's queue (measured on two vLLM engines: a canary copy
  1.06-1.09 x its stable original, a stable copy 0.88-0.99 x its canary original). So the pairs
  are a crossover design with a period effect k: r = theta + k where the canary half was the copy,
  theta - k where stable's was. theta is estimated balanced, (mean_to_canary + mean_to_stable)/2,
  with variance (s_1^2/n_1 + s_2^2/n_2)/4, which cancels k whatever the step's weight; pooling
  them carries (n_1 - n_2)/(n_1 + n_2) x k, half of k at a 25% step. The same holds of the mean
  scores: at theta = delta, E psi(k + e) + E psi(-k + e) = 0 for symmetric e. The balanced
  estimate needs more pairs the fewer go one way, so a step pools them where one direction
  carries under a fifth (evaluation/paired.py), and in the shadow phase only the canary is
  copied: there what is left of k counts against the canary (a conservative bias). The gateway
  times each half from its own send, which removed most of k.
- Paired quality: each mirrored pair's answers are compared (evaluation/quality/agreement.py) and
  marked degraded or not; the canary is worse if its degraded share is above what the release
  accepted plus the policy's margin, not worse once it is shown below it (Beta mixture).
- Sessions: when pairs carry a session key, only each session's first pair is used, so the pairs
  tested are independent however a session's requests correlate (the same user, a warm cache).
- SLOs, canary alone: the share of requests over a p99 target must stay <= 1%, the error rate
  under its ceiling; violated if a Beta-mixture test centred on the ceiling rejects it. SLOs can
  only fail a canary: proving a 1% tail below target takes hundreds of requests per step.

One analysis splits alpha (false "worse", i.e. false rollback) evenly among its "worse" tests
and beta (false "not worse", i.e. false advance) among its comparisons (Bonferroni). Every
function below broadcasts over numpy arrays, so the simulation benchmark judges every request of
thousands of rollouts through the same code that `analyse` uses for one look.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import betaln, xlog1py, xlogy

from configs.rollout import AnalysisPolicy

Decision = Literal["worse", "not_worse", "inconclusive"]
Source = Literal["organic", "synthetic"]
Basis = Literal["organic", "organic+synthetic"]
Metric = Literal["ttft", "tpot", "e2e"]
LATENCY_METRICS: tuple[Metric, ...] = ("ttft", "tpot", "e2e")

# Prior scale of the latency mixture, in log-ratio units: it spends the test's power on ratios
# around 0.8-1.25, the size of regressions a release is judged on.
LOG_RATIO_SCALE = 0.2
# The p99 SLOs bound the share of canary requests over their target.
SLO_TAIL = 0.01

Array = NDArray[np.float64]


# ---- samples -------------------------------------------------------------------------------------


def _latencies(values: ArrayLike, name: str) -> Array:
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    if out.size and not (np.isfinite(out).all() and (out > 0).all()):
        raise ValueError(f"{name} must hold finite latencies > 0 seconds")
    return out


@dataclass(frozen=True, eq=False)
class ArmSamples:
    """One backend's traffic since the step began, from one source.

    Counts cover every request; latencies (seconds) cover successful requests only, all of them
    or a uniform sample. TPOT is the time per output token after the first.
    """

    requests: int
    errors: int
    ttft_s: Array = field(default_factory=lambda: np.empty(0))
    tpot_s: Array = field(default_factory=lambda: np.empty(0))
    e2e_s: Array = field(default_factory=lambda: np.empty(0))
    source: Source = "organic"

    def __post_init__(self) -> None:
        if not 0 <= self.errors <= self.requests:
            raise ValueError(f"need 0 <= errors <= requests, got {self.errors} of {self.requests}")
        if self.source not in ("organic", "synthetic"):
            raise ValueError(f"source must be 'organic' or 'synthetic', got {self.source!r}")
        for metric in LATENCY_METRICS:
            name = f"{metric}_s"
            object.__setattr__(self, name, _latencies(getattr(self, name), name))

    def latency(self, metric: Metric) -> Array:
        return getattr(self, f"{metric}_s")

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any], source: Source = "organic") -> ArmSamples:
        """From a gateway backend snapshot taken with samples (serving.gateway.stats: inter-token
        latency stands for TPOT)."""

        def samples(key: str) -> list[float]:
            return list((snapshot.get(key) or {}).get("samples") or [])

        return cls(
            requests=int(snapshot["requests"]),
            errors=int(snapshot["errors"]),
            ttft_s=np.asarray(samples("ttft_s")),
            tpot_s=np.asarray(samples("itl_s")),
            e2e_s=np.asarray(samples("e2e_s")),
            source=source,
        )


@dataclass(frozen=True)
class LogMoments:
    """Count, sum and sum of squares of log latency: additive, so arms and sources pool by `+`."""

    n: ArrayLike
    total: ArrayLike
    squares: ArrayLike

    @classmethod
    def of(cls, seconds: Array) -> LogMoments:
        logs = np.log(seconds)
        return cls.of_logs(logs)

    @classmethod
    def of_logs(cls, logs: Array) -> LogMoments:
        return cls(n=logs.size, total=float(logs.sum()), squares=float((logs**2).sum()))

    def __add__(self, other: LogMoments) -> LogMoments:
        return LogMoments(
            np.add(self.n, other.n),
            np.add(self.total, other.total),
            np.add(self.squares, other.squares),
        )

    def mean_var(self) -> tuple[Array, Array]:
        n = np.asarray(self.n, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.asarray(self.total) / n
            var = np.maximum(np.asarray(self.squares) - n * mean**2, 0.0) / (n - 1)
        return mean, var


def paired_scores(log_ratios: ArrayLike, margin: float, clip: float | None) -> Array:
    """Each pair's score: its log latency ratio less log(1 + margin), clipped to [-clip, clip]."""
    centred = np.asarray(log_ratios, np.float64) - np.log1p(margin)
    return centred if clip is None else np.clip(centred, -clip, clip)


def inside_clip(scores: Array, clip: float | None) -> Array:
    """Whether each score lies inside the clip (it moves with the pair's own ratio there)."""
    return np.ones(scores.shape, bool) if clip is None else np.abs(scores) < clip


@dataclass(frozen=True)
class PairCounts:
    """What the paired tests need of the mirrored pairs since the step began: per compared latency,
    the moments of the pairs' scores (`paired_scores` at the policy's margin and clip) over the
    pairs measured on both sides and how many lay inside the clip; the pairs whose canary failed
    (stable answered), and the answers scored and found degraded. Scalars for one look, arrays for
    every look."""

    n: ArrayLike  # pairs (independent ones: the first of each session)
    scores: dict[Metric, LogMoments]  # of the pairs whose canary half was the copy
    inside: dict[Metric, ArrayLike]  # scored pairs inside the clip, both directions
    canary_failed: ArrayLike
    scored: ArrayLike
    degraded: ArrayLike
    # A live step's pairs whose stable half was the copy, when latency is estimated balanced over
    # both directions (`scores` then holds only those whose canary half was); None: pooled.
    reverse: dict[Metric, LogMoments] | None = None


@dataclass(frozen=True)
class ArmStats:
    """What the tests need of one arm: request and error counts, log-latency moments, and how many
    requests were over each p99 SLO target. Scalars for one look, arrays for every look."""

    requests: ArrayLike
    errors: ArrayLike
    ttft: LogMoments
    tpot: LogMoments
    e2e: LogMoments
    over_slo: dict[Metric, ArrayLike]

    @classmethod
    def empty(cls, slo_metrics: Iterable[Metric] = ()) -> ArmStats:
        zero = LogMoments(0, 0.0, 0.0)
        return cls(0, 0, zero, zero, zero, {m: 0 for m in slo_metrics})

    def moments(self, metric: Metric) -> LogMoments:
        return getattr(self, metric)

    def __add__(self, other: ArmStats) -> ArmStats:
        return ArmStats(
            requests=np.add(self.requests, other.requests),
            errors=np.add(self.errors, other.errors),
            ttft=self.ttft + other.ttft,
            tpot=self.tpot + other.tpot,
            e2e=self.e2e + other.e2e,
            over_slo={m: np.add(v, other.over_slo[m]) for m, v in self.over_slo.items()},
        )


def slo_targets(policy: AnalysisPolicy) -> dict[Metric, float]:
    """The p99 latency targets (seconds) the policy sets."""
    targets = {
        "ttft": policy.slos.ttft_p99_s,
        "tpot": policy.slos.tpot_p99_s,
        "e2e": policy.slos.e2e_p99_s,
    }
    return {m: t for m, t in targets.items() if t is not None}  # type: ignore[misc]


def summarize(arms: Sequence[ArmSamples], policy: AnalysisPolicy) -> ArmStats:
    """Pool samples (of one arm) into the statistics the tests read."""
    targets = slo_targets(policy)
    latencies = {
        m: np.concatenate([np.empty(0)] + [a.latency(m) for a in arms]) for m in LATENCY_METRICS
    }
    return ArmStats(
        requests=sum(a.requests for a in arms),
        errors=sum(a.errors for a in arms),
        ttft=LogMoments.of(latencies["ttft"]),
        tpot=LogMoments.of(latencies["tpot"]),
        e2e=LogMoments.of(latencies["e2e"]),
        over_slo={m: int((latencies[m] > t).sum()) for m, t in targets.items()},
    )


# ---- e-values ------------------------------------------------------------------------------------


def bernoulli_log_e(k: ArrayLike, n: ArrayLike, p0: ArrayLike, a: ArrayLike, b: ArrayLike) -> Array:
    """log of the Beta(a, b)-mixture likelihood ratio of k successes in n trials against rate p0.

    A test martingale under p = p0; used one-sided (only when k/n is on the alternative's side of
    p0), it also bounds every p further on the null's side, whose likelihood is closer to k/n's.
    """
    k, n, p0 = np.asarray(k, np.float64), np.asarray(n, np.float64), np.asarray(p0, np.float64)
    return betaln(a + k, b + n - k) - betaln(a, b) - xlogy(k, p0) - xlog1py(n - k, -p0)


def rate_prior(p0: ArrayLike) -> tuple[float, Array]:
    """Beta(1/2, b) with mean p0: Jeffreys-shaped, and centred on the rare rates being judged."""
    return 0.5, 0.5 * (1 - np.asarray(p0)) / np.asarray(p0)


def normal_mixture_log_e(diff: ArrayLike, var: ArrayLike, tau: float = LOG_RATIO_SCALE) -> Array:
    """log of the N(0, tau^2)-mixture likelihood ratio of an estimate `diff` away from the null,
    with variance `var` (Robbins' normal mixture; mSPRT)."""
    diff, var = np.asarray(diff, np.float64), np.maximum(np.asarray(var, np.float64), 1e-12)
    t2 = tau * tau
    return 0.5 * np.log(var / (var + t2)) + t2 * diff**2 / (2 * var * (var + t2))


# ---- tests ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """One test at every look its inputs describe (arrays broadcast like the inputs).

    `canary`, `stable`, `limit` are in the metric's units: error rate, geometric-mean latency in
    seconds, or the share of requests over an SLO target; the canary is worse beyond `limit`.
    """

    metric: str
    kind: Literal["comparison", "slo"]
    n_stable: Array
    n_canary: Array
    stable: Array
    canary: Array
    limit: Array
    log_e_worse: Array
    log_e_not_worse: Array
    worse: NDArray[np.bool_]
    not_worse: NDArray[np.bool_]


def _f(x: ArrayLike) -> Array:
    return np.asarray(x, dtype=np.float64)


def error_evidence(
    stable: ArmStats, canary: ArmStats, margin: float, tolerance: float, alpha: float, beta: float
) -> Evidence:
    """Error rate, canary vs stable: the canary's share of errors, and the canary's own rate."""
    n_s, n_c = _f(stable.requests), _f(canary.requests)
    e_s, e_c = _f(stable.errors), _f(canary.errors)
    both = (n_s > 0) & (n_c > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = n_c / (n_c + n_s)
        pi0 = np.where(both, share * (1 + margin) / (share * (1 + margin) + 1 - share), 0.5)
        rate_s, rate_c = e_s / n_s, e_c / n_c
    log_e_worse = np.where(both, bernoulli_log_e(e_c, e_c + e_s, pi0, 1.0, 1.0), 0.0)

    bound = np.clip(np.where(both, rate_s, 0.0) * (1 + margin) + tolerance, 1e-9, 1 - 1e-9)
    a, b = rate_prior(bound)
    log_e_not_worse = np.where(both, bernoulli_log_e(e_c, n_c, bound, a, b), 0.0)
    return Evidence(
        metric="error_rate",
        kind="comparison",
        n_stable=n_s,
        n_canary=n_c,
        stable=rate_s,
        canary=rate_c,
        limit=rate_s * (1 + margin),
        log_e_worse=log_e_worse,
        log_e_not_worse=log_e_not_worse,
        worse=both & (e_c > pi0 * (e_c + e_s)) & (log_e_worse >= np.log(1 / alpha)),
        not_worse=both & (e_c < bound * n_c) & (log_e_not_worse >= np.log(1 / beta)),
    )


def latency_evidence(
    stable: ArmStats,
    canary: ArmStats,
    metric: Metric,
    margin: float,
    burn_in: int,
    alpha: float,
    beta: float,
) -> Evidence:
    """One latency, canary vs stable: the ratio of geometric means against 1 + margin."""
    mean_s, var_s = stable.moments(metric).mean_var()
    mean_c, var_c = canary.moments(metric).mean_var()
    n_s, n_c = _f(stable.moments(metric).n), _f(canary.moments(metric).n)
    ready = (n_s >= burn_in) & (n_c >= burn_in)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.where(ready, mean_c - mean_s - np.log1p(margin), 0.0)
        var = np.where(ready, var_c / n_c + var_s / n_s, 1.0)
    log_e = np.where(ready, normal_mixture_log_e(diff, var), 0.0)
    return Evidence(
        metric=metric,
        kind="comparison",
        n_stable=n_s,
        n_canary=n_c,
        stable=np.exp(mean_s),
        canary=np.exp(mean_c),
        limit=np.exp(mean_s) * (1 + margin),
        log_e_worse=np.where(diff > 0, log_e, 0.0),
        log_e_not_worse=np.where(diff < 0, log_e, 0.0),
        worse=ready & (diff > 0) & (log_e >= np.log(1 / alpha)),
        not_worse=ready & (diff < 0) & (log_e >= np.log(1 / beta)),
    )


def paired_latency_evidence(
    pairs: PairCounts, metric: Metric, margin: float, burn_in: int, alpha: float, beta: float
) -> Evidence:
    """One latency on mirrored pairs: the mean score (the pairs' scored at `margin`) against 0,
    with the variance of the scores; balanced over the two directions of copying where the
    counts hold them apart (each direction then needs half the burn-in)."""
    mean, v, n, ready = _paired_estimate(pairs, metric, burn_in)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.where(ready, mean, 0.0)
        v = np.where(ready, v, 1.0)
        share_inside = np.maximum(_f(pairs.inside[metric]), 1.0) / np.maximum(n, 1.0)
    log_e = np.where(ready, normal_mixture_log_e(diff, v), 0.0)
    above, below = diff > 0, diff < 0
    return Evidence(
        metric=f"{metric}_paired",
        kind="comparison",
        n_stable=n,
        n_canary=n,
        stable=np.ones_like(n),
        canary=(1 + margin) * np.exp(mean / share_inside),
        limit=np.full_like(n, 1 + margin),
        log_e_worse=np.where(above, log_e, 0.0),
        log_e_not_worse=np.where(below, log_e, 0.0),
        worse=ready & above & (log_e >= np.log(1 / alpha)),
        not_worse=ready & below & (log_e >= np.log(1 / beta)),
    )


def _paired_estimate(
    pairs: PairCounts, metric: Metric, burn_in: int
) -> tuple[Array, Array, Array, NDArray[np.bool_]]:
    """The mean score, its variance, the pairs it rests on, and whether there are enough."""
    forward = pairs.scores[metric]
    n_1 = _f(forward.n)
    mean_1, var_1 = forward.mean_var()
    if pairs.reverse is None:
        with np.errstate(invalid="ignore", divide="ignore"):
            return mean_1, var_1 / n_1, n_1, n_1 >= burn_in
    reverse = pairs.reverse[metric]
    n_2 = _f(reverse.n)
    mean_2, var_2 = reverse.mean_var()
    half = max(2, -(-burn_in // 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (mean_1 + mean_2) / 2
        v = (var_1 / n_1 + var_2 / n_2) / 4
    return mean, v, n_1 + n_2, (n_1 >= half) & (n_2 >= half)


def quality_evidence(pairs: PairCounts, limit: float, alpha: float, beta: float) -> Evidence:
    """Paired answers: the canary's share of degraded answers against `limit`."""
    n, k = _f(pairs.scored), _f(pairs.degraded)
    p0 = float(np.clip(limit, 1e-9, 1 - 1e-9))
    a, b = rate_prior(p0)
    log_e = np.where(n > 0, bernoulli_log_e(k, n, p0, a, b), 0.0)
    above, below = k > p0 * n, k < p0 * n
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = k / n
    return Evidence(
        metric="quality",
        kind="comparison",
        n_stable=n,
        n_canary=n,
        stable=np.zeros_like(n),
        canary=rate,
        limit=np.full_like(n, p0),
        log_e_worse=np.where(above, log_e, 0.0),
        log_e_not_worse=np.where(below, log_e, 0.0),
        worse=above & (log_e >= np.log(1 / alpha)),
        not_worse=(n > 0) & below & (log_e >= np.log(1 / beta)),
    )


def slo_evidence(
    metric: str, over: ArrayLike, n: ArrayLike, ceiling: float, alpha: float
) -> Evidence:
    """An SLO on the canary alone: `over` of `n` requests broke it, at most `ceiling` may."""
    over, n = _f(over), _f(n)
    a, b = rate_prior(ceiling)
    log_e = np.where(n > 0, bernoulli_log_e(over, n, ceiling, a, b), 0.0)
    above = over > ceiling * n
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = over / n
    return Evidence(
        metric=metric,
        kind="slo",
        n_stable=np.zeros_like(n),
        n_canary=n,
        stable=np.full_like(n, np.nan),
        canary=rate,
        limit=np.full_like(n, ceiling),
        log_e_worse=np.where(above, log_e, 0.0),
        log_e_not_worse=np.zeros_like(n),
        worse=above & (log_e >= np.log(1 / alpha)),
        not_worse=np.zeros_like(above),
    )


def evidence(
    stable: ArmStats, canary: ArmStats, policy: AnalysisPolicy, pairs: PairCounts | None = None
) -> list[Evidence]:
    """Every test the policy asks for, each at its share of alpha and beta. With mirrored pairs,
    latency is compared on the pairs (not on the independent requests) and answers are judged."""
    margins, tolerance, burn_in = policy.margins, policy.error_rate_tolerance, policy.burn_in
    compared = [m for m in LATENCY_METRICS if getattr(margins, m) is not None]
    slos = slo_targets(policy)
    n_compared = len(compared) + (margins.error_rate is not None) + (pairs is not None)
    n_worse = n_compared + len(slos) + (policy.slos.error_rate is not None)
    alpha, beta = policy.alpha / max(n_worse, 1), policy.beta / max(n_compared, 1)

    out = []
    if margins.error_rate is not None:
        out.append(error_evidence(stable, canary, margins.error_rate, tolerance, alpha, beta))
    for m in compared:
        margin = getattr(margins, m)
        if pairs is None:
            out.append(latency_evidence(stable, canary, m, margin, burn_in, alpha, beta))
        else:
            out.append(paired_latency_evidence(pairs, m, margin, burn_in, alpha, beta))
    if pairs is not None:
        limit = policy.quality.accepted + policy.quality.margin
        out.append(quality_evidence(pairs, limit, alpha, beta))
    for m in slos:
        over, n = canary.over_slo[m], canary.moments(m).n
        out.append(slo_evidence(f"{m}_p99", over, n, SLO_TAIL, alpha))
    if policy.slos.error_rate is not None:
        ceiling = policy.slos.error_rate
        out.append(
            slo_evidence("error_rate_ceiling", canary.errors, canary.requests, ceiling, alpha)
        )
    return out


def decide(
    tests: Sequence[Evidence], canary_requests: ArrayLike, min_samples: int
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(worse, not_worse) at every look: any test worse; or enough canary requests and every
    comparison non-inferior. An SLO can fail a canary but need not be proven to pass it."""
    enough = np.asarray(canary_requests) >= min_samples
    worse = np.logical_or.reduce([t.worse for t in tests]) if tests else np.zeros_like(enough)
    passed = [t.not_worse for t in tests if t.kind == "comparison"]
    not_worse = enough & ~worse & (np.logical_and.reduce(passed) if passed else True)
    return worse, not_worse


# ---- one look ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricTest:
    """One test at one look; p-values are always valid (1/e, whenever you look)."""

    metric: str
    kind: Literal["comparison", "slo"]
    decision: Decision
    n_stable: int
    n_canary: int
    stable: float
    canary: float
    limit: float
    p_worse: float
    p_not_worse: float
    reason: str


@dataclass(frozen=True)
class Verdict:
    """The tests on one set of samples (organic, synthetic, or both) and what they conclude."""

    decision: Decision
    n_stable: int
    n_canary: int
    tests: tuple[MetricTest, ...]


@dataclass(frozen=True)
class Analysis:
    """The decision at one look, which samples it rests on, and why."""

    decision: Decision
    basis: Basis
    verdicts: dict[str, Verdict]
    reasons: tuple[str, ...]

    @property
    def tests(self) -> tuple[MetricTest, ...]:
        return self.verdicts[self.basis].tests


def _describe(t: Evidence, decision: Decision) -> str:
    stable, canary, limit = float(t.stable), float(t.canary), float(t.limit)
    p_worse, p_ok = (
        min(1.0, float(np.exp(-t.log_e_worse))),
        min(1.0, float(np.exp(-t.log_e_not_worse))),
    )
    if t.kind == "slo":
        what = (
            "errors" if t.metric == "error_rate_ceiling" else f"requests over the {t.metric} target"
        )
        return f"{t.metric} SLO: {canary:.2%} of canary {what}, at most {limit:.2%} allowed: " + (
            f"violated (p={p_worse:.2g})" if decision == "worse" else "not shown violated"
        )
    if t.metric == "error_rate":
        head = f"error rate: canary {canary:.2%} vs stable {stable:.2%} (worse beyond {limit:.2%})"
    elif t.metric == "quality":
        head = (
            f"quality: {canary:.1%} of {int(t.n_canary)} mirrored answers degraded "
            f"(worse beyond {limit:.1%})"
        )
    elif t.metric.endswith("_paired"):
        head = (
            f"{t.metric}: canary/stable ratio {canary:.2f} (paired estimate) over "
            f"{int(t.n_canary)} mirrored pairs (worse beyond {limit:.2f})"
        )
    else:
        head = (
            f"{t.metric}: canary {canary * 1e3:.0f} ms vs stable {stable * 1e3:.0f} ms "
            f"geometric mean, ratio {canary / stable:.2f} (worse beyond {limit / stable:.2f})"
        )
    tail = {"worse": f"worse (p={p_worse:.2g})", "not_worse": f"not worse (p={p_ok:.2g})"}
    return f"{head}: {tail.get(decision, 'inconclusive')}"


def _metric_test(t: Evidence) -> MetricTest:
    decision: Decision = "worse" if t.worse else "not_worse" if t.not_worse else "inconclusive"
    return MetricTest(
        metric=t.metric,
        kind=t.kind,
        decision=decision,
        n_stable=int(t.n_stable),
        n_canary=int(t.n_canary),
        stable=float(t.stable),
        canary=float(t.canary),
        limit=float(t.limit),
        p_worse=min(1.0, float(np.exp(-t.log_e_worse))),
        p_not_worse=min(1.0, float(np.exp(-t.log_e_not_worse))),
        reason=_describe(t, decision),
    )


def verdict(
    stable: Sequence[ArmSamples],
    canary: Sequence[ArmSamples],
    policy: AnalysisPolicy,
    pairs: PairCounts | None = None,
) -> Verdict:
    """All tests on one set of samples (and the step's mirrored pairs, if any)."""
    s, c = summarize(stable, policy), summarize(canary, policy)
    tests = evidence(s, c, policy, pairs)
    worse, not_worse = decide(tests, c.requests, policy.min_samples)
    decision: Decision = "worse" if worse else "not_worse" if not_worse else "inconclusive"
    n_stable, n_canary = int(np.asarray(s.requests)), int(np.asarray(c.requests))
    return Verdict(decision, n_stable, n_canary, tuple(_metric_test(t) for t in tests))


def analyse(
    stable: ArmSamples | Sequence[ArmSamples],
    canary: ArmSamples | Sequence[ArmSamples],
    policy: AnalysisPolicy,
    pairs: PairCounts | None = None,
) -> Analysis:
    """Judge the canary against stable on the samples since the step began.

    Organic and synthetic samples are judged apart. The decision rests on organic traffic once the
    canary has served `min_samples` organic requests, before that on organic and synthetic
    together (sound when the gateway splits synthetic load by the same weights as organic).
    Mirrored pairs (`pairs`, when the step mirrors) are pooled over both sources: they replace
    the latency comparison of independent requests and add the quality test. The canary's
    mirrored copies count among its requests (evaluation/paired.py makes their arms).
    """
    stable_arms = [stable] if isinstance(stable, ArmSamples) else list(stable)
    canary_arms = [canary] if isinstance(canary, ArmSamples) else list(canary)
    if not any(a.requests for a in stable_arms):
        raise ValueError(
            "stable served no requests this step: there is nothing to compare the canary with"
        )

    def of(arms: list[ArmSamples], source: Source) -> list[ArmSamples]:
        return [a for a in arms if a.source == source]

    verdicts = {
        "organic": verdict(of(stable_arms, "organic"), of(canary_arms, "organic"), policy, pairs)
    }
    if any(a.requests for a in of(stable_arms + canary_arms, "synthetic")):
        verdicts["synthetic"] = verdict(
            of(stable_arms, "synthetic"), of(canary_arms, "synthetic"), policy, pairs
        )
        verdicts["organic+synthetic"] = verdict(stable_arms, canary_arms, policy, pairs)
    basis: Basis = (
        "organic"
        if "synthetic" not in verdicts or verdicts["organic"].n_canary >= policy.min_samples
        else "organic+synthetic"
    )
    chosen = verdicts[basis]
    counts = f"{chosen.n_canary} canary, {chosen.n_stable} stable requests"
    reasons = [f"decision from {basis} traffic: {counts}"]
    if chosen.decision == "inconclusive" and chosen.n_canary < policy.min_samples:
        reasons.append(f"fewer than {policy.min_samples} canary requests so far")
    # The failing tests first: they are why a canary is rolled back.
    reasons += [t.reason for t in sorted(chosen.tests, key=lambda t: t.decision != "worse")]
    return Analysis(chosen.decision, basis, verdicts, tuple(reasons))
