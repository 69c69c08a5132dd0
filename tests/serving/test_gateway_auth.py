"""Authentication: tenant keys, the admin token, and no secret in any log line."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.serving.conftest import MODEL, backend, chat


@pytest.fixture
def gw(mock, keys, run_gateway):
    _, url = mock
    with run_gateway(keys.config([backend(url, "1")])) as base:
        yield base, keys


def test_missing_and_wrong_keys_are_401(gw):
    base, keys = gw
    r = httpx.post(f"{base}/v1/chat/completions", json=chat())
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(
        f"{base}/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sk-not-a-key"}
    )
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Basic abc"}).status_code == 401
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json=chat(),
        headers={"Authorization": f"Bearer {keys.key('alice')}"},
    )
    assert r.status_code == 200


def test_admin_routes_need_the_admin_token(gw):
    base, keys = gw
    path = f"{base}/admin/routes/{MODEL}"
    assert httpx.get(path).status_code == 401
    assert httpx.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.get(path, headers={"Authorization": f"Bearer {keys.key('alice')}"})
    assert (
        r.status_code == 403 and "tenant API keys are not accepted" in r.json()["error"]["message"]
    )
    r = httpx.post(
        f"{path}/weights",
        json={"weights": {"1": 5}},
        headers={"Authorization": f"Bearer {keys.key('alice')}"},
    )
    assert r.status_code == 403
    assert httpx.get(path, headers={"Authorization": f"Bearer {keys.admin}"}).status_code == 200
    # The admin token is not a tenant key either.
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json=chat(),
        headers={"Authorization": f"Bearer {keys.admin}"},
    )
    assert r.status_code == 401


def test_no_key_or_token_in_logs(mock, keys, run_gateway, caplog, capfd, home):
    _, url = mock
    caplog.set_level(logging.DEBUG)
    config = keys.config([backend(url, "1")], [keys.tenant("alice", rpm=2, log_prompts=True)])
    secrets_seen = [keys.key("alice"), keys.admin, "sk-wrong-secret-value"]
    with run_gateway(config) as base:
        for token in secrets_seen:
            for _ in range(3):  # includes 429s once over rpm
                httpx.post(
                    f"{base}/v1/chat/completions",
                    json=chat(),
                    headers={"Authorization": f"Bearer {token}"},
                )
                httpx.get(
                    f"{base}/admin/routes/{MODEL}", headers={"Authorization": f"Bearer {token}"}
                )
        httpx.post(
            f"{base}/admin/routes/{MODEL}/weights",
            json={"weights": {"1": 7}},
            headers={"Authorization": f"Bearer {keys.admin}"},
        )
    out, err = capfd.readouterr()
    text = caplog.text + out + err
    assert "weights of 'tiny-chat' set: 1(stable)=7" in text  # the capture sees the gateway's log
    for secret in secrets_seen:
        assert secret not in text
    usage_db = (home.logs / "gateway-usage.sqlite").read_bytes()
    for secret in secrets_seen:
        assert secret.encode() not in usage_db
