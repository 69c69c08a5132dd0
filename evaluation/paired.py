"""Mirrored pairs (the gateway's copies of stable's requests, beside stable's answers) into what
the canary analysis reads: the canary's copies as arms of its own (errors, latency for its SLOs)
and the counts of the paired latency and quality tests (evaluation/canary.py).

A pair is one request answered by both at the same moment. Pairs that carry a session key are
thinned to each session's first, so the pairs tested are independent of one another; latency is
compared only on pairs whose two sides served the same number of prompt tokens from the prefix
cache, where the engines report them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from configs.rollout import AnalysisPolicy
from evaluation.canary import (
    LATENCY_METRICS,
    ArmSamples,
    LogMoments,
    Metric,
    PairCounts,
    Source,
    inside_clip,
    paired_scores,
)
from evaluation.quality.agreement import Agreement, score

# The gateway's name of each measure (inter-token latency stands for TPOT).
_FIELD: dict[Metric, str] = {"ttft": "ttft_s", "tpot": "itl_s", "e2e": "e2e_s"}


def independent(pairs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each session's first pair, and every pair without a session."""
    seen: set[str] = set()
    out = []
    for pair in pairs:
        session = pair.get("session")
        if session is not None:
            if session in seen:
                continue
            seen.add(session)
        out.append(pair)
    return out


def mirrored_arms(pairs: Sequence[dict[str, Any]]) -> list[ArmSamples]:
    """The canary's copies, by the source of the request copied, as arms of the canary (a pair
    copied to stable holds a live canary answer, counted in the canary's live arms already)."""
    arms = []
    copies = [p for p in pairs if _copied_to(p) == "canary"]
    for source in ("organic", "synthetic"):
        sides = [p["canary"] for p in copies if p["source"] == source]
        if not sides:
            continue
        ok = [s for s in sides if s["ok"]]

        def measured(field: str, ok: list[dict[str, Any]] = ok) -> list[float]:
            return [s[field] for s in ok if s[field] is not None and s[field] > 0]

        arms.append(
            ArmSamples(
                requests=len(sides),
                errors=len(sides) - len(ok),
                ttft_s=np.asarray(measured("ttft_s")),
                tpot_s=np.asarray(measured("itl_s")),
                e2e_s=np.asarray(measured("e2e_s")),
                source=_source(source),
            )
        )
    return arms


def _source(name: str) -> Source:
    return "synthetic" if name == "synthetic" else "organic"


# The least share of a step's pairs each direction of copying must carry for latency to be
# estimated balanced over the two (evaluation/canary.py): the balanced estimate needs
# (1/4)(1/s + 1/(1-s)) as many pairs as the pooled one, 1.33x at a 25% step, 5.3x at 5%.
BALANCED_SHARE = 0.2


def balanced_at(weight: float) -> bool:
    """Whether a step at `weight` percent on the canary (mirroring both ways) estimates latency
    balanced over the two directions: where each carries at least BALANCED_SHARE of the pairs.
    Below, the pairs are pooled: the copy's lag then counts at most (1 - 2 s) of itself."""
    return BALANCED_SHARE * 100 <= weight <= (1 - BALANCED_SHARE) * 100


def pair_counts(
    pairs: Sequence[dict[str, Any]], policy: AnalysisPolicy, balanced: bool = False
) -> PairCounts:
    """The paired tests' counts over the independent pairs; a pair whose canary failed counts
    among the errors, not here. `balanced`: latency is estimated over the two directions of
    copying apart (`balanced_at` the step's weight), else over all pairs pooled."""
    kept = independent(pairs)
    both = [p for p in kept if p["canary"]["ok"] and p["stable"]["ok"]]
    # Latency is compared within a prefix-cache stratum: a pair where one engine served the
    # prompt from its cache and the other did not compares caches, not models.
    alike = [p for p in both if _same_cache_state(p)]
    answers = [_score(p, policy) for p in judged(both, policy)]
    forward = [p for p in alike if not balanced or _copied_to(p) == "canary"]
    reverse = [p for p in alike if _copied_to(p) == "stable"] if balanced else []
    clip = policy.paired_clip
    margins = {
        m: margin for m in LATENCY_METRICS if (margin := getattr(policy.margins, m)) is not None
    }
    ahead = {m: _scores(forward, m, margin, clip) for m, margin in margins.items()}
    back = {m: _scores(reverse, m, margin, clip) for m, margin in margins.items()}
    return PairCounts(
        n=len(both),
        scores={m: LogMoments.of_logs(s) for m, s in ahead.items()},
        inside={
            m: int(inside_clip(ahead[m], clip).sum() + inside_clip(back[m], clip).sum())
            for m in margins
        },
        canary_failed=sum(not p["canary"]["ok"] for p in kept),
        scored=len(answers),
        degraded=sum(a.degraded for a in answers),
        reverse={m: LogMoments.of_logs(s) for m, s in back.items()} if balanced else None,
    )


