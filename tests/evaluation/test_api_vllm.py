"""The Responses API, tokenize and detokenize through the gateway to real vLLM, with the official
openai client: what vLLM generates for /v1/responses, streamed and not, is in the usage log to the
token (its counters' increase), and tokenize/detokenize round-trip a text. Against the shared real
vLLM on the tiny model (tests/evaluation/conftest.py), through the tiny_gateway fixture."""

from __future__ import annotations

import time

import httpx
import openai

from serving.gateway.usage import read_usage
from tests.evaluation.conftest import KEY
from tests.evaluation.test_usage_vllm import settled


def test_responses_through_the_gateway_are_billed_as_vllm_counted_them(tiny_server, tiny_gateway):
    gateway = tiny_gateway
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0)
    before, start = settled(tiny_server.url), time.time()
    answer = client.responses.create(
        model="tiny-chat", input="The capital of France is", max_output_tokens=6
    )
    assert answer.status in ("completed", "incomplete") and answer.output_text
    stream = client.responses.create(
        model="tiny-chat", input="Name a colour", max_output_tokens=7, stream=True
    )
    kinds = [event.type for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert "response.output_text.delta" in kinds
    after = settled(tiny_server.url)
    deadline = time.monotonic() + 10
    while len(rows := read_usage(start, time.time() + 1)) < 2:
        assert time.monotonic() < deadline, "the usage rows were not written"
        time.sleep(0.1)
    assert list(rows.endpoint) == ["responses", "responses"] and list(rows.stream) == [False, True]
    assert rows.tokens_from.isna().all()  # vLLM's own counts, from the stream's last event
    assert rows.completion_tokens.iloc[0] == answer.usage.output_tokens
    assert rows.prompt_tokens.sum() == after[0] - before[0]
    assert rows.completion_tokens.sum() == after[1] - before[1]
    assert rows.ttft_ms.iloc[1] > 0


def test_tokenize_and_detokenize_round_trip_through_the_gateway(tiny_gateway):
    gateway = tiny_gateway
    auth = {"Authorization": f"Bearer {KEY}"}
    text = "Paris is the capital of France"
    tokens = httpx.post(
        f"{gateway}/tokenize", json={"model": "tiny-chat", "prompt": text}, headers=auth
    )
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert tokens.json()["count"] == len(ids) > 0
    back = httpx.post(
        f"{gateway}/detokenize", json={"model": "tiny-chat", "tokens": ids}, headers=auth
    )
    assert back.status_code == 200 and text in back.json()["prompt"]
    assert (
        httpx.post(f"{gateway}/tokenize", json={"model": "tiny-chat", "prompt": text}).status_code
        == 401
    )
