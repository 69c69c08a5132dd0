"""Upstream pass-through: one shared aiohttp session, responses relayed as they arrive.

Streams are forwarded event by event as soon as a complete SSE event is in hand (the first one
is never held back for more). The usage event that the gateway itself asked for (stream_options.
include_usage) is read for token counts and dropped again when the client did not ask for it.
A failure before the first byte reaches the client raises AttemptFailed so the caller may retry
elsewhere; after that the stream ends with an OpenAI-shaped error event.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic, perf_counter

import aiohttp
from starlette.types import Receive, Send

from configs.gateway import TimeoutsSpec
from serving.gateway.codec import dumps, loads
from serving.gateway.errors import Unavailable
from serving.gateway.exchange import Exchange
from serving.gateway.routing import Backend
from serving.gateway.stats import BackendStats

log = logging.getLogger("serving.gateway")

_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_END = b"\n\n"
_USAGE = b'"usage"'
_NO_USAGE = b'"usage":null'  # OpenAI puts this in every chunk once usage is asked for


class AttemptFailed(Exception):
    """The backend failed before anything was sent to the client."""

    def __init__(
        self,
        kind: str,
        message: str,
        status: int | None = None,
        body: bytes | None = None,
        content_type: bytes = b"application/json",
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.body = body
        self.content_type = content_type


class Upstream:
    def __init__(self, timeouts: TimeoutsSpec) -> None:
        self._timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # Concurrency is bounded per backend by the gateway, so the pool itself is unbounded;
        # keep-alive connections are reused across requests (no per-request handshake).
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._timeouts.connect_s, sock_read=self._timeouts.read_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(
        self,
        exchange: Exchange,
        backend: Backend,
        url: str,
        payload: bytes,
        strip_usage: bool,
        send: Send,
        receive: Receive,
    ) -> None:
        """Relay one attempt on `backend` to the client, recording stats and breaker outcome."""
        if backend.inflight >= backend.max_concurrency:
            raise Unavailable(
                f"backend '{backend.version}' of model '{backend.model}' is at its concurrency limit "
                f"({backend.max_concurrency} requests in flight); retry shortly",
                retry_after=1,
            )
        backend.inflight += 1
        start = perf_counter()
        try:
            try:
                response = await self._session.post(url, data=payload, headers=_JSON_HEADERS)
            except (aiohttp.ClientError, TimeoutError) as e:
                raise self._failed(exchange, backend, start, e) from e
            try:
                if response.status >= 500:
                    body = await self._read(response, exchange, backend, start)
                    raise self._failed(
                        exchange, backend, start, None, response.status, body, _content_type(response)
                    )
                if exchange.stream and response.status == 200:
                    await self._relay_stream(exchange, backend, response, strip_usage, send, receive, start)
                else:
                    await self._relay_body(exchange, backend, response, send, start)
            finally:
                response.release()
        finally:
            backend.inflight -= 1

    def _failed(
        self,
        exchange: Exchange,
        backend: Backend,
        start: float,
        error: BaseException | None,
        status: int | None = None,
        body: bytes | None = None,
        content_type: bytes = b"application/json",
    ) -> AttemptFailed:
        backend.breaker.failure(monotonic())
        _stats(exchange, backend).observe(False, perf_counter() - start, None, None, 0, 0)
        where = f"backend '{backend.version}' of model '{backend.model}'"
        if status is not None:
            return AttemptFailed("upstream_error", f"{where} answered {status}", status, body, content_type)
        if isinstance(error, TimeoutError):
            return AttemptFailed("upstream_timeout", f"{where} timed out")
        return AttemptFailed("upstream_unavailable", f"{where} is unreachable: {error}")

    async def _read(
        self, response: aiohttp.ClientResponse, exchange: Exchange, backend: Backend, start: float
    ) -> bytes:
        try:
            return await response.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise self._failed(exchange, backend, start, e) from e

    async def _relay_body(
        self, exchange: Exchange, backend: Backend, response: aiohttp.ClientResponse, send: Send, start: float
    ) -> None:
        body = await self._read(response, exchange, backend, start)
        status = response.status
        if status == 200:
            usage = _usage_of(body)
            if usage:
                exchange.prompt_tokens = usage.get("prompt_tokens") or 0
                exchange.completion_tokens = usage.get("completion_tokens") or 0
        backend.breaker.success()
        _stats(exchange, backend).observe(
            True, perf_counter() - start, None, None, exchange.prompt_tokens, exchange.completion_tokens
        )
        exchange.status = status
        if status != 200:
            exchange.error_kind = f"upstream_{status}"
        headers = [
            (b"content-type", _content_type(response)),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", exchange.request_id.encode()),
            (b"x-slipway-backend", backend.label),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _relay_stream(
        self,
        exchange: Exchange,
        backend: Backend,
        response: aiohttp.ClientResponse,
        strip_usage: bool,
        send: Send,
        receive: Receive,
        start: float,
    ) -> None:
        content = response.content
        gone = asyncio.ensure_future(_disconnect(receive, response))
        first = last = 0.0
        events = 0
        tail = b""
        try:
            while True:
                piece = await content.readany()
                if not piece:
                    break
                if tail:
                    piece, tail = tail + piece, b""
                if not piece.endswith(_SSE_END):
                    # Hold only an incomplete event (useless to a client) until the rest arrives.
                    cut = piece.rfind(_SSE_END) + 2
                    if cut == 1:
                        tail = piece
                        continue
                    piece, tail = piece[:cut], piece[cut:]
                if _USAGE in piece and piece.count(_USAGE) != piece.count(_NO_USAGE):
                    piece = _take_usage(exchange, piece, strip_usage)
                    if not piece:
                        continue
                last = perf_counter()
                events += piece.count(_SSE_END)
                if not first:
                    first = last
                    exchange.ttft_s = first - exchange.started
                    exchange.status = 200
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-cache"),
                        (b"x-request-id", exchange.request_id.encode()),
                        (b"x-slipway-backend", backend.label),
                    ]})  # fmt: skip
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        except (aiohttp.ClientError, TimeoutError) as e:
            if _client_left(gone, exchange):
                return
            if not first:
                raise self._failed(exchange, backend, start, e) from e
            self._failed(exchange, backend, start, e)
            exchange.error_kind = "upstream_stream_broken"
            message = f"backend '{backend.version}' of model '{backend.model}' broke off the stream: {e}"
            error = {"error": {"message": message, "type": "server_error", "param": None,
                               "code": "upstream_stream_broken"}}  # fmt: skip
            await send({"type": "http.response.body", "body": b"data: " + dumps(error) + b"\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        finally:
            gone.cancel()
        if _client_left(gone, exchange):
            return
        if not first:
            raise self._failed(exchange, backend, start, aiohttp.ClientPayloadError("empty stream"))
        backend.breaker.success()
        # Events that arrived in one read carry no inter-token timing: unmeasured, not zero.
        itl = (last - first) / (events - 1) if events > 1 and last > first else None
        _stats(exchange, backend).observe(
            True, perf_counter() - start, first - start, itl,
            exchange.prompt_tokens, exchange.completion_tokens,
        )  # fmt: skip
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _stats(exchange: Exchange, backend: Backend) -> BackendStats:
    """Synthetic load is counted apart, so the rollout can judge organic traffic on its own."""
    return backend.synthetic_stats if exchange.tenant.synthetic else backend.stats


async def _disconnect(receive: Receive, response: aiohttp.ClientResponse) -> bool:
    """Stops reading upstream when the client goes away, so the backend can drop the request."""
    message = await receive()
    if message["type"] == "http.disconnect":
        response.close()
        return True
    return False


def _client_left(gone: asyncio.Future, exchange: Exchange) -> bool:
    if gone.done() and not gone.cancelled() and gone.result():
        exchange.status = exchange.status or 499
        exchange.error_kind = "client_disconnected"
        return True
    return False


def _content_type(response: aiohttp.ClientResponse) -> bytes:
    return response.headers.get("Content-Type", "application/json").encode()


def _usage_of(body: bytes) -> dict | None:
    if _USAGE not in body:
        return None
    try:
        usage = loads(body).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _take_usage(exchange: Exchange, piece: bytes, strip: bool) -> bytes:
    """Record token counts from the usage event(s) in `piece`; drop the usage-only event if asked."""
    kept = []
    for event in piece.split(_SSE_END)[:-1]:
        if _USAGE in event and event.startswith(b"data:"):
            try:
                data = loads(event[5:])
            except ValueError:
                data = None
            usage = data.get("usage") if isinstance(data, dict) else None
            if isinstance(usage, dict):
                exchange.prompt_tokens = usage.get("prompt_tokens") or 0
                exchange.completion_tokens = usage.get("completion_tokens") or 0
                if strip and not data.get("choices"):
                    continue
        kept.append(event + _SSE_END)
    return b"".join(kept)
