"""Relaying a backend's answer to the client, and recording how the attempt went.

A JSON answer is read whole, its token counts noted, and sent on. A stream is relayed as it
arrives: EventFramer (sse.py) cuts the backend's reads into whole events (an event left without
its blank line at the end of the body is completed and sent), UsageFilter (tokens.py) reads the
running token counts and cuts out the usage only the gateway asked for, and relay_stream sends
each run of events on as soon as it is in hand, measuring time to first event and the interval
between events. A stream that fails before its first event raises AttemptFailed (the caller may
retry elsewhere); after that it ends with an OpenAI-shaped error event. A client that goes away
closes the backend's response, so the backend can drop the request; the exchange keeps the tokens
generated until then, so they are charged. A stream whose backend sent no token counts is counted
from its content (tokens.py), and its usage row says so (tokens_from "content"). A Responses API
stream reports its counts only in its last event, and is read by ResponsesUsage instead.

Both take the backend's answer as a Reply: aiohttp's ClientResponse, or a fake in unit tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Protocol

import aiohttp
from starlette.types import Message, Receive, Send

from serving.gateway.attempt import Attempt
from serving.gateway.codec import dumps
from serving.gateway.errors import UpstreamError
from serving.gateway.sse import EventFramer, data_event
from serving.gateway.tokens import ResponsesUsage, UsageFilter, read_answer_usage

if TYPE_CHECKING:
    from serving.gateway.exchange import Exchange

OK = 200
SERVER_ERROR = 500
FAILURES = (aiohttp.ClientError, TimeoutError)  # what reading from a backend raises when it fails


class Pieces(Protocol):
    async def readany(self) -> bytes:
        """The bytes that have arrived (waiting for some), or b"" at the end of the body."""
        ...


class Reply(Protocol):
    """What the relay uses of a backend's response."""

    status: int
    headers: Mapping[str, str]
    content: Pieces

    async def read(self) -> bytes: ...
    def close(self) -> None: ...


def content_type(reply: Reply) -> bytes:
    return reply.headers.get("Content-Type", "application/json").encode()


async def relay_body(attempt: Attempt, reply: Reply, send: Send) -> None:
    """Send the answer on whole; a 5xx is raised as AttemptFailed instead (it may be retried)."""
    try:
        body = await reply.read()
    except FAILURES as e:
        raise attempt.failed(e) from e
    status = reply.status
    if status >= SERVER_ERROR:
        raise attempt.failed_answer(status, body, content_type(reply))
    exchange = attempt.exchange
    if status == OK:
        read_answer_usage(exchange, body)
        if exchange.transcript is not None:
            exchange.transcript.append(body)
    attempt.succeeded()
    exchange.status = status
    if status != OK:
        exchange.error_kind = f"upstream_{status}"
    headers = [
        (b"content-type", content_type(reply)),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", exchange.request_id.encode()),
        (b"x-slipway-backend", attempt.backend.label),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def relay_stream(attempt: Attempt, reply: Reply, send: Send, receive: Receive) -> None:
    """Relay a 200 event stream to the client as it arrives, then record the attempt's outcome."""
    exchange = attempt.exchange
    framer = EventFramer()
    usage = (ResponsesUsage if exchange.endpoint == "responses" else UsageFilter)(
        exchange, framer, attempt.asked
    )
    frame, flush, read, keep = framer.feed, framer.flush, reply.content.readany, usage.filter
    gone = asyncio.ensure_future(_disconnect(receive, reply))
    transcript = exchange.transcript  # kept only for a mirrored request (mirror.py)
    first = last = 0.0
    try:
        while True:
            piece = await read()
            run = frame(piece) if piece else flush()  # b"": the body ended
            if run and (run := keep(run)):
                if transcript is not None:
                    transcript.append(run)
                last = perf_counter()
                if not first:
                    first = last
                    exchange.ttft_s = first - exchange.started
                    exchange.status = OK
                    await send(_stream_start(attempt))
                await send({"type": "http.response.body", "body": run, "more_body": True})
            if not piece:
                break
    except asyncio.CancelledError:  # its deadline passed (proxy.py), or the server stops
        _settle(usage, exchange)
        raise
    except FAILURES as e:
        _settle(usage, exchange)  # the tokens generated until it stopped are charged all the same
        if _client_left(gone, attempt):
            return
        if not first:
            raise attempt.failed(e) from e
        attempt.record_failure()
        exchange.error_kind = "upstream_stream_broken"
        await send(_broken_off(attempt, e))
        await send(_last())
        return
    finally:
        gone.cancel()
    _settle(usage, exchange)
    if _client_left(gone, attempt):
        return
    if not first:
        raise attempt.failed(aiohttp.ClientPayloadError("empty stream"))
    token_at, itl = usage.timings(first, last, framer.events)
    exchange.ttft_s = token_at - exchange.started
    attempt.succeeded(token_at - attempt.start, itl)
    await send(_last())


def _settle(usage: UsageFilter, exchange: Exchange) -> None:
    if usage.settle():  # a backend that ignores stream_options: counted from content
        exchange.tokens_from = "content"


def _stream_start(attempt: Attempt) -> Message:
    headers = [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache"),
        (b"x-request-id", attempt.exchange.request_id.encode()),
        (b"x-slipway-backend", attempt.backend.label),
    ]
    return {"type": "http.response.start", "status": OK, "headers": headers}


def _broken_off(attempt: Attempt, error: BaseException) -> Message:
    return _error_event(f"{attempt.where} broke off the stream: {error}", "upstream_stream_broken")


def _error_event(message: str, code: str) -> Message:
    """An OpenAI-shaped error as the event that ends a stream already begun."""
    event = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return {"type": "http.response.body", "body": data_event(dumps(event)), "more_body": True}


async def deadline_passed(attempt: Attempt, send: Send, seconds: float) -> None:
    """The request's deadline passed while its backend was still answering: a stream that had
    begun ends with an error event (its tokens until then are charged), else a 504."""
    exchange = attempt.exchange
    exchange.error_kind = "deadline_exceeded"
    message = (
        f"the request's deadline of {seconds:g} s passed before {attempt.where} had answered "
        "it all; ask for more time with the x-slipway-timeout-s header, up to the gateway's "
        "timeouts.request_s"
    )
    if exchange.status != OK:  # nothing has reached the client
        raise UpstreamError(message, code="deadline_exceeded", status=504)
    await send(_error_event(message, "deadline_exceeded"))
    await send(_last())


def _last() -> Message:
    return {"type": "http.response.body", "body": b"", "more_body": False}


async def _disconnect(receive: Receive, reply: Reply) -> bool:
    """Stops reading upstream when the client goes away, so the backend can drop the request."""
    message = await receive()
    if message["type"] == "http.disconnect":
        reply.close()
        return True
    return False


def _client_left(gone: asyncio.Future, attempt: Attempt) -> bool:
    if gone.done() and not gone.cancelled() and gone.result():
        exchange = attempt.exchange
        exchange.status = exchange.status or 499
        exchange.error_kind = "client_disconnected"
        return True
    return False
