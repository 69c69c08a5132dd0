"""A tenant's bounds on a request's shape: allowed models, prompt bytes, max_tokens and n."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from configs.gateway import TenantSpec
from tests.serving.conftest import MODEL, backend, chat


@pytest.fixture
def gw(mock, keys, run_gateway):
    upstream, url = mock
    tenants = [
        keys.tenant("bounded", max_tokens_cap=8, max_n=1, max_prompt_bytes=12),
        keys.tenant("elsewhere", models=["another-model"]),
        keys.tenant("free"),
    ]
    with run_gateway(keys.config([backend(url, "1")], tenants)) as base:

        def post(tenant: str, body: dict, endpoint: str = "chat/completions") -> httpx.Response:
            headers = {"Authorization": f"Bearer {keys.key(tenant)}"}
            return httpx.post(f"{base}/v1/{endpoint}", json=body, headers=headers)

        yield upstream, base, keys, post


def refused(r: httpx.Response, param: str, *named: str) -> None:
    """A 400 in the OpenAI error shape, `param` set, the message naming the field and the limit."""
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert all(word in error["message"] for word in named), error["message"]


def test_max_tokens_over_the_cap_is_refused_naming_field_and_limit(gw):
    upstream, _, _, post = gw
    refused(
        post("bounded", chat(max_tokens=9)),
        "max_tokens",
        "'max_tokens' is 9",
        "max_tokens_cap of 8",
    )
    refused(
        post("bounded", chat(max_tokens=None, max_completion_tokens=50)),
        "max_completion_tokens",
        "max_tokens_cap of 8",
    )
    seen = len(upstream.requests)
    assert post("bounded", chat(max_tokens=8)).status_code == 200
    assert len(upstream.requests) == seen + 1  # the refused ones never reached the backend
    assert post("free", chat(max_tokens=500)).status_code == 200  # no cap: no bound


def test_a_request_naming_no_max_tokens_gets_the_cap(gw):
    upstream, _, _, post = gw
    r = post("bounded", chat(max_tokens=None))
    assert r.status_code == 200 and upstream.requests[-1]["max_tokens"] == 8
    assert r.json()["usage"]["completion_tokens"] == 8


def test_n_over_the_limit_is_refused(gw):
    _, _, _, post = gw
    refused(post("bounded", chat(n=2)), "n", "'n' is 2", "max_n of 1")
    assert post("bounded", chat(n=1)).status_code == 200


def test_a_prompt_over_the_byte_limit_is_refused(gw):
    _, _, _, post = gw
    # 11 characters, 13 UTF-8 bytes: the bound is on bytes, which the gateway can count exactly.
    refused(post("bounded", chat("héllo wörld")), "messages", "13 bytes", "max_prompt_bytes of 12")
    assert post("bounded", chat("hello world")).status_code == 200
    parts = [{"role": "user", "content": [{"type": "text", "text": "x" * 13}]}]
    refused(post("bounded", {**chat(), "messages": parts}), "messages", "max_prompt_bytes")
    prompt = {"model": MODEL, "prompt": list(range(13)), "max_tokens": 2}  # token ids: one each
    refused(post("bounded", prompt, "completions"), "prompt", "13 bytes")
    prompt["prompt"] = ["hello", "world!"]  # all prompts of a request together: 11 bytes
    assert post("bounded", prompt, "completions").status_code == 200


def test_a_model_the_tenant_may_not_use_is_not_found_as_if_not_served(gw):
    _, base, keys, post = gw
    r = post("elsewhere", chat())
    unknown = post("free", chat(model="no-such-model"))
    assert r.status_code == unknown.status_code == 404
    assert r.json()["error"]["code"] == unknown.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"

    def models(tenant: str) -> list[str]:
        headers = {"Authorization": f"Bearer {keys.key(tenant)}"}
        return [m["id"] for m in httpx.get(f"{base}/v1/models", headers=headers).json()["data"]]

    assert models("elsewhere") == [] and models("free") == [MODEL]
    headers = {"Authorization": f"Bearer {keys.key('elsewhere')}"}
    assert httpx.get(f"{base}/v1/models/{MODEL}", headers=headers).status_code == 404
    assert post("free", chat()).status_code == 200


def test_an_empty_model_list_is_refused_in_the_config():
    with pytest.raises(ValidationError, match="models"):
        TenantSpec(name="t", key_sha256="0" * 64, models=[])
