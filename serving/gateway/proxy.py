"""Upstream pass-through: one shared aiohttp session sends each attempt to its backend.

The session is made in `open` (lifespan), inside the event loop that serves the requests, and
closed in `close`. The answer is relayed by relay.py: whole for JSON, event by event for a stream.
"""

from __future__ import annotations

import asyncio
from time import monotonic, perf_counter

import aiohttp
from starlette.types import Receive, Send

from configs.gateway import BalanceSpec, QueueSpec, TimeoutsSpec
from serving.gateway.attempt import Attempt, AttemptFailed
from serving.gateway.queue import give_slot, take_slot
from serving.gateway.relay import FAILURES, OK, deadline_passed, relay_body, relay_stream

_JSON_HEADERS = {"Content-Type": "application/json"}


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
        backend = attempt.backend
        if backend.has_room():
            backend.inflight += 1  # the common case, without a coroutine for take_slot
        else:
            await take_slot(
                backend, attempt.exchange, self._queue, attempt.where, receive, may_wait
            )
        try:
            session, now = attempt.exchange.session, monotonic()
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
            give_slot(backend)

    async def _timed(self, attempt: Attempt, send: Send, receive: Receive) -> None:
        # Timed from the send: a mirrored copy is made before its original but sent after it,
        # once the event loop runs its task, and that wait is the gateway's, not the engine's.
        attempt.start = perf_counter()
        deadline = attempt.exchange.deadline
        if deadline is None:
            await self._exchange(attempt, send, receive)
            return
        try:
            async with asyncio.timeout(deadline - attempt.start):
                await self._exchange(attempt, send, receive)
        except TimeoutError:
            # Ours alone: a backend's own timeouts come out of the relay as AttemptFailed.
            # Leaving the block closed the backend's response, so vLLM stops the request;
            # the backend did nothing wrong, so its breaker and statistics hear nothing.
            await deadline_passed(attempt, send, deadline - attempt.exchange.started)

    async def _exchange(self, attempt: Attempt, send: Send, receive: Receive) -> None:
        try:
            response = await self._session.post(
                attempt.url, data=attempt.payload, headers=_JSON_HEADERS
            )
        except FAILURES as e:
            raise attempt.failed(e) from e
        try:
            if attempt.exchange.stream and response.status == OK:
                await relay_stream(attempt, response, send, receive)
            else:
                await relay_body(attempt, response, send)
        finally:
            response.release()
