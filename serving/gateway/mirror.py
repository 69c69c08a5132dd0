"""Mirroring: a copy of a sample of requests goes to the other side, for analysis only.

The client gets the answer of the backend its request was routed to. A stable request is copied
to the canary and, at a live step, a canary request to stable, at the same moment; the copy is
read to its end by the gateway and kept beside the client's answer as a pair (timings, text,
tokens, outcome), so the rollout can judge the canary's answers and latency before any user
reaches it (the shadow phase, canary weight 0), and alongside them later. Both halves of a pair
start together and so share the machine's state: the ratio of their latencies cancels what they
have in common (the prompt, the load, the other engine's work), which independent requests
cannot. Copying both ways keeps the two engines' loads equal at every weight.

A copy is never billed and never counted against the tenant's limits, the live statistics or a
circuit breaker; its tokens count as shadow traffic (`shadow` in the admin statistics, role
"shadow" in Prometheus, source "shadow" in the usage log's unbilled_usage). Copies are capped at
`rate_rps` by a token bucket and skipped while the other side is at its concurrency limit (or
already answers `max_in_flight` copies), so mirroring never queues the client's answer behind a
copy, and an engine that falls behind sheds its copies before it queues.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.types import Message

from configs.gateway import MirrorSpec
from serving.gateway.attempt import Attempt, AttemptFailed
from serving.gateway.codec import dumps, loads
from serving.gateway.errors import GatewayError
from serving.gateway.exchange import Exchange
from serving.gateway.sse import EventFramer
from serving.gateway.usage import Row, unbilled_row

# routing.Backend, not imported: routing imports this module's neighbours (no import cycle)
Backend = Any

if TYPE_CHECKING:
    from serving.gateway.proxy import Upstream
    from serving.gateway.stats import BackendStats
    from serving.gateway.tokens import Asked

log = logging.getLogger("serving.gateway")

_DATA = b"data:"


class TokenBucket:
    """At most `rate` takes per second on average, bursts of at most `burst`."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.tokens = self.burst
        self.updated = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class Side:
    """One half of a pair: how one backend answered the request."""

    ok: bool
    status: int
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    itl_s: float | None
    e2e_s: float | None
    cached_tokens: int | None  # prompt tokens served from the prefix cache, where reported

    def describe(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "status": self.status,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": self.ttft_s,
            "itl_s": self.itl_s,
            "e2e_s": self.e2e_s,
            "cached_tokens": self.cached_tokens,
        }


def _response_text(response: dict[str, Any]) -> tuple[str, str | None]:
    """A Responses API answer's text (its output_text parts) and its end, as chat names it:
    "stop" once completed, "length" when cut at max_output_tokens."""
    parts = [
        part.get("text") or ""
        for item in response.get("output") or []
        if isinstance(item, dict) and item.get("type") == "message"
        for part in item.get("content") or []
        if isinstance(part, dict) and part.get("type") == "output_text"
    ]
    status = response.get("status")
    reason = (response.get("incomplete_details") or {}).get("reason")
    finish = (
        "stop" if status == "completed" else "length" if reason == "max_output_tokens" else None
    )
    return "".join(parts), finish


def _responses_answer(body: bytes, stream: bool) -> tuple[str, str | None]:
    """The Responses API's answer: a JSON response, or a stream whose text is its
    response.output_text.delta events and whose end its last response.* event carries."""
    if not stream:
        try:
            return _response_text(loads(body))
        except (ValueError, AttributeError, TypeError):
            return "", None
    framer = EventFramer()
    parts, finish = [], None
    for event in framer.split(framer.feed(body) + framer.flush()):
        data = next(
            (line[len(_DATA) :] for line in event.split(b"\n") if line.startswith(_DATA)), None
        )
        try:
            message = loads(data) if data is not None else {}
        except ValueError:
            continue
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "response.output_text.delta":
            parts.append(message.get("delta") or "")
        elif kind in ("response.completed", "response.incomplete"):
            finish = _response_text(message.get("response") or {})[1]
    return "".join(parts), finish