def _copied_to(pair: dict[str, Any]) -> str:
    return pair.get("copied_to", "canary")


def _scores(
    pairs: Sequence[dict[str, Any]], metric: Metric, margin: float, clip: float | None
) -> np.ndarray:
    """The scores (evaluation/canary.py) of the pairs timed on both sides."""
    logs = [r for p in pairs if (r := _log_ratio(p, metric)) is not None]
    return paired_scores(np.asarray(logs, np.float64), margin, clip)


def judged(pairs: Sequence[dict[str, Any]], policy: AnalysisPolicy) -> list[dict[str, Any]]:
    """The pairs whose answers can be judged now: with log-probabilities asked for, those the
    scorer has seen (its drop, or None where the engines give none and the text decides)."""
    if not policy.quality.logprob:
        return list(pairs)
    return [p for p in pairs if "logprob_drop" in p]


def _score(pair: dict[str, Any], policy: AnalysisPolicy) -> Agreement:
    drop = pair.get("logprob_drop") if policy.quality.logprob else None
    return score(pair["request"], pair["stable"], pair["canary"], policy.quality, drop)


def _same_cache_state(pair: dict[str, Any]) -> bool:
    """Both sides served as many prompt tokens from the prefix cache (vLLM counts whole blocks:
    128 tokens on CPU), so both computed the same prefill; unknown (not reported) counts as
    alike. Measured on CPU vLLM, a prompt of 128 tokens or more answered from the cache had a
    TTFT 2.4x shorter: a partial hit against a fuller one compares caches, not models."""
    stable, canary = pair["stable"].get("cached_tokens"), pair["canary"].get("cached_tokens")
    if stable is None or canary is None:
        return True
    return stable == canary


def _log_ratio(pair: dict[str, Any], metric: Metric) -> float | None:
    field = _FIELD[metric]
    stable, canary = pair["stable"][field], pair["canary"][field]
    if not stable or not canary or stable <= 0 or canary <= 0:
        return None
    return math.log(canary / stable)


def pair_table(pairs: Sequence[dict[str, Any]], policy: AnalysisPolicy) -> list[dict[str, Any]]:
    """Each independent pair both halves answered, with its scores: the quality evidence a
    person reads in the rollout's story."""
    rows = []
    for p in judged(independent(pairs), policy):
        stable, canary = p["stable"], p["canary"]
        if not (stable["ok"] and canary["ok"]):
            continue
        agreement = _score(p, policy)
        ratios = {m: _log_ratio(p, m) for m in LATENCY_METRICS}
        rows.append(
            {
                "source": p["source"],
                # which side was the copy: the other answered a client
                "copied_to": _copied_to(p),
                "stable": stable["text"],
                "canary": canary["text"],
                "exact": agreement.exact,
                "token_agreement": round(agreement.tokens, 3),
                "length_ratio": round(agreement.length_ratio, 3),
                "refusal": agreement.refusal,
                "format_ok": agreement.format_ok,
                "degraded": agreement.degraded,
                "logprob_drop": p.get("logprob_drop"),
                **{
                    f"{m}_ratio": None if r is None else round(math.exp(r), 3)
                    for m, r in ratios.items()
                },
            }
        )
    return rows


def latency_table(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every independent pair both halves answered, as timed: each side's TTFT, inter-token and
    end-to-end latency (ms) and the prompt tokens it served from its prefix cache, and whether
    the latency tests compared it. The record a person (or a simulation) checks the latency
    verdict against; the answers are in pair_table, for the pairs judged."""
    rows = []
    for p in independent(pairs):
        stable, canary = p["stable"], p["canary"]
        if not (stable["ok"] and canary["ok"]):
            continue
        rows.append(
            {
                "time": p.get("time"),
                "copied_to": _copied_to(p),
                "compared": _same_cache_state(p),
                **{
                    f"{side}_{m}_ms": None if half[f] is None else round(half[f] * 1e3, 2)
                    for side, half in (("stable", stable), ("canary", canary))
                    for m, f in _FIELD.items()
                },
                "stable_cached_tokens": stable.get("cached_tokens"),
                "canary_cached_tokens": canary.get("cached_tokens"),
            }
        )
    return rows


def quality_summary(rows: Sequence[dict[str, Any]]) -> str:
    """One line on a step's mirrored answers."""
    if not rows:
        return "no mirrored pair answered on both sides"
    n = len(rows)
    exact = sum(r["exact"] for r in rows)
    degraded = sum(r["degraded"] for r in rows)
    agreement = float(np.median([r["token_agreement"] for r in rows]))
    return (
        f"{n} mirrored pairs: {exact / n:.0%} identical answers, median token agreement "
        f"{agreement:.2f}, {degraded} degraded ({degraded / n:.0%})"
    )
