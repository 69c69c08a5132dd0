"""Upstream pass-through: one shared aiohttp session sends each attempt to its backend.

The session is made in `open` (lifespan), inside the event loop that serves the requests, and
closed in `close`. The answer is relayed by relay.py: whole for JSON, event by event for a stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from time import monotonic, perf_counter
from typing import TYPE_CHECKING

import aiohttp
from starlette.types import Receive, Send

from configs.gateway import BalanceSpec, QueueSpec, TimeoutsSpec
from serving.gateway.attempt import Attempt, AttemptFailed
from serving.gateway.queue import give_slot, take_now, take_slot
from serving.gateway.relay import FAILURES, OK, deadline_passed, relay_body, relay_stream
from serving.gateway.tracing import JSON

if TYPE_CHECKING:
    from serving.gateway.tracing import UpstreamSpan


class Upstream:
    def __init__(
        self,
        timeouts: TimeoutsSpec,
        queue: QueueSpec | None = None,
        balance: BalanceSpec | None = None,
    ) -> None:
        self._timeouts = timeouts
        self._queue = queue or QueueSpec()
        self._bound = (balance or BalanceSpec()).session_load_bound
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # Concurrency is bounded per backend by the gateway, so the pool itself is unbounded;
        # keep-alive connections are reused across requests (no per-request handshake).
        # A pooled connection is dropped after 4 s idle: vLLM's server closes its own after 5 s
        # (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), and a request sent on one it is closing fails at once
        # ("Server disconnected", a 502 measured once in ~200 requests at 2 rps).
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=4)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._timeouts.connect_s, sock_read=self._timeouts.read_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(
        self, attempt: Attempt, send: Send, receive: Receive, may_wait: bool = True
    ) -> None:
        """Send `attempt` to its backend and relay the answer, within the backend's concurrency:
        waiting for a slot in its queue (queue.py) where the gateway has one and `may_wait`;
        then to the replica the load points to at that moment (Backend.replica_for)."""
        backend, exchange = attempt.backend, attempt.exchange
        tier = exchange.tenant.tier
        if not take_now(backend, self._queue, tier):  # the common case needs no coroutine
            taking = take_slot(backend, exchange, self._queue, attempt.where, receive, may_wait)
            if exchange.trace is None:
                await taking
            else:  # tracing on (tracing.py)
                ahead = {"slipway.version": backend.version, "slipway.ahead": len(backend.waiting)}
                await exchange.trace.within("gateway.queue", taking, ahead)
        try:
            session, now = exchange.session, monotonic()
            replica = backend.replica_for(session, now, self._bound, attempt.besides)
            if replica is None:  # their circuits opened while it waited: nothing was sent
                raise AttemptFailed(
                    "upstream_unavailable", f"{attempt.where}: every replica's circuit is open"
                )
            attempt.bind(replica)
            replica.inflight += 1
            try:
                await self._timed(attempt, send, receive)
            finally:
                replica.inflight -= 1
        finally:
            give_slot(backend, self._queue, tier)

    async def _timed(self, attempt: Attempt, send: Send, receive: Receive) -> None:
        # Timed from the send: a mirrored copy is made before its original but sent after it,
        # once the event loop runs its task, and that wait is the gateway's, not the engine's.
        attempt.start = perf_counter()
        exchange = attempt.exchange
        if exchange.trace is None:
            sending = self._exchange(attempt, send, receive)
        else:  # tracing on: in a span whose context goes to the backend (tracing.py)
            sending = exchange.trace.upstream(attempt, self._exchange, send, receive)
        deadline = exchange.deadline
        if deadline is None:
            await sending
            return
        try:
            async with asyncio.timeout(deadline - attempt.start):
                await sending
        except TimeoutError:
            # Ours alone: a backend's own timeouts come out of the relay as AttemptFailed.
            # Leaving the block closed the backend's response, so vLLM stops the request;
            # the backend did nothing wrong, so its breaker and statistics hear nothing.
            await deadline_passed(attempt, send, deadline - attempt.exchange.started)

    async def _exchange(
        self,
        attempt: Attempt,
        send: Send,
        receive: Receive,
        headers: Mapping[str, str] = JSON,
        span: UpstreamSpan | None = None,
    ) -> None:
        """Send the attempt and relay its answer; `headers` and `span` come from its trace."""
        try:
            response = await self._session.post(attempt.url, data=attempt.payload, headers=headers)
        except FAILURES as e:
            raise attempt.failed(e) from e
        try:
            if attempt.exchange.stream and response.status == OK:
                relaying = relay_stream(attempt, response, send, receive)
            else:
                relaying = relay_body(attempt, response, send)
            await (relaying if span is None else span.relay(response.status, relaying))
        finally:
            response.release()
