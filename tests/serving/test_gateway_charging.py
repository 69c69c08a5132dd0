"""Every generated token is charged: a client that hangs up mid-stream, a backend that sends no
usage, and the usage each client asked for (and only that) reaching it. Against the mock upstream,
whose streams carry vLLM's continuous usage and stop when the gateway hangs up."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import httpx
import pytest
import redis

from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from serving.gateway.usage import read_usage
from tests.serving.conftest import REDIS_URL, backend, chat


@pytest.fixture
def slow_mock():
    """A mock that takes 10 ms per token, so a stream is still generating when a client leaves."""
    upstream = MockUpstream(chunk_delay_s=0.01)
    with serve(upstream) as url:
        yield upstream, url


def charged(prefix: str, tenant: str) -> int:
    """The tokens charged to the tenant's monthly budget in the shared (Redis) limiter."""
    month = datetime.now(UTC).strftime("%Y-%m")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.get(f"{prefix}{tenant}:budget:{month}") or 0)
    finally:
        client.close()


def usage_row(start: float, request_id: str):
    """The request's usage-log row, once the writer (every 0.1 s here) has written it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        frame = read_usage(start, time.time() + 1)
        rows = frame[frame.request_id == request_id] if len(frame) else frame
        if len(rows):
            return rows.iloc[0]
        time.sleep(0.1)
    raise AssertionError(f"no usage row for {request_id}")


def last_generated(upstream: MockUpstream) -> int:
    """The tokens the mock generated for its latest stream, once it has noticed the hang-up."""
    deadline = time.monotonic() + 5
    while not upstream.generated and time.monotonic() < deadline:
        time.sleep(0.05)
    return upstream.generated[-1]


def events(base: str, key: str, body: dict) -> list[dict | str]:
    """A whole stream's events, as JSON (or the raw data, such as [DONE])."""
    headers = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200
    datas = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    return [d if d == "[DONE]" else json.loads(d) for d in datas]


def budgeted(keys, url: str, redis_prefix: str):
    """Alice with a monthly budget on the shared (Redis) limiter, usage written every 0.1 s."""
    return keys.config(
        [backend(url, "1")],
        [keys.tenant("alice", monthly_token_budget=1_000_000)],
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        usage={"batch_interval_s": 0.1},
    )


def test_a_client_that_hangs_up_after_3_chunks_is_charged_what_was_generated(
    slow_mock, keys, run_gateway, redis_prefix
):
    upstream, url = slow_mock
    config = budgeted(keys, url, redis_prefix)
    start = time.time()
    body = chat("one two three", max_tokens=200, stream=True)
    headers = {"Authorization": f"Bearer {keys.key('alice')}"}
    with run_gateway(config) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as r:
            request_id = r.headers["x-request-id"]
            read = 0
            for line in r.iter_lines():
                read += line.startswith("data: ")
                if read == 3:
                    break  # leaving the block hangs up
        row = usage_row(start, request_id)
        generated = last_generated(upstream)
        spent = charged(redis_prefix, "alice")
    assert row.error_kind == "client_disconnected" and row.stream
    assert 3 <= generated < 200  # the mock stopped generating when the gateway hung up
    # What the gateway relayed before it hung up: all the mock generated, but for chunks in flight.
    assert 3 <= row.completion_tokens <= generated and generated - row.completion_tokens <= 3
    assert row.prompt_tokens == 3
    assert spent == row.prompt_tokens + row.completion_tokens  # charged to the tenant's budget


def test_a_stream_without_usage_is_counted_from_its_content_and_flagged(
    mock, keys, run_gateway, redis_prefix
):
    upstream, url = mock
    upstream.faults["served-1"] = Fault(no_usage=True)
    config = budgeted(keys, url, redis_prefix)
    start = time.time()
    body = chat("one two", max_tokens=5, stream=True, stream_options={"include_usage": True})
    headers = {"Authorization": f"Bearer {keys.key('alice')}"}
    with run_gateway(config) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200 and '"usage"' not in r.text  # none to pass on
        row = usage_row(start, r.headers["x-request-id"])
        spent = charged(redis_prefix, "alice")
    assert row.status == 200 and row.error_kind is None and row.tokens_from == "content"
    assert (row.prompt_tokens, row.completion_tokens) == (0, 5)  # one per content delta
    assert spent == 5


def test_each_client_gets_the_usage_it_asked_for(mock, keys, run_gateway):
    upstream, url = mock
    with run_gateway(keys.config([backend(url, "1")])) as base:
        key = keys.key("alice")
        plain = events(base, key, chat("a b", max_tokens=4, stream=True))
        final = events(
            base,
            key,
            chat("a b", max_tokens=4, stream=True, stream_options={"include_usage": True}),
        )
        every = events(
            base,
            key,
            chat(
                "a b",
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True},
            ),
        )
    assert upstream.requests[-1]["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    assert plain[-1] == "[DONE]" and len(plain) == 5
    assert all("usage" not in e for e in plain[:-1])  # no per-chunk usage, no usage event
    assert all("usage" not in e for e in final[:4]) and len(final) == 6
    assert final[4]["choices"] == [] and final[4]["usage"]["completion_tokens"] == 4  # exactly one
    assert [e["usage"]["completion_tokens"] for e in every[:4]] == [1, 2, 3, 4]
    assert every[4]["choices"] == [] and every[4]["usage"]["total_tokens"] == 6
