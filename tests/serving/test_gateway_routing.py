"""Routing: weights, sticky sessions, canary opt-out, admin changes, retries and circuit
breakers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import httpx
import pytest

from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from tests.serving.conftest import MODEL, backend, chat, digest, post_many


def admin(keys) -> dict:
    return {"Authorization": f"Bearer {keys.admin}"}


def served_by(responses) -> Counter:
    return Counter(h["x-slipway-backend"] for status, h, _ in responses if status == 200)


def test_weighted_choice_follows_weights(mock, keys, run_gateway):
    _, url = mock
    config = keys.config(
        [backend(url, "1", weight=80), backend(url, "2", role="canary", weight=20)]
    )
    with run_gateway(config) as base:
        n = 2000
        counts = served_by(asyncio.run(post_many(base, keys.key("alice"), [chat()] * n)))
    assert sum(counts.values()) == n
    share = counts["2"] / n
    assert abs(share - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5, counts  # within 4 standard errors


def test_sessions_stick_to_one_backend(mock, keys, run_gateway):
    _, url = mock
    config = keys.config(
        [backend(url, "1", weight=50), backend(url, "2", role="canary", weight=50)]
    )
    with run_gateway(config) as base:
        key = keys.key("alice")

        async def go():
            by_header = {}
            for s in range(40):
                rs = await post_many(
                    base, key, [chat()] * 5, headers={"X-Session-ID": f"session-{s}"}
                )
                by_header[s] = served_by(rs)
            by_user = {}
            for s in range(40):
                by_user[s] = served_by(await post_many(base, key, [chat(user=f"user-{s}")] * 5))
            return by_header, by_user

        by_header, by_user = asyncio.run(go())
    for sessions in (by_header, by_user):
        assert all(len(c) == 1 and sum(c.values()) == 5 for c in sessions.values())
        assert {v for c in sessions.values() for v in c} == {"1", "2"}  # sessions spread over both


def test_opted_out_tenant_never_gets_the_canary(mock, keys, run_gateway):
    _, url = mock
    tenants = [keys.tenant("alice"), keys.tenant("careful", canary="out")]
    config = keys.config(
        [backend(url, "1", weight=10), backend(url, "2", role="canary", weight=90)], tenants
    )
    with run_gateway(config) as base:
        careful = served_by(asyncio.run(post_many(base, keys.key("careful"), [chat()] * 200)))
        alice = served_by(asyncio.run(post_many(base, keys.key("alice"), [chat()] * 200)))
    assert careful == {"1": 200}
    assert alice["2"] > 100


def test_admin_route_changes_verify_digests(mock, keys, run_gateway):
    _, url = mock
    with run_gateway(keys.config([backend(url, "1")])) as base:
        good = {
            "backends": [
                {**backend(url, "1", weight=90), "expected_digest": digest("1")},
                {**backend(url, "2", role="canary", weight=10), "expected_digest": digest("2")},
            ]
        }
        r = httpx.put(f"{base}/admin/routes/{MODEL}", json=good, headers=admin(keys))
        assert r.status_code == 200, r.text
        assert [(b["version"], b["weight"]) for b in r.json()["backends"]] == [("1", 90), ("2", 10)]

        wrong = {
            "backends": [
                {**backend(url, "1"), "expected_digest": digest("1")},
                {
                    **backend(url, "3", role="canary", weight=10),
                    "expected_digest": digest("registered-3"),
                },
            ]
        }
        r = httpx.put(f"{base}/admin/routes/{MODEL}", json=wrong, headers=admin(keys))
        assert r.status_code == 400
        error = r.json()["error"]
        assert (
            error["code"] == "digest_mismatch"
            and "differs from the registered digest" in error["message"]
        )

        vouched = {k: v for k, v in backend(url, "4").items() if k != "attestation"}
        forged = {"backends": [{**vouched, "verified": True, "expected_digest": digest("4")}]}
        r = httpx.put(f"{base}/admin/routes/{MODEL}", json=forged, headers=admin(keys))
        assert r.status_code == 400 and "attestation" in r.json()["error"]["message"]

        # The refused changes left the route as it was.
        r = httpx.get(f"{base}/admin/routes/{MODEL}", headers=admin(keys))
        assert [b["version"] for b in r.json()["backends"]] == ["1", "2"]

        r = httpx.post(
            f"{base}/admin/routes/{MODEL}/weights",
            json={"weights": {"2": 100, "1": 0}},
            headers=admin(keys),
        )
        assert r.status_code == 200
        rs = asyncio.run(post_many(base, keys.key("alice"), [chat()] * 20))
        assert served_by(rs) == {"2": 20}
        r = httpx.post(
            f"{base}/admin/routes/{MODEL}/weights", json={"weights": {"9": 1}}, headers=admin(keys)
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "weights"


def test_route_change_is_atomic_for_a_stream_in_flight(keys, run_gateway):
    slow = MockUpstream(chunk_delay_s=0.05)
    with serve(slow) as url, run_gateway(keys.config([backend(url, "1")])) as base:
        headers = {"Authorization": f"Bearer {keys.key('alice')}"}
        got: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = chat(max_tokens=20, stream=True)
            with httpx.stream(
                "POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=30
            ) as r:
                got.append(r.headers["x-slipway-backend"])
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        started.set()
                        got.append(line)

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(10)
        new = {"backends": [{**backend(url, "2"), "expected_digest": digest("2")}]}
        assert (
            httpx.put(f"{base}/admin/routes/{MODEL}", json=new, headers=admin(keys)).status_code
            == 200
        )
        after = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
        reader.join(30)
    assert after.headers["x-slipway-backend"] == "2"
    assert got[0] == "1" and len(got) == 21  # the stream finished, whole, on the old backend
    assert all('"model":"served-1"' in line for line in got[1:])


def test_failed_canary_is_retried_once_on_stable(mock, keys, run_gateway):
    upstream, url = mock
    upstream.faults["served-2"] = Fault(status=500)
    config = keys.config(
        [backend(url, "1", weight=0), backend(url, "2", role="canary", weight=100)],
        breaker={"failures": 100, "open_s": 30},
    )
    with run_gateway(config) as base:
        headers = {"Authorization": f"Bearer {keys.key('alice')}"}
        r = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 200 and r.headers["x-slipway-backend"] == "1"
        s = httpx.post(f"{base}/v1/chat/completions", json=chat(stream=True), headers=headers)
        assert (
            s.status_code == 200
            and s.headers["x-slipway-backend"] == "1"
            and "data: [DONE]" in s.text
        )
        stats = httpx.get(f"{base}/admin/stats/{MODEL}", headers=admin(keys)).json()
        by_version = {b["version"]: b for b in stats["backends"]}
        assert by_version["2"]["errors"] == 2 and by_version["2"]["requests"] == 2
        assert by_version["1"]["errors"] == 0 and by_version["1"]["requests"] == 2
        # A failing stable backend is not retried: its error passes through.
        upstream.faults["served-1"] = Fault(status=503)
        r = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 503 and r.json()["error"]["message"] == "injected 503"


def test_circuit_opens_after_consecutive_failures(mock, keys, run_gateway):
    upstream, url = mock
    upstream.faults["served-2"] = Fault(status=502)
    config = keys.config(
        [backend(url, "1", weight=50), backend(url, "2", role="canary", weight=50)],
        breaker={"failures": 3, "open_s": 60},
    )
    with run_gateway(config) as base:
        rs = asyncio.run(post_many(base, keys.key("alice"), [chat()] * 60, concurrency=1))
        assert all(status == 200 for status, _, _ in rs)  # canary failures were retried on stable
        canary_calls = sum(1 for r in upstream.requests if r["model"] == "served-2")
        assert canary_calls == 3  # then the circuit opened and the canary got no more traffic
        stats = httpx.get(f"{base}/admin/stats/{MODEL}", headers=admin(keys)).json()
        assert {b["version"]: b["circuit"] for b in stats["backends"]} == {
            "1": "closed",
            "2": "open",
        }
        metrics = httpx.get(f"{base}/metrics").text
        assert (
            'slipway_gateway_backend_circuit_open{model="tiny-chat",role="canary",version="2"} 1.0'
            in metrics
        )


def test_stats_window_and_reset(mock, keys, run_gateway):
    upstream, url = mock
    upstream.chunk_delay_s = 0.002  # chunks apart in time: inter-token latency is measured
    with run_gateway(keys.config([backend(url, "1")])) as base:
        asyncio.run(
            post_many(
                base, keys.key("alice"), [chat(stream=True, max_tokens=4)] * 10 + [chat()] * 5
            )
        )
        r = httpx.get(f"{base}/admin/stats/{MODEL}?samples=true", headers=admin(keys)).json()
        b = r["backends"][0]
        assert b["requests"] == 15 and b["errors"] == 0 and b["role"] == "stable"
        assert b["ttft_s"]["count"] == 10 and len(b["ttft_s"]["samples"]) == 10
        assert b["itl_s"]["count"] == 10 and b["e2e_s"]["count"] == 15 and b["e2e_s"]["p99"] > 0
        assert b["completion_tokens"] == 10 * 4 + 5 * 2
        time.sleep(0.01)
        reset = httpx.post(f"{base}/admin/stats/{MODEL}/reset", headers=admin(keys)).json()
        assert reset["backends"][0]["requests"] == 0 and reset["backends"][0]["since"] > b["since"]
        metrics = httpx.get(f"{base}/metrics").text  # Prometheus counters are never reset
        assert (
            'slipway_gateway_backend_requests_total{model="tiny-chat",role="stable",version="1"} '
            "15.0" in metrics
        )
        assert (
            "slipway_gateway_backend_ttft_seconds_count"
            '{model="tiny-chat",role="stable",version="1"} 10.0' in metrics
        )


@pytest.mark.parametrize("weights", [(100, 0), (0, 100)])
def test_zero_weight_backends_get_nothing(mock, keys, run_gateway, weights):
    _, url = mock
    config = keys.config(
        [backend(url, "1", weight=weights[0]), backend(url, "2", role="canary", weight=weights[1])]
    )
    with run_gateway(config) as base:
        counts = served_by(asyncio.run(post_many(base, keys.key("alice"), [chat()] * 50)))
    assert counts == {"1" if weights[0] else "2": 50}


def test_failover_serves_from_the_canary_while_stable_is_down_and_goes_back(
    mock, keys, run_gateway
):
    upstream, url = mock
    upstream.faults["served-1"] = Fault(status=503)  # stable is down
    backends = [backend(url, "1", weight=90), backend(url, "2", role="canary", weight=10)]
    route = {"model": MODEL, "backends": backends, "failover": True}
    config = keys.config([], routes=[route], breaker={"failures": 2, "open_s": 0.5})
    with run_gateway(config) as base:
        rs = asyncio.run(post_many(base, keys.key("alice"), [chat()] * 30, concurrency=1))
        assert [status for status, _, _ in rs] == [200] * 30  # no tenant saw stable's outage
        assert served_by(rs) == {"2": 30}
        stats = httpx.get(f"{base}/admin/stats/{MODEL}", headers=admin(keys)).json()
        assert stats["failover"] is True
        one, two = stats["backends"]
        # Each failure before the answer began was tried again on the canary; between probes the
        # open circuit kept stable out.
        assert one["circuit"] == "open" and one["errors"] == one["requests"] >= 2
        # What the canary served in stable's place is not canary evidence: counted apart.
        assert two["failover"]["requests"] + two["requests"] == 30
        assert two["failover"]["requests"] >= 20 and two["errors"] == 0
        metrics = httpx.get(f"{base}/metrics").text
        assert 'slipway_gateway_backend_requests_total{model="tiny-chat",role="failover"' in metrics

        del upstream.faults["served-1"]  # stable recovers: after open_s a probe closes its circuit
        time.sleep(0.6)
        rs = asyncio.run(post_many(base, keys.key("alice"), [chat()] * 40, concurrency=1))
        assert all(status == 200 for status, _, _ in rs)
        back = served_by(rs)
        assert back["1"] >= 25  # 90% by weight again, none as failover
        after = httpx.get(f"{base}/admin/stats/{MODEL}", headers=admin(keys)).json()
        assert after["backends"][0]["circuit"] == "closed"
        assert after["backends"][1]["failover"]["requests"] == two["failover"]["requests"]


def test_without_failover_a_down_stable_answers_503_beside_a_healthy_canary(
    mock, keys, run_gateway
):
    upstream, url = mock
    upstream.faults["served-1"] = Fault(status=503)
    backends = [backend(url, "1", weight=100), backend(url, "2", role="canary", weight=0)]
    config = keys.config(backends, breaker={"failures": 2, "open_s": 30})
    with run_gateway(config) as base:
        rs = asyncio.run(post_many(base, keys.key("alice"), [chat()] * 4, concurrency=1))
        assert [status for status, _, _ in rs] == [503] * 4
        assert json.loads(rs[-1][2])["error"]["code"] == "circuit_open"  # after two failures
