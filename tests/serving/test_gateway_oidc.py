"""Tenants signed in with a JWT from a configured identity provider: tokens signed here with a
test key, verified by the gateway offline against the key set; each refusal says which check
failed; the usage is the named tenant's; admin routes still want an admin token."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from configs.gateway import OIDCSpec
from evaluation.benchmarks.mock_upstream import serve
from serving.gateway.app import build_app
from serving.gateway.oidc import OIDCError, OIDCVerifier
from tests.serving.conftest import backend, chat

ISSUER, AUDIENCE = "https://id.example.test", "slipway-gateway"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture
def jwks(tmp_path, signing_key) -> Path:
    public = json.loads(RSAAlgorithm.to_jwk(signing_key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**public, "kid": "test-1", "use": "sig"}]}))
    return path


def token(key: rsa.RSAPrivateKey, kid: str = "test-1", **claims) -> str:
    now = time.time()
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "tenant": "acme"} | claims
    body = {k: v for k, v in body.items() if v is not None}  # None: leave the claim out
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


def test_a_jwt_from_the_issuer_signs_its_tenant_in_and_bad_ones_say_why(
    mock, keys, home, jwks, signing_key
):
    _, url = mock
    oidc = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks), "leeway_s": 0}
    tenants = [keys.tenant("acme", rpm=100)]
    config = keys.config([backend(url, "1")], tenants, oidc=oidc)

    def ask(base: str, jwt_: str, path: str = "/v1/chat/completions") -> httpx.Response:
        headers = {"Authorization": f"Bearer {jwt_}"}
        if path.startswith("/admin"):
            return httpx.get(base + path, headers=headers)
        return httpx.post(base + path, json=chat(), headers=headers)

    with serve(build_app(config, home)) as base:
        good_token = token(signing_key)
        good = ask(base, good_token)
        usage = httpx.get(f"{base}/v1/usage", headers={"Authorization": f"Bearer {good_token}"})
        refusals = {
            "expired": ask(base, token(signing_key, exp=time.time() - 5)),
            "audience": ask(base, token(signing_key, aud="someone-else")),
            "issuer": ask(base, token(signing_key, iss="https://evil.example")),
            "other key": ask(base, token(rsa_key())),  # right kid, wrong key
            "unknown kid": ask(base, token(signing_key, kid="test-2")),
            "no tenant": ask(base, token(signing_key, tenant=None)),
            "unknown tenant": ask(base, token(signing_key, tenant="nobody")),
        }
        admin = ask(base, token(signing_key), "/admin/routes")

    assert good.status_code == 200, good.text
    assert usage.json()["tenant"] == "acme" and usage.json()["used"]["requests_this_minute"] == 1
    messages = {why: r.json()["error"]["message"] for why, r in refusals.items()}
    assert {r.status_code for r in refusals.values()} == {401}
    assert messages["expired"] == "identity token refused: it has expired"
    assert messages["audience"] == f"identity token refused: its audience is not '{AUDIENCE}'"
    assert messages["issuer"] == f"identity token refused: its issuer is not '{ISSUER}'"
    assert "Signature verification failed" in messages["other key"]
    assert "key id 'test-2' is not in the issuer's key set" in messages["unknown kid"]
    assert "no 'tenant' claim" in messages["no tenant"]
    assert "names tenant 'nobody', which does not exist" in messages["unknown tenant"]
    assert admin.status_code == 401  # a tenant's identity is no admin token


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"keys": []}', "The JWK Set did not contain any keys"),
        ("not json", "Expecting value"),
        (None, "[Errno 2] No such file"),
    ],
)
def test_a_key_set_that_cannot_be_read_stops_the_start_saying_why(tmp_path, content, why):
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    spec = OIDCSpec(issuer=ISSUER, audience=AUDIENCE, jwks_file=path)
    expected = re.escape(f"the key set {path} cannot be used: {why}")
    with pytest.raises(OIDCError, match=expected):
        asyncio.run(OIDCVerifier(spec).open())


def test_oidc_needs_exactly_one_key_set_source():
    with pytest.raises(ValueError, match="exactly one of jwks_file and jwks_url"):
        OIDCSpec(issuer=ISSUER, audience=AUDIENCE)