def answer_text(
    transcript: list[bytes], stream: bool, endpoint: str = "chat"
) -> tuple[str, str | None]:
    """The first choice's text and finish reason from an answer as it was relayed: a JSON body or
    the runs of a stream's events (chat `content` deltas or completion `text`; a Responses
    answer's output text)."""
    body = b"".join(transcript)
    if endpoint == "responses":
        return _responses_answer(body, stream)
    if not stream:
        try:
            choice = (loads(body).get("choices") or [{}])[0]
        except (ValueError, AttributeError, IndexError, TypeError):
            return "", None
        text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        return text, choice.get("finish_reason")
    framer = EventFramer()
    events = framer.split(framer.feed(body) + framer.flush())
    parts, finish = [], None
    for event in events:
        if not event.startswith(_DATA) or event[len(_DATA) :].strip() == b"[DONE]":
            continue
        try:
            choices = loads(event[len(_DATA) :]).get("choices") or []
        except (ValueError, AttributeError):
            continue
        for choice in choices:
            if choice.get("index", 0) != 0:
                continue
            parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
            finish = choice.get("finish_reason") or finish
    return "".join(parts), finish


def side_of(exchange: Exchange, attempt: Attempt | None, transcript: list[bytes]) -> Side:
    timings = attempt.timings if attempt is not None else None
    ok = exchange.status == 200 and timings is not None and exchange.error_kind is None
    text, finish = answer_text(transcript, exchange.stream, exchange.endpoint) if ok else ("", None)
    e2e, ttft, itl = timings or (None, None, None)
    return Side(
        ok=ok,
        status=exchange.status,
        text=text,
        finish_reason=finish,
        prompt_tokens=exchange.prompt_tokens,
        completion_tokens=exchange.completion_tokens,
        ttft_s=ttft,
        itl_s=itl,
        e2e_s=e2e,
        cached_tokens=exchange.cached_tokens if ok else None,
    )


class PairLog:
    """The pairs of one canary since the last statistics reset, at most `size` (the first kept)."""

    __slots__ = ("dropped", "pairs", "size", "skipped")

    def __init__(self, size: int) -> None:
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.pairs: list[dict[str, Any]] = []
        self.dropped = 0  # pairs over `size`
        self.skipped = 0  # stable's answer unusable (the client left, or it failed over)

    def add(self, pair: dict[str, Any]) -> None:
        if len(self.pairs) < self.size:
            self.pairs.append(pair)
        else:
            self.dropped += 1

    def snapshot(self, with_pairs: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "count": len(self.pairs),
            "dropped": self.dropped,
            "skipped": self.skipped,
        }
        if with_pairs:
            out["pairs"] = self.pairs[:]
        return out


class Mirroring:
    """A route's mirror: the canary it pairs with stable, and the bucket that caps the copies.

    Both ways: stable's requests are copied to the canary and the canary's own (a live step's)
    to stable, so at every weight both engines carry the same load and every copied request is
    a pair; a one-way copy would load the canary with its share and stable's as well.
    """

    __slots__ = ("bucket", "canary", "spec", "stable")

    def __init__(self, spec: MirrorSpec, canary: Backend, stable: tuple[Backend, ...]) -> None:
        self.spec = spec
        self.canary = canary
        self.stable = stable
        self.bucket = TokenBucket(spec.rate_rps)

    def wants(self, served_by: Backend, draw: float) -> Backend | None:
        """Where to copy this request, if anywhere: a `share` of requests, within the rate and
        while the other side has room (a copy never waits)."""
        if served_by is self.canary:
            target = next((b for b in self.stable if b.healthy), None)
        elif served_by.role == "stable":
            target = self.canary
        else:
            return None
        if (
            target is None
            or draw >= self.spec.share
            or not target.has_room()
            or target.copies >= (self.spec.max_in_flight or target.max_concurrency)
            or not self.bucket.take(time.monotonic())
        ):
            return None
        return target


class ShadowAttempt(Attempt):
    """The copy's try: timed and relayed like any attempt, recorded as shadow traffic only (the
    breaker and the live statistics never see it)."""

    __slots__ = ()

    @property
    def stats(self) -> BackendStats:
        return self.backend.shadow_stats

    def succeeded(self, ttft_s: float | None = None, itl_s: float | None = None) -> None:
        self._observe(ttft_s, itl_s)

    def record_failure(self) -> None:
        self.stats.observe_failure()


