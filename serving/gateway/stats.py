"""Per-backend live statistics: what the rollout flow reads to judge a canary.

Two views of the same observations:
- a window since the last reset (or weight change): counts plus a bounded uniform sample of raw
  TTFT / inter-token / end-to-end latencies (reservoir sampling), for the flow's statistical tests;
- lifetime totals with fixed histogram buckets, never reset, for Prometheus (counters must only
  grow; Prometheus and Grafana do the rate and quantile maths).
"""

from __future__ import annotations

import math
import random
import time
from bisect import bisect_left
from typing import Any

from configs.gateway import LATENCY_BUCKETS


class Reservoir:
    """A uniform random sample of at most `size` values out of all values seen (Algorithm R)."""

    __slots__ = ("_rand", "seen", "size", "total", "values")

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: list[float] = []
        self.seen = 0
        self.total = 0.0
        self._rand = random.Random()

    def add(self, value: float) -> None:
        self.seen += 1
        self.total += value
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            slot = self._rand.randrange(self.seen)
            if slot < self.size:
                self.values[slot] = value

    def summary(self, with_samples: bool) -> dict[str, Any]:
        return summary(self.values, self.seen, self.total, with_samples)


def summary(values: list[float], seen: int, total: float, with_samples: bool) -> dict[str, Any]:
    """A sample of `seen` values summing to `total`, as /admin/stats shows it."""
    ordered = sorted(values)
    out: dict[str, Any] = {
        "count": seen,
        "mean": total / seen if seen else None,
        "p50": _quantile(ordered, 0.50),
        "p90": _quantile(ordered, 0.90),
        "p99": _quantile(ordered, 0.99),
    }
    if with_samples:
        out["samples"] = values[:]
    return out


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Histogram:
    """Cumulative bucket counts (Prometheus semantics are applied by the exporter)."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value
        self.count += 1


class BackendStats:
    """Observations of one backend: `observe` or `observe_failure` once per attempt (hot path)."""

    __slots__ = (
        "completion_tokens",
        "e2e",
        "errors",
        "hist_e2e",
        "hist_itl",
        "hist_ttft",
        "itl",
        "prompt_tokens",
        "requests",
        "samples",
        "since",
        "total_completion_tokens",
        "total_errors",
        "total_prompt_tokens",
        "total_requests",
        "ttft",
    )

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self.total_requests = 0
        self.total_errors = 0
        self.total_prompt_tokens = 0
        self.total_completion_tokens = 0
        self.hist_ttft = Histogram()
        self.hist_itl = Histogram()
        self.hist_e2e = Histogram()
        self.reset()

    def reset(self) -> None:
        self.since = time.time()
        self.requests = 0
        self.errors = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Reservoir(self.samples)
        self.itl = Reservoir(self.samples)
        self.e2e = Reservoir(self.samples)

    def observe(
        self,
        e2e_s: float,
        ttft_s: float | None,
        itl_s: float | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """One attempt that succeeded; timings a plain JSON answer lacks are None."""
        self.requests += 1
        self.total_requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.total_prompt_tokens += prompt_tokens
        self.total_completion_tokens += completion_tokens
        self.e2e.add(e2e_s)
        self.hist_e2e.observe(e2e_s)
        if ttft_s is not None:
            self.ttft.add(ttft_s)
            self.hist_ttft.observe(ttft_s)
        if itl_s is not None:
            self.itl.add(itl_s)
            self.hist_itl.observe(itl_s)

    def observe_failure(self) -> None:
        """One attempt that failed: an error, with no latency (it would flatter the backend)."""
        self.requests += 1
        self.total_requests += 1
        self.errors += 1
        self.total_errors += 1

    def snapshot(self, with_samples: bool = False) -> dict[str, Any]:
        return {
            "since": self.since,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": self.ttft.summary(with_samples),
            "itl_s": self.itl.summary(with_samples),
            "e2e_s": self.e2e.summary(with_samples),
        }
