"""One try of a request on one backend: what is sent where, and where its outcome goes.

An attempt that reaches its backend ends in one outcome: success (its replica's breaker closes,
the version's statistics get its timings and tokens) or failure (the breaker counts it, the
statistics count an error); a client that leaves first leaves no outcome. A failure before
anything reached the client is raised as AttemptFailed, so the caller may retry elsewhere or
answer it.
"""

from __future__ import annotations

from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any

from serving.gateway.endpoints import UTILITY

# routing.Backend and Replica, not imported: routing imports this module's neighbours (no cycle)
Backend = Any
Replica = Any

if TYPE_CHECKING:
    from serving.gateway.exchange import Exchange
    from serving.gateway.stats import BackendStats
    from serving.gateway.tokens import Asked

_JSON = b"application/json"


class AttemptFailed(Exception):
    """The backend failed before anything was sent to the client."""

    def __init__(
        self,
        kind: str,
        message: str,
        status: int | None = None,
        body: bytes | None = None,
        content_type: bytes = _JSON,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.body = body
        self.content_type = content_type


class Attempt:
    """One try on one version; `start` (perf_counter) is when it was sent, for its latencies. Its
    replica is chosen once it has a slot (`bind`): balancing needs the load at that moment."""

    __slots__ = (
        "asked",
        "backend",
        "besides",
        "exchange",
        "payload",
        "replica",
        "start",
        "timings",
        "url",
    )

    def __init__(
        self,
        exchange: Exchange,
        backend: Backend,
        payload: bytes,
        asked: Asked,
        besides: Replica | None = None,
    ) -> None:
        self.exchange = exchange
        self.backend = backend
        self.besides = besides  # a replica not to use: the one the request's first try failed on
        self.replica: Replica | None = None
        self.url = ""
        self.payload = payload
        self.asked = asked  # the usage the client asked of a stream (the gateway asks for all)
        self.start = perf_counter()
        self.timings: tuple[float, float | None, float | None] | None = None  # e2e, ttft, itl

    def bind(self, replica: Replica) -> None:
        self.replica = replica
        self.url = replica.urls[self.exchange.endpoint]

    @property
    def stats(self) -> BackendStats | None:
        """Synthetic load is counted apart, so the rollout can judge organic traffic on its own;
        a canary's failover traffic too, since it is no evidence about the canary. Tokenize and
        detokenize are in no statistics (endpoints.py): only the breaker hears of them."""
        backend, exchange = self.backend, self.exchange
        if exchange.endpoint in UTILITY:
            return None
        if exchange.failover:
            return backend.failover_stats
        return backend.synthetic_stats if exchange.tenant.synthetic else backend.stats

    def succeeded(self, ttft_s: float | None = None, itl_s: float | None = None) -> None:
        self.replica.breaker.success()
        self._observe(ttft_s, itl_s)

    def _observe(self, ttft_s: float | None, itl_s: float | None) -> None:
        exchange = self.exchange
        e2e_s = perf_counter() - self.start
        self.timings = (e2e_s, ttft_s, itl_s)
        if (stats := self.stats) is not None:
            stats.observe(e2e_s, ttft_s, itl_s, exchange.prompt_tokens, exchange.completion_tokens)

    def record_failure(self) -> None:
        self.replica.breaker.failure(monotonic())
        if (stats := self.stats) is not None:
            stats.observe_failure()

    def failed(self, error: BaseException) -> AttemptFailed:
        """Record a failure to get an answer at all (unreachable, timed out, broken off)."""
        self.record_failure()
        if isinstance(error, TimeoutError):
            return AttemptFailed("upstream_timeout", f"{self.where} timed out")
        return AttemptFailed("upstream_unavailable", f"{self.where} is unreachable: {error}")

    def failed_answer(self, status: int, body: bytes, content_type: bytes) -> AttemptFailed:
        """Record a server error answer (5xx); the caller may pass it on to the client as it is."""
        self.record_failure()
        message = f"{self.where} answered {status}"
        return AttemptFailed("upstream_error", message, status, body, content_type)

    @property
    def where(self) -> str:
        """The backend (and the replica, where it has several), as error messages name it."""
        backend = self.backend
        at = f" at {self.replica.url}" if self.replica and len(backend.replicas) > 1 else ""
        return f"backend '{backend.version}' of model '{backend.model}'{at}"
