"""The relay's send loop on byte fixtures: a fake backend reply, a fake client, no sockets.

What the client is sent and when, and what the attempt leaves on its backend (breaker, stats).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from configs.gateway import BackendSpec, BreakerSpec, TenantSpec
from serving.gateway.attempt import Attempt, AttemptFailed
from serving.gateway.exchange import Exchange
from serving.gateway.relay import relay_body, relay_stream
from serving.gateway.routing import Backend
from serving.gateway.tokens import Asked
from tests.serving.conftest import DONE, MODEL, USAGE_ONLY, WORD, backend, counted, crlf

HANG = object()  # a read that waits until the reply is closed, as aiohttp's does


class FakeReply:
    """A backend's answer: reads hand out `pieces` in order; an exception piece is raised."""

    def __init__(self, pieces: list, log: list, status: int = 200, body: bytes = b"") -> None:
        self.status = status
        self.headers = {"Content-Type": "application/json"}
        self.content = self
        self.closed = asyncio.Event()
        self._pieces = list(pieces)
        self._body = body
        self._log = log

    async def readany(self) -> bytes:
        piece = self._pieces.pop(0) if self._pieces else b""
        self._log.append(("read", piece))
        if piece is HANG:
            await self.closed.wait()
            raise aiohttp.ClientConnectionError("Connection closed")
        if isinstance(piece, BaseException):
            raise piece
        return piece

    async def read(self) -> bytes:
        return self._body

    def close(self) -> None:
        self.closed.set()


class Client:
    """The ASGI side: records what is sent; disconnects once `leave_after` bodies are sent."""

    def __init__(self, log: list, leave_after: int | None = None) -> None:
        self.log = log
        self.leave_after = leave_after
        self._left = asyncio.Event()

    async def send(self, message: dict) -> None:
        self.log.append(("send", message))
        if self.leave_after is not None and len(self.bodies) >= self.leave_after:
            self._left.set()

    async def receive(self) -> dict:
        await self._left.wait()
        return {"type": "http.disconnect"}

    @property
    def messages(self) -> list[dict]:
        return [m for kind, m in self.log if kind == "send"]

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.messages if m["type"] == "http.response.body"]


NOTHING = Asked(final=False, continuous=False)  # the client asked for no usage


def attempt(asked: Asked = NOTHING) -> Attempt:
    live = Backend(
        MODEL,
        BackendSpec.model_validate(backend("http://127.0.0.1:9", "1")),
        BreakerSpec(failures=1, open_s=30),
        16,
    )
    exchange = Exchange("chat", "req-test")
    exchange.tenant = TenantSpec(name="alice", key_sha256="0" * 64)
    exchange.stream = True
    exchange.backend = live
    attempt = Attempt(exchange, live, b"{}", asked)
    attempt.bind(live.replicas[0])
    return attempt


def run(relay: Callable[..., Awaitable[None]], *args: object) -> None:
    asyncio.run(asyncio.wait_for(relay(*args), 5))


def stream(pieces: list, leave_after: int | None = None) -> tuple[Attempt, Client, FakeReply]:
    log: list = []
    a, client, reply = attempt(), Client(log, leave_after), FakeReply(pieces, log)
    run(relay_stream, a, reply, client.send, client.receive)
    return a, client, reply


def timeline(log: list) -> list:
    """Reads as ("read", piece); sends as "start" or the body sent."""
    return [(kind, what) if kind == "read" else what.get("body", "start") for kind, what in log]


