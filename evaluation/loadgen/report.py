"""What a load run measured: the report types, the timings of one streamed request, the summary
of a level, and the prompts. Pure: no HTTP client here, so the release gates and the regression
check can read a report without importing one.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from configs.evaluation import LoadProfile
from configs.loader import Strict


class Prompt(Strict):
    id: str
    prompt: str
    max_tokens: int


class RequestRecord(Strict):
    """One measured request; times in seconds, `start` relative to the level's start."""

    prompt_id: str
    start: float
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = Field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    tokens_from_usage: bool = False
    error: str | None = None
    text: str = Field(default="", exclude=True)  # the first choice's answer, not in reports

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


class Percentiles(Strict):
    """Milliseconds; None when there was nothing to measure (e.g. TPOT of one-token answers)."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values_s: Sequence[float]) -> Percentiles:
        if not values_s:
            return cls(mean=None, p50=None, p90=None, p99=None)
        ms = sorted(v * 1000 for v in values_s)
        return cls(
            mean=sum(ms) / len(ms),
            p50=percentile(ms, 50),
            p90=percentile(ms, 90),
            p99=percentile(ms, 99),
        )


class LevelSummary(Strict):
    label: str
    concurrency: int | None
    rate: float | None
    completed: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_output_tokens: int
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    itl_ms: Percentiles
    e2e_ms: Percentiles
    slo_ttft_ms: float
    slo_tpot_ms: float
    goodput_share: float
    goodput_per_s: float
    token_source: Literal["usage", "chunks", "mixed", "none"]
    errors: list[str]


class LoadReport(Strict):
    base_url: str
    model: str
    endpoint: str
    profile: LoadProfile
    levels: list[LevelSummary]

    def level(self, concurrency: int) -> LevelSummary | None:
        """The level at `concurrency`; a Poisson run has one level and answers for any."""
        if len(self.levels) == 1 and self.levels[0].concurrency is None:
            return self.levels[0]
        return next((x for x in self.levels if x.concurrency == concurrency), None)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def load_prompts(
    path: Path, *, max_tokens: int | None = None, max_chars: int | None = None
) -> list[Prompt]:
    """Prompts from JSONL lines {"id"?, "prompt", "output_tokens"} (vllm bench's custom format)."""
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = Prompt(
                id=str(row.get("id", n)), prompt=row["prompt"], max_tokens=int(row["output_tokens"])
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}:{n}: need a JSON object with prompt and output_tokens ({e})"
            ) from e
        if max_chars is None or len(prompt.prompt) <= max_chars:
            cap = min(prompt.max_tokens, max_tokens or prompt.max_tokens)
            prompts.append(prompt.model_copy(update={"max_tokens": cap}))
    if not prompts:
        raise ValueError(f"{path}: no prompts (max_chars={max_chars})")
    return prompts


def pick_prompts(prompts: Sequence[Prompt], n: int, seed: int) -> list[Prompt]:
    """n prompts in a seeded random order (cycling when n exceeds the set): the file is sorted
    by length, so taking its head would measure only the short ones."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def generated(data: dict[str, Any]) -> bool:
    """Whether one streamed message carries generated output (not the chat role announcement
    or the final usage-only message)."""
    choices = data.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    if "delta" in choice:
        delta = choice["delta"] or {}
        return any(delta.get(k) for k in ("content", "reasoning_content", "reasoning"))
    return choice.get("text") is not None


def record_from_stream(
    prompt_id: str, start: float, sent: float, messages: Sequence[tuple[float, dict[str, Any]]]
) -> RequestRecord:
    """Timings of one request from its streamed messages, each with its arrival time (seconds,
    same clock as `sent`, the moment the request went out). `start` is `sent` relative to the
    level's start."""
    times = [t for t, data in messages if generated(data)]
    usage = next((d["usage"] for _, d in reversed(messages) if d.get("usage")), None)
    if not times:
        return RequestRecord(
            prompt_id=prompt_id, start=start, error="no generated output in the stream"
        )
    tokens = usage.get("completion_tokens") if usage else None
    return RequestRecord(
        prompt_id=prompt_id,
        start=start,
        ttft=times[0] - sent,
        latency=times[-1] - sent,
        itl=[b - a for a, b in itertools.pairwise(times)],
        output_tokens=tokens if tokens is not None else len(times),
        prompt_tokens=usage.get("prompt_tokens") if usage else None,
        tokens_from_usage=tokens is not None,
        text="".join(_text(data) for _, data in messages if generated(data)),
    )


def _text(data: dict[str, Any]) -> str:
    choice = data["choices"][0]
    return ((choice.get("delta") or {}).get("content") or "") or (choice.get("text") or "")


def summarise(
    records: Sequence[RequestRecord],
    *,
    label: str,
    slo_ttft_ms: float,
    slo_tpot_ms: float,
    concurrency: int | None = None,
    rate: float | None = None,
) -> LevelSummary:
    """One level's figures. Duration runs from the first request sent to the last one finished;
    a request is good when its TTFT and TPOT both meet the SLOs (a one-token answer has no TPOT)."""
    ok = [r for r in records if r.ok]
    ends = [r.start + (r.latency or 0.0) for r in ok]
    duration = max(ends) - min(r.start for r in records) if ok else 0.0
    tokens = sum(r.output_tokens for r in ok)
    good = [
        r
        for r in ok
        if r.ttft is not None
        and r.ttft * 1000 <= slo_ttft_ms
        and (r.tpot is None or r.tpot * 1000 <= slo_tpot_ms)
    ]
    from_usage = sum(r.tokens_from_usage for r in ok)
    source = (
        "none"
        if not ok
        else "usage"
        if from_usage == len(ok)
        else "chunks"
        if not from_usage
        else "mixed"
    )

    def per_s(count: int) -> float:
        return count / duration if duration > 0 else 0.0

    return LevelSummary(
        label=label,
        concurrency=concurrency,
        rate=rate,
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration,
        requests_per_s=per_s(len(ok)),
        output_tokens_per_s=per_s(tokens),
        total_output_tokens=tokens,
        ttft_ms=Percentiles.of([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=Percentiles.of([r.tpot for r in ok if r.tpot is not None]),
        itl_ms=Percentiles.of([x for r in ok for x in r.itl]),
        e2e_ms=Percentiles.of([r.latency for r in ok if r.latency is not None]),
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
        goodput_share=len(good) / len(records) if records else 0.0,
        goodput_per_s=per_s(len(good)),
        token_source=source,
        errors=sorted({r.error for r in records if r.error})[:5],
    )


def level_label(profile: LoadProfile, concurrency: int | None) -> str:
    if profile.mode == "synchronous":
        return "synchronous"
    if concurrency is not None:
        return f"concurrency {concurrency}"
    return f"poisson {profile.rate:g} req/s"


def summarise_level(
    records: Sequence[RequestRecord], profile: LoadProfile, concurrency: int | None
) -> LevelSummary:
    return summarise(
        records,
        label=level_label(profile, concurrency),
        slo_ttft_ms=profile.slo_ttft_ms,
        slo_tpot_ms=profile.slo_tpot_ms,
        concurrency=concurrency,
        rate=profile.rate,
    )


def levels_of(profile: LoadProfile) -> list[int | None]:
    """Concurrency per level; None is the single open-loop (Poisson) level."""
    if profile.mode == "synchronous":
        return [1]
    if profile.mode == "sweep":
        return list(profile.concurrency)
    return [None]
