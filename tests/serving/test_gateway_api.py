"""The rest of the API beside chat and completions: /v1/responses (streamed and not),
/v1/embeddings, /tokenize and /detokenize, each behind a tenant key, billed and logged like
chat. A Responses stream carries its usage only in its last event: a client that leaves before
it is charged the deltas relayed, flagged. Tokenize and detokenize go to stable only and stay out
of the canary's statistics. Against the mock upstream, which answers these paths as vLLM does;
the real vLLM tests are in tests/evaluation/test_api_vllm.py."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from serving.gateway.usage import read_usage
from tests.serving.conftest import MODEL, REDIS_URL, backend
from tests.serving.test_gateway_charging import charged, last_generated, usage_row

OTHER_PATHS = ("/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize")


@pytest.fixture
def metered(mock, keys, run_gateway, redis_prefix):
    """Alice with a monthly budget on the shared limiter and a max_tokens cap of 8."""
    upstream, url = mock
    config = keys.config(
        [backend(url, "1")],
        [keys.tenant("alice", monthly_token_budget=1_000_000, max_tokens_cap=8)],
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        usage={"batch_interval_s": 0.1},
    )
    with run_gateway(config) as base:
        yield upstream, base, keys.key("alice")


def test_responses_json_and_stream_through_the_official_client_are_billed(metered, redis_prefix):
    upstream, base, key = metered
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    start = time.time()
    answer = client.responses.create(model=MODEL, input="one two three", max_output_tokens=3)
    assert answer.output_text == "w0 w1 w2"
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (3, 3)
    assert upstream.requests[-1]["model"] == "served-1"
    # The tenant's cap is the default of a request that names no max_output_tokens.
    events = list(client.responses.create(model=MODEL, input="four five", stream=True))
    assert upstream.requests[-1]["max_output_tokens"] == 8
    assert "stream_options" not in upstream.requests[-1]  # the Responses API has none
    assert [e.type for e in events].count("response.output_text.delta") == 8
    assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens == 8
    frame = usage_frame(start, 2)
    assert list(frame.endpoint) == ["responses", "responses"]
    assert list(frame.stream) == [False, True]
    assert list(zip(frame.prompt_tokens, frame.completion_tokens, strict=True)) == [(3, 3), (2, 8)]
    assert frame.tokens_from.isna().all()  # the backend's own counts, from its last event
    assert charged(redis_prefix, "alice") == 3 + 3 + 2 + 8


def test_a_client_that_leaves_a_responses_stream_is_charged_the_deltas_relayed(
    keys, run_gateway, redis_prefix
):
    upstream = MockUpstream(chunk_delay_s=0.01)  # 10 ms per token: still generating when it leaves
    with serve(upstream) as url:
        config = keys.config(
            [backend(url, "1")],
            [keys.tenant("alice", monthly_token_budget=1_000_000)],
            redis_url=REDIS_URL,
            redis_prefix=redis_prefix,
            usage={"batch_interval_s": 0.1},
        )
        body = {"model": MODEL, "input": "a b", "max_output_tokens": 200, "stream": True}
        headers = {"Authorization": f"Bearer {keys.key('alice')}"}
        start = time.time()
        with run_gateway(config) as base:
            with httpx.stream("POST", f"{base}/v1/responses", json=body, headers=headers) as r:
                request_id, deltas = r.headers["x-request-id"], 0
                for line in r.iter_lines():
                    deltas += line == "event: response.output_text.delta"
                    if deltas == 3:
                        break  # leaving the block hangs up
            row = usage_row(start, request_id)
            generated = last_generated(upstream)
            spent = charged(redis_prefix, "alice")
    assert 3 <= generated < 200  # the mock stopped when the gateway hung up
    assert row.error_kind == "client_disconnected" and row.tokens_from == "content"
    assert 3 <= row.completion_tokens <= generated and generated - row.completion_tokens <= 3
    assert spent == row.completion_tokens  # the prompt's count never came: 0, flagged


def test_embeddings_tokenize_and_detokenize_are_behind_the_key_and_logged(metered):
    upstream, base, key = metered
    for path in OTHER_PATHS:
        assert httpx.post(f"{base}{path}", json={"model": MODEL}).status_code == 401, path
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    start = time.time()
    embedded = client.embeddings.create(model=MODEL, input=["one two", "three"])
    assert [d.index for d in embedded.data] == [0, 1] and embedded.usage.prompt_tokens == 3
    auth = {"Authorization": f"Bearer {key}"}
    tokens = httpx.post(f"{base}/tokenize", json={"model": MODEL, "prompt": "a b c"}, headers=auth)
    assert tokens.status_code == 200 and tokens.json()["tokens"] == [0, 1, 2]
    text = httpx.post(f"{base}/detokenize", json={"model": MODEL, "tokens": [4, 2]}, headers=auth)
    assert text.json() == {"prompt": "t4 t2"}
    assert [r["model"] for r in list(upstream.requests)[-3:]] == ["served-1"] * 3
    frame = usage_frame(start, 3)
    assert list(frame.endpoint) == ["embeddings", "tokenize", "detokenize"]
    assert list(frame.prompt_tokens) == [3, 0, 0] and set(frame.completion_tokens) == {0}
    assert set(frame.status) == {200}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/responses", {"model": MODEL}, "input"),
        ("/v1/embeddings", {"model": MODEL, "input": []}, "input"),
        ("/tokenize", {"model": MODEL}, "prompt"),
        ("/detokenize", {"model": MODEL, "tokens": ["a"]}, "tokens"),
        (
            "/v1/responses",
            {"model": MODEL, "input": "x", "max_output_tokens": 9},
            "max_output_tokens",
        ),
    ],
)
def test_a_malformed_request_names_its_field(metered, path, body, param):
    upstream, base, key = metered
    sent = len(upstream.requests)
    r = httpx.post(f"{base}{path}", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert len(upstream.requests) == sent  # nothing reached the backend


def test_tokenize_goes_to_stable_only_and_is_no_canary_evidence(mock, keys, run_gateway):
    upstream, url = mock
    config = keys.config([backend(url, "1", weight=50), backend(url, "2", "canary", weight=50)])
    auth = {"Authorization": f"Bearer {keys.key('alice')}"}
    admin = {"Authorization": f"Bearer {keys.admin}"}
    with run_gateway(config) as base:
        for _ in range(20):
            body = {"model": MODEL, "prompt": "a b"}
            assert httpx.post(f"{base}/tokenize", json=body, headers=auth).status_code == 200
        tokenized = {r["model"] for r in upstream.requests}
        for _ in range(40):
            body = {"model": MODEL, "input": "a b", "max_output_tokens": 2}
            assert httpx.post(f"{base}/v1/responses", json=body, headers=auth).status_code == 200
        stats = httpx.get(f"{base}/admin/stats/{MODEL}", headers=admin).json()
    assert tokenized == {"served-1"}
    requests = {b["role"]: b["requests"] for b in stats["backends"]}
    # Only the Responses requests are in the statistics, and they took the canary's weight.
    assert sum(requests.values()) == 40 and requests["canary"] > 0


def usage_frame(start: float, rows: int):
    """The usage log's rows since `start`, oldest first, once `rows` of them are written."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        frame = read_usage(start, time.time() + 1)
        if len(frame) >= rows:
            return frame.sort_values("time").reset_index(drop=True)
        time.sleep(0.1)
    raise AssertionError(f"fewer than {rows} usage rows were written")
