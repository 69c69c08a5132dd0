"""Mirroring: copies of stable's requests go to a canary for analysis only, paired with stable's
answers, capped in rate, never billed, never seen by the client."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import aiohttp
import httpx
import pytest

from configs.rollout import AnalysisPolicy
from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from evaluation.paired import mirrored_arms, pair_counts
from serving.gateway.exchange import Exchange
from serving.gateway.tokens import read_answer_usage
from serving.gateway.usage import read_usage
from tests.serving.conftest import MODEL, backend, chat, post_many


def admin(keys) -> dict:
    return {"Authorization": f"Bearer {keys.admin}"}


def mirrored(url: str, keys, rate_rps: float = 1000.0, **fields):
    """A route of stable '1' with all traffic and canary '2' at weight 0, mirrored to."""
    config = keys.config([backend(url, "1"), backend(url, "2", role="canary", weight=0)], **fields)
    data = config.model_dump()
    data["routes"][0]["mirror"] = {"to": "2", "rate_rps": rate_rps}
    return type(config).model_validate(data)


def stats(base: str, keys) -> dict:
    response = httpx.get(f"{base}/admin/stats/{MODEL}?samples=true", headers=admin(keys))
    response.raise_for_status()
    return {b["version"]: b for b in response.json()["backends"]}


def settled(base: str, keys, pairs: int) -> dict:
    """The statistics once `pairs` pairs are recorded (copies finish after the client's answer)."""
    deadline = time.monotonic() + 10
    while True:
        found = stats(base, keys)
        if found["2"]["pairs"]["count"] >= pairs or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_every_mirrored_request_is_answered_by_stable_and_paired_with_the_canarys_copy(
    mock, keys, run_gateway, home, stream
):
    upstream, url = mock
    upstream.faults["served-2"] = Fault(word="z")  # the canary answers differently
    start = time.time()
    with run_gateway(mirrored(url, keys)) as base:
        bodies = [chat(f"question {i}", max_tokens=4, stream=stream) for i in range(20)]
        responses = asyncio.run(post_many(base, keys.key("alice"), bodies, concurrency=4))
        found = settled(base, keys, 20)
    assert [s for s, _, _ in responses] == [200] * 20
    assert {h["x-slipway-backend"] for _, h, _ in responses} == {"1"}
    assert all(b"z0" not in body for _, _, body in responses)  # the client never sees the copy
    canary, stable = found["2"], found["1"]
    assert canary["requests"] == 0 and canary["synthetic"]["requests"] == 0  # not live traffic
    assert canary["shadow"]["requests"] == 20 and canary["shadow"]["completion_tokens"] == 80
    assert stable["requests"] == 20
    pairs = canary["pairs"]["pairs"]
    assert len(pairs) == 20
    for pair in pairs:
        assert pair["stable"]["text"].split() == ["w0", "w1", "w2", "w3"]
        assert pair["canary"]["text"].split() == ["z0", "z1", "z2", "z3"]
        assert pair["stable"]["ok"] and pair["canary"]["ok"]
        assert pair["request"]["messages"][0]["content"].startswith("question")
        if stream:
            assert pair["stable"]["ttft_s"] > 0 and pair["canary"]["ttft_s"] > 0
    counts = pair_counts(pairs, AnalysisPolicy(quality={"logprob": False}))
    assert (counts.scored, counts.degraded) == (20, 20)
    rows = read_usage(start, time.time() + 1)
    assert len(rows) == 20 and set(rows.backend_version) == {"1"}  # the copies are never billed


def test_copies_are_capped_at_the_mirror_rate(mock, keys, run_gateway):
    _, url = mock
    with run_gateway(mirrored(url, keys, rate_rps=5.0)) as base:
        began = time.monotonic()
        asyncio.run(post_many(base, keys.key("alice"), [chat()] * 200, concurrency=8))
        elapsed = time.monotonic() - began
        found = settled(base, keys, 1)
    copies = found["2"]["shadow"]["requests"]
    # a full bucket of 5, then 5 per second
    assert 5 <= copies <= 5 + 5 * elapsed + 1, (copies, elapsed)
    assert found["1"]["requests"] == 200


def test_no_copy_goes_to_a_side_answering_max_in_flight_copies(mock, keys, run_gateway):
    upstream, url = mock
    upstream.faults["served-2"] = Fault(delay_s=3.0)  # the canary falls behind
    config = mirrored(url, keys).model_dump()
    config["routes"][0]["mirror"]["max_in_flight"] = 2
    weights = {"weights": {"1": 100, "2": 0}, "mirror": config["routes"][0]["mirror"]}
    with run_gateway(type(mirrored(url, keys)).model_validate(config)) as base:
        began = time.monotonic()
        asyncio.run(post_many(base, keys.key("alice"), [chat()] * 40, concurrency=8))
        # A weight change (a rollout's next step) builds the route anew while the copies are
        # still in flight: they still count.
        changed = httpx.post(
            f"{base}/admin/routes/{MODEL}/weights", json=weights, headers=admin(keys)
        )
        changed.raise_for_status()
        asyncio.run(post_many(base, keys.key("alice"), [chat()] * 40, concurrency=8))
        answered_s = time.monotonic() - began
        time.sleep(3.5)  # the copies end
    assert answered_s < 3.0  # every copy sent was still in flight while stable answered all 80
    copies = [r for r in upstream.requests if r["model"] == "served-2"]
    assert len(copies) == 2  # the rest were skipped, not queued


def test_a_failing_canary_copy_is_an_error_pair_and_never_reaches_the_client(
    mock, keys, run_gateway
):
    upstream, url = mock
    upstream.faults["served-2"] = Fault(status=500)
    with run_gateway(mirrored(url, keys)) as base:
        responses = asyncio.run(post_many(base, keys.key("alice"), [chat()] * 10))
        found = settled(base, keys, 10)
    assert [s for s, _, _ in responses] == [200] * 10
    assert found["2"]["circuit"] == "closed"  # copies never open the canary's circuit
    assert found["2"]["shadow"]["errors"] == 10
    pairs = found["2"]["pairs"]["pairs"]
    assert [p["canary"]["ok"] for p in pairs] == [False] * 10
    assert pair_counts(pairs, AnalysisPolicy()).canary_failed == 10


def test_a_client_that_hangs_up_leaves_no_pair(keys, run_gateway):
    upstream = MockUpstream(chunks=50, chunk_delay_s=0.02)
    with serve(upstream) as url, run_gateway(mirrored(url, keys)) as base:

        async def leave_early():
            headers = {"Authorization": f"Bearer {keys.key('alice')}"}
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    base + "/v1/chat/completions",
                    json=chat(max_tokens=50, stream=True),
                    headers=headers,
                ) as r,
            ):
                await r.content.readany()  # the first event, then gone

        asyncio.run(leave_early())
        deadline = time.monotonic() + 10
        while stats(base, keys)["2"]["shadow"]["requests"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = stats(base, keys)
    assert found["2"]["shadow"]["requests"] == 1  # the copy ran to its end
    assert found["2"]["pairs"]["count"] == 0 and found["2"]["pairs"]["skipped"] == 1


def test_mirror_is_set_kept_and_stopped_through_the_admin_api(mock, keys, run_gateway):
    _, url = mock
    config = keys.config([backend(url, "1"), backend(url, "2", role="canary", weight=0)])
    with run_gateway(config) as base:
        weights = f"{base}/admin/routes/{MODEL}/weights"
        bad = httpx.post(
            weights,
            json={"weights": {"1": 100}, "mirror": {"to": "1", "rate_rps": 1}},
            headers=admin(keys),
        )
        assert bad.status_code == 400
        assert "mirror.to '1' is not one of its canary backends" in bad.json()["error"]["message"]
        set_ = {"weights": {"1": 100}, "mirror": {"to": "2", "rate_rps": 3}}
        assert httpx.post(weights, json=set_, headers=admin(keys)).json()["mirror"] == {
            "to": "2",
            "rate_rps": 3.0,
            "share": 1.0,
            "max_in_flight": None,
        }
        kept = httpx.post(weights, json={"weights": {"2": 0}}, headers=admin(keys)).json()
        assert kept["mirror"]["to"] == "2"
        asyncio.run(post_many(base, keys.key("alice"), [chat()] * 2))
        assert settled(base, keys, 2)["2"]["pairs"]["count"] == 2
        stopped = httpx.post(
            weights, json={"weights": {"2": 0}, "mirror": None}, headers=admin(keys)
        ).json()
        assert stopped["mirror"] is None
        asyncio.run(post_many(base, keys.key("alice"), [chat()] * 5))
        time.sleep(0.3)
        # the weight change started a new window, and nothing was copied after the stop
        assert stats(base, keys)["2"]["shadow"]["requests"] == 0


def test_cached_prompt_tokens_are_read_where_the_backend_reports_them():
    exchange = Exchange("chat", "r1")
    usage = {"prompt_tokens": 300, "completion_tokens": 2}
    read_answer_usage(exchange, json.dumps({"usage": usage}).encode())
    assert exchange.cached_tokens is None  # not reported: unknown, not 0
    details = {**usage, "prompt_tokens_details": {"cached_tokens": 256}}
    read_answer_usage(exchange, json.dumps({"usage": details}).encode())
    assert (exchange.prompt_tokens, exchange.cached_tokens) == (300, 256)


def test_at_a_live_step_copies_go_both_ways_so_both_engines_carry_every_request(
    mock, keys, run_gateway
):
    _, url = mock
    config = keys.config(
        [backend(url, "1", weight=50), backend(url, "2", role="canary", weight=50)]
    )
    data = config.model_dump()
    data["routes"][0]["mirror"] = {"to": "2", "rate_rps": 1000.0}
    with run_gateway(type(config).model_validate(data)) as base:
        responses = asyncio.run(post_many(base, keys.key("alice"), [chat()] * 100))
        found = settled(base, keys, 100)
    served = Counter(h["x-slipway-backend"] for _, h, _ in responses)
    pairs = found["2"]["pairs"]["pairs"]
    copied = Counter(p["copied_to"] for p in pairs)
    assert copied == {"canary": served["1"], "stable": served["2"]}  # one pair per request
    # each engine answered every request: its live share and the other side's copies
    assert found["1"]["requests"] + found["1"]["shadow"]["requests"] == 100
    assert found["2"]["requests"] + found["2"]["shadow"]["requests"] == 100
    assert {p["stable_version"] for p in pairs} == {"1"}
    # a live canary answer is counted once: in the canary's live arm, not again as a copy
    arms = mirrored_arms(pairs)
    assert sum(a.requests for a in arms) == copied["canary"]


def test_a_copy_is_timed_from_its_send_not_from_when_the_gateway_made_it():
    """A copy is made before its original and sent once the event loop runs its task: on a busy
    gateway that wait made every copy look slower than its original (a canary copy 1.06-1.09 x
    its stable original on two vLLM engines)."""
    from configs.gateway import BackendSpec, BreakerSpec, TenantSpec, TimeoutsSpec
    from serving.gateway.mirror import Copy
    from serving.gateway.proxy import Upstream
    from serving.gateway.routes import NOT_STREAMED
    from serving.gateway.routing import Backend

    upstream_app = MockUpstream(delay_s=0.05)
    with serve(upstream_app) as url:
        spec = BackendSpec.model_validate(backend(url, "2", role="canary", weight=0))
        canary = Backend(MODEL, spec, BreakerSpec(failures=5, open_s=30), 16)
        original = Exchange("chat", "req-1")
        original.tenant = TenantSpec(name="alice", key_sha256="0" * 64)

        async def main() -> tuple[float, float]:
            upstream = Upstream(TimeoutsSpec())
            await upstream.open()
            try:
                made = time.perf_counter()
                copy = Copy(
                    upstream,
                    canary,
                    canary,
                    original,
                    json.dumps(chat("hi")).encode(),
                    {},
                    NOT_STREAMED,
                )
                time.sleep(0.3)  # the loop is busy: the copy's task has not run yet
                await copy.task
                return copy.attempt.timings[0], time.perf_counter() - made
            finally:
                await upstream.close()

        timed, since_made = asyncio.run(main())
    assert since_made >= 0.35  # the wait and the answer
    assert 0.05 <= timed < 0.25  # the answer alone


@pytest.mark.parametrize("stream", [True, False])
def test_responses_requests_are_mirrored_and_paired_by_their_output_text(
    mock, keys, run_gateway, stream
):
    upstream, url = mock
    upstream.faults["served-2"] = Fault(word="z")
    with run_gateway(mirrored(url, keys)) as base:
        bodies = [
            {"model": MODEL, "input": f"question {i}", "max_output_tokens": 3, "stream": stream}
            for i in range(6)
        ]
        answers = asyncio.run(
            post_many(base, keys.key("alice"), bodies, concurrency=3, path="/v1/responses")
        )
        found = settled(base, keys, 6)
    assert [s for s, _, _ in answers] == [200] * 6
    assert all(b"z0" not in body for _, _, body in answers)
    pairs = found["2"]["pairs"]["pairs"]
    assert len(pairs) == 6 and found["2"]["shadow"]["requests"] == 6
    for pair in pairs:
        assert pair["stable"]["text"].split() == ["w0", "w1", "w2"]
        assert pair["canary"]["text"].split() == ["z0", "z1", "z2"]
        assert pair["stable"]["finish_reason"] == pair["canary"]["finish_reason"] == "stop"
        assert pair["request"]["input"].startswith("question ")
