"""/v1/embeddings through the gateway to a real vLLM serving the tiny model as an embedding model
(`--runner pooling --convert embed`), with the official openai client: the vectors come back, and
the usage log's prompt tokens equal vLLM's own counter. A second engine beside the shared one, so
it runs in `make stress`."""

from __future__ import annotations

import time

import openai
import pytest

from configs.models import Serving
from serving.gateway.usage import read_usage
from serving.vllm import VLLMServer
from tests.evaluation.conftest import KEY, gateway_to
from tests.evaluation.test_usage_vllm import settled

pytestmark = pytest.mark.stress


def test_embeddings_through_the_gateway_are_billed_as_vllm_counted_them(tiny_model_source, home):
    serving = Serving(
        engine_args=["--max-model-len", "256", "--runner", "pooling", "--convert", "embed"]
    )
    with (
        VLLMServer(tiny_model_source, "tiny-embed", home, serving) as engine,
        gateway_to(engine.url, "tiny-embed", "tiny-embed", home) as gateway,
    ):
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0)
        before, start = settled(engine.url), time.time()
        answer = client.embeddings.create(model="tiny-embed", input=["Hello there", "Hi"])
        after = settled(engine.url)
        deadline = time.monotonic() + 10
        while (rows := read_usage(start, time.time() + 1)).empty:
            assert time.monotonic() < deadline, "the usage row was not written"
            time.sleep(0.1)
    assert [d.index for d in answer.data] == [0, 1] and len(answer.data[0].embedding) > 1
    [row] = rows.itertuples()
    assert row.endpoint == "embeddings" and row.status == 200
    assert row.prompt_tokens == answer.usage.prompt_tokens == after[0] - before[0] > 0
    assert row.completion_tokens == 0
