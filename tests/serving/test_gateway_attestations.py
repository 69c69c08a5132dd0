"""The gateway checks each backend's evaluation attestation itself, against the keys it trusts,
wherever a backend enters its routing table: a route update through the admin API, the routes
stored by another instance (at start and while running), and again when its deny-list changes.
It holds no private key and takes no one's word (`verified: true` is refused)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx

from configs.gateway import RouteSpec, StateSpec
from evaluation.benchmarks.attested import Signer
from evaluation.benchmarks.mock_upstream import serve
from serving.gateway.app import build_app
from serving.gateway.state import store_for
from serving.gateway.table_sync import ROUTES, encode
from tasks.attest import deny
from tests.serving.conftest import MODEL, SIGNER, backend, chat, digest


def admin(keys) -> dict:
    return {"Authorization": f"Bearer {keys.admin}"}


def edited(attestation: dict, **predicate) -> dict:
    """The attestation with its predicate changed after signing, the signature kept."""
    envelope = attestation["dsseEnvelope"]
    content = json.loads(base64.b64decode(envelope["payload"]))
    content["predicate"] |= predicate
    payload = base64.b64encode(json.dumps(content).encode()).decode()
    return {**attestation, "dsseEnvelope": {**envelope, "payload": payload}}


def with_attestation(url: str, version: str, attestation) -> dict:
    spec = {**backend(url, version, role="canary", weight=10), "expected_digest": digest(version)}
    return {**spec, "attestation": attestation} if attestation is not None else spec


def refused_backends(url: str, tmp_path) -> tuple[dict, dict[str, tuple[dict, str]]]:
    """A gateway `trust` section, and canary backends it must refuse with the words saying why:
    every way around the attestation that still fits the schema."""
    denied_signer, stranger = Signer(tmp_path / "denied"), Signer(tmp_path / "stranger")
    trust = SIGNER.trust(deny_digests=[digest("9")], deny_keys=[denied_signer.key_id])
    trust["keys"].append(str(denied_signer.public_key))
    suites = {"slipway_knowledge": "sha256:" + "a" * 64}
    cases = {
        "tampered": (
            with_attestation(
                url, "2", edited(SIGNER.attest(digest("2"), "failed"), verdict="passed")
            ),
            "signature does not verify",
        ),
        "another digest": (
            with_attestation(url, "2", SIGNER.attest(digest("3"))),
            f"is for {digest('3')}, not for {digest('2')}",
        ),
        "swapped suite digest": (
            with_attestation(
                url,
                "2",
                edited(SIGNER.attest(digest("2"), suites=suites), suites={"x": digest("x")}),
            ),
            "signature does not verify",
        ),
        "failed verdict": (
            with_attestation(url, "2", SIGNER.attest(digest("2"), "failed")),
            "verdict is 'failed'",
        ),
        "untrusted key": (
            with_attestation(url, "2", stranger.attest(digest("2"))),
            f"signed by key {stranger.key_id}, which is not trusted",
        ),
        "deny-listed digest": (
            with_attestation(url, "9", SIGNER.attest(digest("9"))),
            f"digest {digest('9')} is deny-listed",
        ),
        "deny-listed key": (
            with_attestation(url, "2", denied_signer.attest(digest("2"))),
            f"deny-listed key {denied_signer.key_id}",
        ),
    }
    return trust, cases


def test_route_updates_are_refused_without_a_valid_attestation_and_say_why(
    mock, keys, run_gateway, tmp_path
):
    _, url = mock
    trust, cases = refused_backends(url, tmp_path)
    config = keys.config([backend(url, "1")], trust=trust)
    forged = {k: v for k, v in backend(url, "2").items() if k != "attestation"}
    cases["forged verified"] = (
        {**forged, "role": "canary", "verified": True, "expected_digest": digest("2")},
        "attestation",
    )
    stable = {**backend(url, "1"), "expected_digest": digest("1")}
    with run_gateway(config) as base:
        for name, (candidate, words) in cases.items():
            body = {"backends": [stable, candidate]}
            r = httpx.put(f"{base}/admin/routes/{MODEL}", json=body, headers=admin(keys))
            assert r.status_code == 400, (name, r.text)
            assert words in r.json()["error"]["message"], (name, r.json())
            route = httpx.get(f"{base}/admin/routes/{MODEL}", headers=admin(keys)).json()
            assert [b["version"] for b in route["backends"]] == ["1"], name  # left as it was

        good = with_attestation(url, "2", SIGNER.attest(digest("2")))
        r = httpx.put(
            f"{base}/admin/routes/{MODEL}", json={"backends": [stable, good]}, headers=admin(keys)
        )
        assert r.status_code == 200, r.text


def write_route(home, model: str, spec: RouteSpec) -> None:
    """A route written straight into the gateway's state store, as another instance (or anyone
    with the store's credentials) could."""

    async def go():
        store = store_for(StateSpec(), home)
        await store.open()
        try:
            version = (await store.read(ROUTES)).version
            await store.write(ROUTES, version, {model: encode(spec)})
        finally:
            await store.close()

    asyncio.run(go())


def listed(base: str, keys) -> set[str]:
    headers = {"Authorization": f"Bearer {keys.key('alice')}"}
    return {m["id"] for m in httpx.get(f"{base}/v1/models", headers=headers).json()["data"]}


def until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_stored_routes_are_checked_when_read_at_start_and_while_running(
    mock, keys, home, caplog, tmp_path
):
    """Each refused backend planted straight into the state store, one model per way around
    the attestation: each is left out with its reason, while the gateway runs and after a
    restart, and the honest route is served throughout."""
    _, url = mock
    trust, cases = refused_backends(url, tmp_path)
    config = keys.config([backend(url, "1")], trust=trust)
    planted = {}
    for i, (candidate, words) in enumerate(cases.values()):
        stored = {k: v for k, v in candidate.items() if k != "expected_digest"}
        spec = {"model": f"planted-{i}", "backends": [stored | {"role": "stable"}]}
        planted[f"planted-{i}"] = (RouteSpec.model_validate(spec), words)
    with serve(build_app(config, home)) as base:
        for model, (spec, _) in planted.items():
            write_route(home, model, spec)
        assert until(lambda: all(f"not serving {m}:" in caplog.text for m in planted))
        for model, (_, words) in planted.items():
            line = next(x for x in caplog.text.splitlines() if f"not serving {model}:" in x)
            assert words in line, (model, line)
        assert listed(base, keys) == {MODEL}

    caplog.clear()
    with serve(build_app(config, home)) as base:  # a restart reads the same store
        assert all(f"not serving {m}:" in caplog.text for m in planted)
        assert listed(base, keys) == {MODEL}
        headers = {"Authorization": f"Bearer {keys.key('alice')}"}
        r = httpx.post(f"{base}/v1/chat/completions", json=chat(model="planted-0"), headers=headers)
        assert r.status_code == 404


def test_a_digest_deny_listed_while_the_gateway_runs_stops_being_served(mock, keys, home, caplog):
    _, url = mock
    config = keys.config([backend(url, "1")])
    headers = {"Authorization": f"Bearer {keys.key('alice')}"}
    with serve(build_app(config, home)) as base:
        assert httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers).is_success
        deny(home, "digest", digest("1"), "weights leaked")
        assert until(lambda: listed(base, keys) == set())
        assert f"digest {digest('1')} is deny-listed" in caplog.text
        r = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 404
