"""The record of one API request, filled in by the layers it passes through.

Usage creates it, auth names the tenant, the endpoint fills in model, backend, tokens and timings;
rate limiting, metrics and the usage log read it afterwards. One small slotted object per request.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from configs.gateway import Tenant


class Exchange:
    __slots__ = (
        "attempt",
        "backend",
        "cached_tokens",
        "completion_bound",
        "completion_tokens",
        "cost",
        "deadline",
        "endpoint",
        "error_kind",
        "failover",
        "latency_s",
        "model",
        "n",
        "prompt",
        "prompt_tokens",
        "request_id",
        "session",
        "started",
        "status",
        "stream",
        "tenant",
        "time",
        "tokens_from",
        "trace",
        "trace_id",
        "transcript",
        "ttft_s",
    )

    def __init__(self, endpoint: str, request_id: str) -> None:
        self.time = time.time()
        self.started = time.perf_counter()
        self.request_id = request_id
        self.endpoint = endpoint
        self.tenant: Tenant | None = None
        self.model: str | None = None
        # a routing.Backend (not imported: routing imports mirror, which imports this module)
        self.backend: Any = None
        self.stream = False
        self.status = 0
        self.error_kind: str | None = None
        self.failover = False  # served by a canary standing in for a stable that is down
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.n = 1  # choices per prompt: vLLM counts each prompt once per choice
        # max_tokens x choices: the most an aborted request may have made vLLM generate (None:
        # the request set no max_tokens)
        self.completion_bound: int | None = None
        self.cached_tokens: int | None = None  # prompt tokens from the prefix cache, if reported
        self.tokens_from: str | None = None  # None: the backend's counts; "content": see tokens.py
        self.ttft_s: float | None = None
        self.deadline: float | None = None  # perf_counter time its answer must be complete by
        self.cost = 1.0  # its token bound, for fair queuing (queue.py); set where it can wait
        self.latency_s = 0.0
        self.prompt: str | None = None
        self.session: str | None = None
        # the latest try, an attempt.Attempt (not imported: attempt.py imports this module)
        self.attempt: Any = None
        self.transcript: list[bytes] | None = None  # the answer as relayed, for a mirrored request
        # its spans, a tracing.RequestTrace, only while tracing is on; the id of a recorded trace
        self.trace: Any = None
        self.trace_id: str | None = None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
