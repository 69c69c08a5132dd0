"""Several instances' statistics of one route as one (peers.py gathers them): what the rollout
judges when traffic is spread over gateway instances.

Only instances in the same window are added up: the same route record (`revision`), since each
starts a new window when it applies a route change, a poll apart. Counts and tokens add up; the
latency samples become one uniform sample of at most `size` values, each instance's drawn in
proportion to the values it saw, and the quantiles are computed again from it; mirrored pairs are
put together. Requests in flight and waiting add up, and a backend's circuit is the most open any
instance reports; its replicas are shown as the instance asked sees them (its own balancing).
"""

from __future__ import annotations

import random
from typing import Any

from serving.gateway.peers import Answer
from serving.gateway.stats import summary

_LATENCIES = ("ttft_s", "itl_s", "e2e_s")
_WINDOWS = ("failover", "synthetic", "shadow")  # beside the organic one, at the backend's top
_OPENNESS = ("closed", "half-open", "open")


def merge(
    mine: dict[str, Any], answers: list[Answer], size: int, with_samples: bool
) -> dict[str, Any]:
    """`mine` (this instance's statistics, with samples) and the peers' as one, plus
    `instances`: each one's id, window, organic requests, and whether it was added."""

    def added(answer: Answer) -> bool:
        return answer.body is not None and answer.body["revision"] == mine["revision"]

    parts = [mine, *(a.body for a in answers if added(a))]
    by_version = [{b["version"]: b for b in p["backends"]} for p in parts]
    rand = random.Random()
    backends = [
        _backend(
            [v for versions in by_version if (v := versions.get(b["version"]))],
            size,
            with_samples,
            rand,
        )
        for b in mine["backends"]
    ]
    instances = [_instance(mine["instance"], mine, True, None)] + [
        _instance(a.peer.id, a.body, added(a), a.error) for a in answers
    ]
    out = {k: v for k, v in mine.items() if k != "instance"}
    return out | {"backends": backends, "instances": instances}


def _instance(
    id_: str, body: dict[str, Any] | None, added: bool, error: str | None
) -> dict[str, Any]:
    return {
        "id": id_,
        "revision": body["revision"] if body else None,
        "requests": sum(b["requests"] for b in body["backends"]) if body else None,
        "added": added,
        "error": error,
    }


def _backend(
    parts: list[dict[str, Any]], size: int, with_samples: bool, rand: random.Random
) -> dict[str, Any]:
    return {
        **parts[0],
        "inflight": sum(p["inflight"] for p in parts),
        "waiting": sum(p["waiting"] for p in parts),
        "circuit": max((p["circuit"] for p in parts), key=_OPENNESS.index),
        **_window(parts, size, with_samples, rand),
        **{w: _window([p[w] for p in parts], size, with_samples, rand) for w in _WINDOWS},
        "pairs": _pairs([p["pairs"] for p in parts], with_samples),
    }


def _window(
    parts: list[dict[str, Any]], size: int, with_samples: bool, rand: random.Random
) -> dict[str, Any]:
    """BackendStats.snapshot of several instances."""
    requests = sum(p["requests"] for p in parts)
    errors = sum(p["errors"] for p in parts)
    return {
        "since": min(p["since"] for p in parts),
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else None,
        "prompt_tokens": sum(p["prompt_tokens"] for p in parts),
        "completion_tokens": sum(p["completion_tokens"] for p in parts),
        **{k: _sample([p[k] for p in parts], size, with_samples, rand) for k in _LATENCIES},
    }


def _sample(
    parts: list[dict[str, Any]], size: int, with_samples: bool, rand: random.Random
) -> dict[str, Any]:
    """Reservoir summaries as one. All their values when they fit (a full reservoir then has
    nothing beside it); else from each a share of `size` in proportion to the values it saw."""
    seen = sum(p["count"] for p in parts)
    total = sum(p["mean"] * p["count"] for p in parts if p["count"])
    samples = [p["samples"] for p in parts]
    if sum(map(len, samples)) <= size:
        values = [v for s in samples for v in s]
    else:
        values = [
            v
            for p, s in zip(parts, samples, strict=True)
            for v in rand.sample(s, min(len(s), round(size * p["count"] / seen)))
        ]
    return summary(values, seen, total, with_samples)


def _pairs(parts: list[dict[str, Any]], with_pairs: bool) -> dict[str, Any]:
    """PairLog.snapshot of several instances."""
    out = {k: sum(p[k] for p in parts) for k in ("count", "dropped", "skipped")}
    if with_pairs:
        out["pairs"] = [pair for p in parts for pair in p["pairs"]]
    return out
