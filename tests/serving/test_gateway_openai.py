"""The official openai client (sync, async, streaming) and lm-eval work through the gateway
unchanged."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.serving.conftest import MODEL, backend


@pytest.fixture
def gw(mock, keys, run_gateway):
    upstream, url = mock
    with run_gateway(keys.config([backend(url, "1")])) as base:
        yield upstream, base, keys


def test_sync_chat_and_completion(gw):
    upstream, base, keys = gw
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=keys.key("alice"), max_retries=0)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=3
    )
    assert chat.choices[0].message.content == "w0 w1 w2"
    assert chat.model == "served-1"
    assert chat.usage.completion_tokens == 3
    assert upstream.requests[-1]["model"] == "served-1"
    text = client.completions.create(model=MODEL, prompt="say something", max_tokens=2)
    assert text.choices[0].text == "w0 w1"
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_streaming_counts_usage_but_strips_unasked_usage_chunk(gw, home):
    upstream, base, keys = gw
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=keys.key("alice"), max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a b c"}], max_tokens=5, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content for c in chunks) == "w0 w1 w2 w3 w4 "
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    # but the gateway did, with the running count on every chunk (so a disconnect is charged too)
    assert upstream.requests[-1]["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }

    asked = list(
        client.completions.create(
            model=MODEL,
            prompt="x y",
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 2


def test_async_and_async_streaming(gw):
    _, base, keys = gw

    async def go():
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=keys.key("alice"), max_retries=0)
        answers = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=2
                )
                for _ in range(20)
            ]
        )
        stream = await client.completions.create(model=MODEL, prompt="p", max_tokens=3, stream=True)
        pieces = [c.choices[0].text async for c in stream]
        await client.close()
        return answers, pieces

    answers, pieces = asyncio.run(go())
    assert {a.choices[0].message.content for a in answers} == {"w0 w1"}
    assert pieces == ["w0 ", "w1 ", "w2 "]


def test_errors_have_openai_shape_and_client_raises_typed_errors(gw):
    _, base, keys = gw
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=keys.key("alice"), max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "q"}])
    assert e.value.body["code"] == "model_not_found" and "GET /v1/models" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()
    r = httpx.get(f"{base}/v1/nothing", headers={"Authorization": f"Bearer {keys.key('alice')}"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_lm_eval_local_completions(gw, tmp_path, monkeypatch):
    """lm-eval sends token-id prompt lists with logprobs/echo and parses the answers."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from tests.tinymodel import build_tokenizer

    _, base, keys = gw
    tokenizer_dir = tmp_path / "tok"
    build_tokenizer(tokenizer_dir)
    monkeypatch.setenv("OPENAI_API_KEY", keys.key("alice"))
    lm = LocalCompletionsAPI(
        base_url=f"{base}/v1/completions",
        model=MODEL,
        tokenizer=str(tokenizer_dir),
        tokenizer_backend="huggingface",
        num_concurrent=1,
        max_retries=1,
        batch_size=2,
    )
    requests = [
        Instance("loglikelihood", {}, ("The capital of France is", " Paris."), 0),
        Instance("loglikelihood", {}, ("Two plus two is", " four."), 1),
    ]
    results = lm.loglikelihood(requests)
    assert len(results) == 2 and all(lp < 0 for lp, _ in results)
    generated = lm.generate_until(
        [Instance("generate_until", {}, ("The sky is", {"until": ["\n"], "max_gen_toks": 2}), 0)]
    )
    assert generated == ["w0 w1"]
