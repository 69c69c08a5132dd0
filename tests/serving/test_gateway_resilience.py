"""Bad requests, oversize bodies, overload, timeouts, deadlines and broken streams."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from tests.serving.conftest import MODEL, backend, chat, post_many
from tests.serving.test_gateway_charging import last_generated, usage_row

TIMEOUT_HEADER = "x-slipway-timeout-s"


@pytest.fixture
def gw(mock, keys, run_gateway):
    upstream, url = mock
    config = keys.config(
        [backend(url, "1", max_concurrency=2)],
        max_body_bytes=2048,
        timeouts={"connect_s": 1, "read_s": 0.5},
    )
    with run_gateway(config) as base:
        yield upstream, base, {"Authorization": f"Bearer {keys.key('alice')}"}


def test_body_over_the_limit_is_413(gw):
    _, base, auth = gw
    r = httpx.post(f"{base}/v1/chat/completions", json=chat("x" * 5000), headers=auth)
    assert r.status_code == 413 and "limit of 2048 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(10):
            yield b"x" * 500

    r = httpx.post(f"{base}/v1/chat/completions", content=chunks(), headers=auth)
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "tiny-chat"}', "messages"),
        (b'{"model": "tiny-chat", "messages": [{"content": "x"}]}', "messages[0].role"),
        (b'{"model": "tiny-chat", "messages": [{"role": "user"}], "stream": "yes"}', "stream"),
        (
            b'{"model": "tiny-chat", "messages": [{"role": "user"}], "max_tokens": true}',
            "max_tokens",
        ),
        (
            b'{"model": "tiny-chat", "messages": [{"role": "user"}], "temperature": "hot"}',
            "temperature",
        ),
    ],
)
def test_malformed_requests_are_400_naming_the_field(gw, body, param):
    _, base, auth = gw
    r = httpx.post(f"{base}/v1/chat/completions", content=body, headers=auth)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if param:
        assert f"'{param}'" in error["message"]


def test_completions_need_a_prompt(gw):
    _, base, auth = gw
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": []}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_overload_is_503_with_retry_after(gw):
    upstream, base, auth = gw
    upstream.faults["served-1"] = Fault(delay_s=0.3)
    rs = asyncio.run(post_many(base, auth["Authorization"].split()[1], [chat()] * 6, concurrency=6))
    statuses = sorted(s for s, _, _ in rs)
    assert statuses == [200, 200, 503, 503, 503, 503]
    overloaded = next(h for s, h, _ in rs if s == 503)
    assert overloaded["Retry-After"] == "1"


def test_read_timeout_is_504_and_broken_stream_ends_with_error_event(gw):
    upstream, base, auth = gw
    upstream.faults["served-1"] = Fault(delay_s=2, times=1)
    r = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=auth, timeout=10)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    upstream.faults["served-1"] = Fault(break_after=2, times=1)
    r = httpx.post(
        f"{base}/v1/chat/completions", json=chat(stream=True, max_tokens=5), headers=auth
    )
    assert r.status_code == 200
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert len(events) == 3 and '"code":"upstream_stream_broken"' in events[-1]


def test_unreachable_backend_is_502(keys, run_gateway):
    from serving.processes import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with run_gateway(keys.config([backend(dead, "1")])) as base:
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json=chat(),
            headers={"Authorization": f"Bearer {keys.key('alice')}"},
        )
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
        assert httpx.get(f"{base}/health").status_code == 200


@pytest.fixture
def timed(keys, run_gateway):
    """A mock taking 0.6 s before it answers and 20 ms per token, behind a gateway with
    timeouts.request_s 5 and tenant alice's usage written every 0.1 s."""
    upstream = MockUpstream(delay_s=0.6, chunk_delay_s=0.02)
    with serve(upstream) as url:
        config = keys.config(
            [backend(url, "1")], timeouts={"request_s": 5}, usage={"batch_interval_s": 0.1}
        )
        with run_gateway(config) as base:
            yield upstream, base, {"Authorization": f"Bearer {keys.key('alice')}"}


def test_a_deadline_passed_before_the_answer_is_504_and_no_fault_of_the_backend(timed, keys):
    _, base, auth = timed
    start = time.time()
    r = httpx.post(
        f"{base}/v1/chat/completions", json=chat(), headers={**auth, TIMEOUT_HEADER: "0.2"}
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert "deadline of 0.2 s" in r.json()["error"]["message"]
    row = usage_row(start, r.headers["x-request-id"])
    assert (row.status, row.error_kind) == (504, "deadline_exceeded")
    admin = {"Authorization": f"Bearer {keys.admin}"}
    [stats] = httpx.get(f"{base}/admin/stats/{MODEL}", headers=admin).json()["backends"]
    assert (stats["circuit"], stats["errors"]) == ("closed", 0)  # the client's choice, not a fault
    # Within its deadline the same request is answered.
    ok = httpx.post(
        f"{base}/v1/chat/completions", json=chat(), headers={**auth, TIMEOUT_HEADER: "3"}
    )
    assert ok.status_code == 200


def test_a_stream_past_its_deadline_ends_with_an_error_event_and_its_tokens_charged(timed):
    upstream, base, auth = timed
    start = time.time()
    body = chat(max_tokens=500, stream=True)  # 0.6 s + 10 s of tokens: past the gateway's 5 s
    r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth, timeout=30)
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert r.status_code == 200 and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "deadline_exceeded"
    relayed = len(events) - 1
    row = usage_row(start, r.headers["x-request-id"])
    generated = last_generated(upstream)
    assert 100 < relayed < 500 and generated < 500  # vLLM's request was stopped with the stream
    assert row.error_kind == "deadline_exceeded" and relayed <= row.completion_tokens <= generated


@pytest.mark.parametrize("value", ["soon", "0", "-1", "inf", "nan"])
def test_a_malformed_deadline_header_is_400_naming_it(timed, value):
    _, base, auth = timed
    r = httpx.post(
        f"{base}/v1/chat/completions", json=chat(), headers={**auth, TIMEOUT_HEADER: value}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == TIMEOUT_HEADER