def test_each_run_of_events_is_sent_before_the_next_read():
    pieces = [WORD, WORD[:9], WORD[9:] + WORD, USAGE_ONLY + DONE]
    a, client, _ = stream(pieces)
    assert (
        timeline(client.log)
        == [
            ("read", WORD),
            "start",
            WORD,  # the first event goes out at once
            ("read", WORD[:9]),
            ("read", WORD[9:] + WORD),
            WORD + WORD,  # the completed event and the one that came with it, in one send
            ("read", USAGE_ONLY + DONE),
            DONE,  # the usage event only the gateway asked for is dropped
            ("read", b""),
            b"",
        ]
    )
    start = client.messages[0]
    assert start["status"] == 200
    assert (b"x-slipway-backend", b"1") in start["headers"]
    assert (b"content-type", b"text/event-stream") in start["headers"]
    assert [m.get("more_body") for m in client.messages[1:]] == [True, True, True, False]
    exchange, stats = a.exchange, a.backend.stats
    assert exchange.status == 200 and exchange.ttft_s is not None and exchange.error_kind is None
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 5)
    assert (stats.requests, stats.errors, stats.completion_tokens) == (1, 0, 5)
    assert stats.ttft.seen == 1 and stats.itl.seen == 1  # events in separate reads: timed
    assert a.replica.breaker.state == "closed"


def test_the_dropped_usage_event_is_not_counted_as_an_event_the_client_got():
    a, _, _ = stream([WORD, USAGE_ONLY])  # one event reached the client: no interval to time
    assert a.backend.stats.itl.seen == 0 and a.exchange.tokens == 8


def test_events_that_arrive_in_one_read_carry_no_inter_token_time():
    a, client, _ = stream([WORD + WORD + DONE])
    assert client.bodies == [WORD + WORD + DONE, b""]
    assert a.backend.stats.itl.seen == 0 and a.backend.stats.ttft.seen == 1


def test_the_usage_event_the_client_asked_for_is_relayed():
    log: list = []
    a, client, reply = attempt(Asked(True, False)), Client(log), FakeReply([USAGE_ONLY, DONE], log)
    run(relay_stream, a, reply, client.send, client.receive)
    assert client.bodies == [USAGE_ONLY, DONE, b""]


def test_a_stream_broken_after_its_first_event_ends_with_an_error_event():
    a, client, _ = stream([WORD, aiohttp.ClientPayloadError("connection reset")])
    assert client.bodies[0] == WORD and client.bodies[-1] == b""
    error = client.bodies[1]
    assert error.startswith(b'data: {"error":') and error.endswith(b"\n\n")
    assert b'"code":"upstream_stream_broken"' in error and b"connection reset" in error
    assert a.exchange.status == 200 and a.exchange.error_kind == "upstream_stream_broken"
    assert (a.backend.stats.requests, a.backend.stats.errors) == (1, 1)
    assert a.replica.breaker.state == "open"  # failures=1


@pytest.mark.parametrize(
    ("pieces", "kind"),
    [
        ([aiohttp.ClientPayloadError("reset")], "upstream_unavailable"),
        ([WORD[:5], TimeoutError()], "upstream_timeout"),
        ([], "upstream_unavailable"),  # an empty stream
    ],
)
def test_a_stream_that_fails_before_its_first_event_can_be_retried(pieces, kind):
    log: list = []
    a, client, reply = attempt(), Client(log), FakeReply(pieces, log)
    with pytest.raises(AttemptFailed) as failed:
        run(relay_stream, a, reply, client.send, client.receive)
    assert failed.value.kind == kind and failed.value.status is None
    assert client.messages == []  # nothing reached the client: another backend may answer
    assert (a.backend.stats.requests, a.backend.stats.errors) == (1, 1)


def test_a_client_that_leaves_closes_the_backend_reply_and_records_no_outcome():
    a, client, reply = stream([WORD, HANG], leave_after=1)
    assert reply.closed.is_set()
    assert client.bodies == [WORD]  # no end of stream is sent to a client that has gone
    assert a.exchange.status == 200 and a.exchange.error_kind == "client_disconnected"
    assert a.backend.stats.requests == 0 and a.replica.breaker.failures == 0


