"""The response cache: a deterministic request asked again is answered without a backend, JSON
or streamed, byte for byte; never across tenants, never across versions (a promotion empties it,
a canary's answers never reach stable's users); opt-outs per tenant and per request; shared by
two gateways through Redis; bounded in entries, bytes and time; hits in the usage log, billed as
configured, and no canary evidence. Against the mock upstream."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from configs.gateway import CacheSpec
from serving.gateway.cache import Entry, MemoryStore
from tests.serving.conftest import MODEL, REDIS_URL, backend, chat
from tests.serving.test_gateway_api import usage_frame

FIXED = chat("what is two and two", temperature=0)


def cached(keys, url: str, *backends: dict, tenants=None, **cache) -> object:
    return keys.config(
        list(backends) or [backend(url, "1")],
        tenants,
        cache={"enabled": True, **cache},
        usage={"batch_interval_s": 0.1},
    )


def registered(url: str, version: str, role: str = "stable", weight: float = 100) -> dict:
    """A backend as the rollout puts it: with the digest the registry holds for it."""
    spec = backend(url, version, role, weight)
    return {**spec, "expected_digest": spec["digest"]}


def ask(base: str, key: str, body: dict = FIXED, **headers: str) -> httpx.Response:
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", **headers},
    )
    assert r.status_code == 200, r.text
    return r


def test_a_deterministic_request_asked_again_is_a_hit_that_reaches_no_backend(
    mock, keys, run_gateway
):
    upstream, url = mock
    with run_gateway(cached(keys, url)) as base:
        start = time.time()
        first, second = ask(base, keys.key("alice")), ask(base, keys.key("alice"))
        seeded = [ask(base, keys.key("alice"), chat("x", seed=7)) for _ in range(2)]
        stats = httpx.get(
            f"{base}/admin/stats/{MODEL}", headers={"Authorization": f"Bearer {keys.admin}"}
        ).json()
        metrics = httpx.get(f"{base}/metrics").text
    assert first.headers["x-slipway-cache"] == "miss" and second.headers["x-slipway-cache"] == "hit"
    assert second.content == first.content and second.headers["x-slipway-backend"] == "1"
    assert [r.headers["x-slipway-cache"] for r in seeded] == ["miss", "hit"]
    assert len(upstream.requests) == 2  # one per distinct request
    assert stats["backends"][0]["requests"] == 2  # hits are no evidence about any backend
    frame = usage_frame(start, 4)
    assert list(frame.tokens_from.fillna("")) == ["", "cache", "", "cache"]
    assert list(frame.completion_tokens) == [2, 0, 2, 0]  # billing "free" by default
    assert 'slipway_gateway_cache_total{result="hit"} 2.0' in metrics
    assert 'slipway_gateway_cache_total{result="stored"} 2.0' in metrics


def test_only_deterministic_or_marked_requests_are_cached_and_opt_outs_hold(
    mock, keys, run_gateway
):
    upstream, url = mock
    tenants = [keys.tenant("alice"), keys.tenant("carol", cache=False)]
    with run_gateway(cached(keys, url, tenants=tenants)) as base:
        alice = keys.key("alice")
        sampled = [ask(base, alice, chat("hi")) for _ in range(2)]  # temperature 1: not cached
        marked = [ask(base, alice, chat("hi"), **{"x-slipway-cache": "yes"}) for _ in range(2)]
        refused = [ask(base, alice, FIXED, **{"x-slipway-cache": "no"}) for _ in range(2)]
        carol = [ask(base, keys.key("carol")) for _ in range(2)]
    assert all("x-slipway-cache" not in r.headers for r in sampled + refused + carol)
    assert [r.headers["x-slipway-cache"] for r in marked] == ["miss", "hit"]
    assert len(upstream.requests) == 2 + 1 + 2 + 2


@pytest.mark.parametrize(("scope", "bob_hits"), [("tenant", False), ("shared", True)])
def test_a_tenant_never_gets_another_tenants_answer_unless_the_scope_is_shared(
    mock, keys, run_gateway, scope, bob_hits
):
    _, url = mock
    tenants = [keys.tenant("alice"), keys.tenant("bob")]
    with run_gateway(cached(keys, url, tenants=tenants, scope=scope)) as base:
        ask(base, keys.key("alice"))
        bob = ask(base, keys.key("bob"))
    assert bob.headers["x-slipway-cache"] == ("hit" if bob_hits else "miss")


def test_a_stream_is_replayed_as_the_same_stream(mock, keys, run_gateway):
    upstream, url = mock
    body = chat("count", temperature=0, max_tokens=5, stream=True)
    with run_gateway(cached(keys, url)) as base:
        first, second = ask(base, keys.key("alice"), body), ask(base, keys.key("alice"), body)
        asked_usage = ask(
            base, keys.key("alice"), {**body, "stream_options": {"include_usage": True}}
        )
    assert second.headers["x-slipway-cache"] == "hit"
    assert second.headers["content-type"] == "text/event-stream"
    assert second.text == first.text and second.text.endswith("data: [DONE]\n\n")
    assert second.text.count("data: ") == 6  # five tokens and the end
    # Asking for usage is another request: the answer it gets has the usage event.
    assert asked_usage.headers["x-slipway-cache"] == "miss" and '"usage"' in asked_usage.text
    assert len(upstream.requests) == 2


def test_a_promotion_empties_the_cache_and_a_canary_never_answers_stables_users(
    mock, keys, run_gateway
):
    upstream, url = mock
    admin = {"Authorization": f"Bearer {keys.admin}"}
    with run_gateway(cached(keys, url)) as base:
        assert ask(base, keys.key("alice")).headers["x-slipway-cache"] == "miss"
        # The canary at 50%: sessions split between the versions, each with its own answers.
        route = {"backends": [registered(url, "1", weight=50), registered(url, "2", "canary", 50)]}
        put = httpx.put(f"{base}/admin/routes/{MODEL}", json=route, headers=admin)
        assert put.is_success, put.text
        by_version: dict[str, list[str]] = {"1": [], "2": []}
        for session in range(40):
            r = ask(base, keys.key("alice"), **{"x-session-id": f"s{session}"})
            by_version[r.headers["x-slipway-backend"]].append(r.headers["x-slipway-cache"])
        # Promoted: v2 alone as stable.
        route = {"backends": [registered(url, "2")]}
        put = httpx.put(f"{base}/admin/routes/{MODEL}", json=route, headers=admin)
        assert put.is_success, put.text
        after = [ask(base, keys.key("alice")).headers["x-slipway-cache"] for _ in range(2)]
    # Stable's users hit stable's answer; the canary's first user missed, and the rest hit its own.
    assert by_version["1"] and set(by_version["1"]) == {"hit"}
    assert by_version["2"][0] == "miss" and set(by_version["2"][1:]) == {"hit"}
    assert after == ["hit", "hit"]  # v2's own answer, stored while it was the canary
    assert [r["model"] for r in upstream.requests] == ["served-1", "served-2"]


def test_two_gateways_share_the_cache_through_redis(mock, keys, run_gateway, redis_prefix):
    upstream, url = mock
    config = keys.config(
        [backend(url, "1")],
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        cache={"enabled": True, "store": "redis"},
    )
    with run_gateway(config) as one, run_gateway(config) as two:
        first, second = ask(one, keys.key("alice")), ask(two, keys.key("alice"))
    assert (first.headers["x-slipway-cache"], second.headers["x-slipway-cache"]) == ("miss", "hit")
    assert second.content == first.content and len(upstream.requests) == 1


def test_a_redis_cache_without_redis_url_is_refused_with_the_field(keys):
    with pytest.raises(ValueError, match=r"cache\.store is 'redis' but redis_url is not set"):
        keys.config([], cache={"enabled": True, "store": "redis"})


def test_billing_full_charges_a_hit_the_tokens_of_its_answer(mock, keys, run_gateway):
    _, url = mock
    with run_gateway(cached(keys, url, billing="full")) as base:
        start = time.time()
        ask(base, keys.key("alice"))
        ask(base, keys.key("alice"))
    frame = usage_frame(start, 2)
    assert list(frame.completion_tokens) == [2, 2] and list(frame.prompt_tokens) == [5, 5]
    assert list(frame.tokens_from.fillna("")) == ["", "cache"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def entry(size: int) -> Entry:
    return Entry(False, b"application/json", b"x" * size, 1, 1)


def test_the_memory_store_bounds_time_entries_and_bytes_least_recently_used_first():
    clock = Clock()
    store = MemoryStore(CacheSpec(ttl_s=10, max_entries=3, max_bytes=2048), clock)

    async def go() -> None:
        for key in (b"a", b"b", b"c"):
            await store.put(key, entry(100))
        assert await store.get(b"a") is not None  # a is now the most recently used
        await store.put(b"d", entry(100))  # over 3 entries: b, the least recently used, goes
        assert await store.get(b"b") is None and len(store) == 3
        await store.put(b"e", entry(1900))  # over 2048 bytes: c, then a, go
        assert [await store.get(k) is not None for k in (b"a", b"c", b"d", b"e")] == [
            False,
            False,
            True,
            True,
        ]
        assert store.bytes == 2000
        clock.now = 10.0  # its time is up
        assert await store.get(b"d") is None and store.bytes == 1900

    asyncio.run(go())


def test_an_answer_over_max_entry_bytes_is_not_stored(mock, keys, run_gateway):
    upstream, url = mock
    with run_gateway(cached(keys, url, max_entry_bytes=64)) as base:
        rs = [ask(base, keys.key("alice")) for _ in range(2)]
        metrics = httpx.get(f"{base}/metrics").text
    assert [r.headers["x-slipway-cache"] for r in rs] == ["miss", "miss"]
    assert len(upstream.requests) == 2
    assert 'slipway_gateway_cache_total{result="too_large"} 2.0' in metrics
