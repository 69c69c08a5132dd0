"""Synthetic usage-log traffic (written with serving.gateway.usage.write_rows, the gateway's own
writer): the rows the drift benchmark times and the drift and cost tests (and their flows' tests)
check figures on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np

_WORDS = (
    "the",
    "model",
    "answers",
    "a",
    "short",
    "question",
    "about",
    "paris",
    "london",
    "rivers",
    "code",
    "tests",
    "data",
    "cats",
    "maps",
    "time",
    "money",
    "music",
    "history",
    "science",
)


@dataclass(frozen=True)
class Traffic:
    """A synthetic service: who calls it, how fast it answers, how often it fails."""

    tenants: tuple[str, ...] = ("acme", "globex", "initech")
    mix: tuple[float, ...] = (0.6, 0.3, 0.1)
    logs_prompts: tuple[str, ...] = ("acme",)
    latency_median_ms: float = 800.0
    ttft_median_ms: float = 150.0
    error_rate: float = 0.01
    stream_share: float = 0.5
    prompt_words: float = 12.0  # mean


def synthetic_rows(
    n: int,
    start: datetime,
    seconds: float,
    traffic: Traffic,
    seed: int,
    model: str = "smollm2-135m",
) -> list[tuple]:
    """n usage-log rows (serving.gateway.usage.COLUMNS order), uniform over
    [start, start + seconds)."""
    rng = np.random.default_rng(seed)
    t0 = start.timestamp()
    times = np.sort(t0 + rng.random(n) * seconds)
    tenant = rng.choice(np.array(traffic.tenants, dtype=object), n, p=traffic.mix)
    # A thousand distinct prompts, reused: enough for descriptors, cheap for a million rows.
    lengths = rng.poisson(traffic.prompt_words - 1, 1000) + 1
    prompts = np.array([" ".join(rng.choice(_WORDS, k)) + "?" for k in lengths], dtype=object)
    which = rng.integers(0, 1000, n)
    error = rng.random(n) < traffic.error_rate
    stream = rng.random(n) < traffic.stream_share
    latency = rng.lognormal(np.log(traffic.latency_median_ms), 0.5, n)
    ttft = np.where(stream, rng.lognormal(np.log(traffic.ttft_median_ms), 0.4, n), None)
    completion = np.where(error, 0, rng.poisson(120, n))
    logged = np.isin(tenant, traffic.logs_prompts)
    columns = (
        times.tolist(),
        [f"req-{seed}-{i}" for i in range(n)],
        tenant.tolist(),
        [model] * n,
        ["chat"] * n,
        ["1"] * n,
        ["stable"] * n,
        stream.tolist(),
        np.where(error, 500, 200).tolist(),
        np.where(error, "upstream_error", None).tolist(),
        (lengths[which] * 4 // 3 + 8).tolist(),
        completion.tolist(),
        ttft.tolist(),
        latency.tolist(),
        np.where(logged, prompts[which], None).tolist(),
        [None] * n,
        [1] * n,
        [None] * n,
    )
    return list(zip(*columns, strict=True))