def test_a_crlf_framed_stream_reaches_the_client_as_whole_events_with_its_usage_counted():
    body = crlf(WORD + WORD + USAGE_ONLY + DONE)
    cut = len(crlf(WORD)) - 1  # between the CR and the LF of the first event's blank line
    a, client, _ = stream([body[:cut], body[cut:-5], body[-5:]])
    assert b"".join(client.bodies) == WORD + WORD + DONE  # valid SSE, the usage event dropped
    assert all(body.endswith(b"\n\n") for body in client.bodies[:-1]) and client.bodies[-1] == b""
    assert a.exchange.status == 200 and a.exchange.error_kind is None
    assert a.exchange.tokens_from is None  # the backend's own counts
    assert (a.exchange.prompt_tokens, a.exchange.completion_tokens) == (3, 5)
    assert a.backend.stats.completion_tokens == 5


def test_an_event_left_without_its_blank_line_at_the_end_is_sent_whole():
    a, client, _ = stream([WORD, b"data: [DONE]\r\n"])
    assert client.bodies == [WORD, DONE, b""]
    assert a.exchange.error_kind is None and a.exchange.tokens_from == "content"  # no usage


def test_a_stream_of_one_event_without_its_blank_line_is_not_empty():
    _, client, _ = stream([b"data: [DONE]"])
    assert client.bodies == [DONE, b""]


def test_a_client_that_leaves_is_charged_the_tokens_generated_until_then():
    a, client, reply = stream([counted(1), counted(2) + counted(3), HANG], leave_after=2)
    assert reply.closed.is_set() and client.bodies == [WORD, WORD + WORD]  # usage cut out
    assert a.exchange.error_kind == "client_disconnected"
    assert (a.exchange.prompt_tokens, a.exchange.completion_tokens) == (3, 3)


def test_a_stream_without_usage_is_counted_from_its_content_and_flagged():
    a, client, _ = stream([WORD, WORD + WORD, DONE])
    assert client.bodies == [WORD, WORD + WORD, DONE, b""]
    assert a.exchange.status == 200 and a.exchange.error_kind is None
    assert a.exchange.tokens_from == "content"
    assert (a.exchange.prompt_tokens, a.exchange.completion_tokens) == (0, 3)
    assert (a.backend.stats.requests, a.backend.stats.errors) == (1, 0)


def test_a_client_that_leaves_a_stream_without_usage_is_charged_its_content():
    a, _, _ = stream([WORD, WORD, HANG], leave_after=2)
    assert a.exchange.error_kind == "client_disconnected" and a.exchange.completion_tokens == 2


def test_a_stream_broken_off_keeps_the_tokens_generated_before():
    a, _, _ = stream([counted(1), counted(2), aiohttp.ClientPayloadError("reset")])
    assert a.exchange.error_kind == "upstream_stream_broken" and a.exchange.tokens == 5


def answer(status: int, body: bytes) -> tuple[Attempt, Client]:
    log: list = []
    a, client = attempt(), Client(log)
    a.exchange.stream = False
    run(relay_body, a, FakeReply([], log, status=status, body=body), client.send)
    return a, client


def test_a_json_answer_is_sent_whole_with_its_tokens_counted():
    body = b'{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1}}'
    a, client = answer(200, body)
    assert client.bodies == [body]
    assert (b"content-length", str(len(body)).encode()) in client.messages[0]["headers"]
    assert a.exchange.tokens == 5 and a.backend.stats.prompt_tokens == 4


def test_a_client_error_answer_passes_through_and_counts_as_a_success():
    a, client = answer(400, b'{"error":{"message":"bad"}}')
    assert client.messages[0]["status"] == 400 and a.exchange.error_kind == "upstream_400"
    assert (a.backend.stats.requests, a.backend.stats.errors) == (1, 0)


def test_a_server_error_answer_is_raised_for_a_retry_not_sent():
    with pytest.raises(AttemptFailed) as failed:
        answer(503, b'{"error":{"message":"down"}}')
    assert failed.value.status == 503 and failed.value.body == b'{"error":{"message":"down"}}'
    assert failed.value.kind == "upstream_error"
