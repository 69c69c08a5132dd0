"""The canary's log-probability of stable's answer, read from the real vLLM (the shared tiny
server): an engine scoring its own greedy answer finds no drop, a corrupted answer a large one,
for chat and completion requests alike; a server that gives no log-probabilities scores None."""

from __future__ import annotations

import httpx
import pytest

from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from evaluation.quality.logprob import Engine, Scorer, answer_logprob
from tests.evaluation.conftest import SERVED

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
PLAIN = {"prompt": "The capital of Italy is"}


def greedy(url: str, request: dict) -> tuple[str, int]:
    """The server's own greedy answer and its token count."""
    chat = "messages" in request
    body = {"model": SERVED, "max_tokens": 6, "temperature": 0, **request}
    data = httpx.post(
        f"{url}/v1/{'chat/completions' if chat else 'completions'}", json=body, timeout=60
    ).json()
    choice = data["choices"][0]
    return (choice["message"]["content"] if chat else choice["text"]), data["usage"][
        "completion_tokens"
    ]


def pair(request: dict, stable_text: str, tokens: int, canary_text: str = "x") -> dict:
    side = {"ok": True, "text": stable_text, "completion_tokens": tokens}
    return {
        "id": "r1",
        "stable_version": "1",
        "request": request,
        "stable": side,
        "canary": {**side, "text": canary_text},
    }


@pytest.mark.parametrize("request_", [CHAT, PLAIN], ids=["chat", "completions"])
def test_an_engines_own_answer_scores_no_drop_and_a_corrupted_one_a_large_drop(
    tiny_server, request_
):
    engine = Engine(tiny_server.url, SERVED, "1")
    answer, tokens = greedy(tiny_server.url, request_)
    with httpx.Client(timeout=60) as client:
        own = answer_logprob(client, engine, request_, answer, tokens).value
        garbled = answer_logprob(client, engine, request_, answer[::-1], tokens).value
    assert own is not None and garbled is not None
    assert own > -1.0  # the tiny model was taught these answers
    assert own - garbled > 1.0
    if "messages" in request_:  # the same conversation as a Responses API request scores alike
        responses = {"instructions": None, "input": request_["messages"][0]["content"]}
        with httpx.Client(timeout=60) as client:
            same = answer_logprob(client, engine, responses, answer, tokens).value
        assert same == pytest.approx(own, abs=1e-6)
    scorer = Scorer({"1": engine}, engine)
    pairs = [pair(request_, answer, tokens)]
    scorer.score(pairs)
    assert pairs[0]["logprob_drop"] == pytest.approx(0.0, abs=1e-3)  # the same engine twice
    scorer.close()


def test_a_server_without_prompt_logprobs_scores_none_and_pairs_are_scored_once_at_a_rate():
    upstream = MockUpstream()
    with serve(upstream) as url:
        engine = Engine(url, "mock", "1")
        recorded: list = []
        now = [100.0]
        scorer = Scorer(
            {"1": engine}, engine, rate_rps=0.5, record=recorded.extend, clock=lambda: now[0]
        )
        pairs = [pair(CHAT, "Paris.", 2) | {"id": f"r{i}"} for i in range(3)]
        scorer.score(pairs)
        scorer.score(pairs)  # no time has passed: no second pair yet
        assert [p.get("logprob_drop", "unscored") for p in pairs] == [None, "unscored", "unscored"]
        now[0] += 1.9  # 0.5 pairs per second: the second is due at 2 s
        scorer.score(pairs)
        assert "logprob_drop" not in pairs[1]
        now[0] += 0.1
        scorer.score(pairs)
        assert [p.get("logprob_drop", "unscored") for p in pairs] == [None, None, "unscored"]
        now[0] += 60  # a backlog is scored at the rate, never in a burst beyond it
        scorer.score(pairs)
        assert [p["logprob_drop"] for p in pairs] == [None, None, None]
        assert len(upstream.requests) == 6  # two calls per pair, each pair once
        scorer.close()
    # Every call is handed on with the usage the engine reported, for the reconciliation.
    assert len(recorded) == 6 and {(c.version, c.status) for c in recorded} == {("1", 200)}
    assert sum(c.prompt_tokens for c in recorded) == upstream.prompt_tokens_total
    assert sum(c.completion_tokens for c in recorded) == upstream.generation_tokens_total