class Copy:
    """One copy in flight; `finish` pairs it with the answer the client got once both are
    done. The pairs are kept on the canary, whichever side the copy went to."""

    def __init__(
        self,
        upstream: Upstream,
        target: Backend,
        canary: Backend,
        original: Exchange,
        payload: bytes,
        request: dict[str, Any],
        asked: Asked,
    ) -> None:
        self.target = target
        self.canary = canary
        self.request = request
        self.exchange = Exchange(original.endpoint, original.request_id + "-shadow")
        self.exchange.tenant = original.tenant
        self.exchange.stream = original.stream
        self.exchange.model = original.model
        self.exchange.n, self.exchange.completion_bound = original.n, original.completion_bound
        self.transcript: list[bytes] = []
        self.attempt = ShadowAttempt(self.exchange, target, payload, asked)
        self.task = asyncio.ensure_future(self._run(upstream))

    async def _run(self, upstream: Upstream) -> None:
        async def keep(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                self.transcript.append(message["body"])

        try:
            await upstream.forward(self.attempt, keep, _never, may_wait=False)
        except AttemptFailed as failed:
            self.exchange.status = failed.status or 502
            self.exchange.error_kind = failed.kind
        except GatewayError as e:  # at its concurrency limit after all: no pair
            self.exchange.status = e.status
            self.exchange.error_kind = "skipped"

    def finish(
        self, original: Exchange, transcript: list[bytes], unbilled: Callable[[Row], None]
    ) -> None:
        """When the copy is done (the client's answer is): pair the two, and hand the copy's
        usage to `unbilled` as shadow traffic, which no tenant pays for."""

        def done(_: asyncio.Future) -> None:
            if self.exchange.error_kind != "skipped":  # never sent
                unbilled(unbilled_row(self.exchange, "shadow", self.target.version))
            self._pair(original, transcript)

        self.task.add_done_callback(done)

    def _pair(self, original: Exchange, transcript: list[bytes]) -> None:
        pairs = self.canary.pairs
        if self.exchange.error_kind == "skipped":
            return
        to_canary = self.target is self.canary
        served_by = original.backend
        answered = side_of(original, original.attempt, transcript)
        # The client's answer must come from the side it was meant to: a canary request that
        # failed over to stable has no canary half.
        meant = served_by is not None and (
            served_by.role == "stable" if to_canary else served_by is self.canary
        )
        if not answered.ok or not meant:
            pairs.skipped += 1  # nothing to compare the copy with
            return
        copied = side_of(self.exchange, self.attempt, self.transcript)
        stable_side, canary_side = (answered, copied) if to_canary else (copied, answered)
        stable_version = served_by.version if to_canary else self.target.version
        tenant = original.tenant
        pairs.add(
            {
                "id": original.request_id,
                "time": original.time,
                "source": "synthetic" if tenant is not None and tenant.synthetic else "organic",
                "session": original.session,
                "copied_to": "canary" if to_canary else "stable",
                "stable_version": stable_version,
                "request": self.request,
                "stable": stable_side.describe(),
                "canary": canary_side.describe(),
            }
        )


async def _never() -> Message:
    """A client that never leaves: the copy is read to its end."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def start_copy(
    upstream: Upstream,
    mirroring: Mirroring,
    target: Backend,
    exchange: Exchange,
    data: dict[str, Any],
    asked: Asked,
) -> Copy:
    """Send the copy to `target` now, beside the client's attempt, whose relay keeps its
    transcript for the pair."""
    payload = dumps({**data, "model": target.served_model})
    request = {k: v for k, v in data.items() if k not in ("model", "stream_options")}
    exchange.transcript = []
    copy = Copy(upstream, target, mirroring.canary, exchange, payload, request, asked)
    target.copies += 1  # on the backend, which outlives this route's Mirroring (a weight change)

    def done(_: asyncio.Future) -> None:
        target.copies -= 1

    copy.task.add_done_callback(done)
    return copy
