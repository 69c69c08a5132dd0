"""Token reservations: held at admission, settled exactly once with the tokens used.

The race tests send 500 concurrent requests of one tenant through two gateway instances sharing
Redis (and through one in-process limiter) against the mock upstream. Their reservations are made
exact (no template allowance; a one-byte, one-word prompt; the mock generates max_tokens), so what
a tenant has left, its limit less what is charged and held, can only shrink over the race. A refusal
is then right only if the request's reservation was over what was left at that moment, which is at
least what is left at the end: every refused request must hold more than the limit less the final
charge, and a limiter that refused while room was left fails. Refusing everything fails too: the
charge must end within one largest reservation of the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from datetime import UTC, datetime

import httpx
import pytest
import redis

from configs.gateway import OutagePolicy, TenantSpec
from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from serving.gateway.app import build_app
from serving.gateway.errors import Unavailable
from serving.gateway.limits import Hold
from serving.gateway.redis_limits import RedisLimiter
from serving.gateway.routes import Completions
from tests.serving.conftest import REDIS_URL, backend, chat, post_many

SIZES = (1, 4, 10, 20)  # max_tokens: reservations (and usage) of 2, 5, 11 and 21 tokens
LIMIT = 2000  # against 500 requests that would use 4875 tokens
EXACT = {"template_tokens_per_message": 0}
# A money budget: a prompt token 1,000 nano-dollars, a completion token 2,000; 500 requests
# would cost 9.25 million, the budget is 4 million.
PRICED = EXACT | {
    "chargeback": {"tenants": {"alice": {"input_per_million": 1.0, "output_per_million": 2.0}}}
}
BUDGET_USD = 0.004


def cost(limit: str, max_tokens: int) -> int:
    """What a request of `max_tokens` holds and is charged: tokens, or nano-dollars."""
    return 1000 + 2000 * max_tokens if limit == "monthly_budget_usd" else 1 + max_tokens


def limit_of(limit: str) -> int:
    return round(BUDGET_USD * 1e9) if limit == "monthly_budget_usd" else LIMIT


def bodies(count: int) -> list[dict]:
    return [chat("x", max_tokens=SIZES[i % len(SIZES)]) for i in range(count)]


def redis_int(command: str, *args: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return getattr(client, command)(*args)
    finally:
        client.close()


def charged_in_redis(prefix: str, limit: str) -> int:
    """What the shared limiter charged alice once every hold is settled (the client may have its
    answer a moment before its request settles)."""
    deadline = time.monotonic() + 10
    while redis_int("hlen", f"{prefix}alice:held") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_int("hlen", f"{prefix}alice:held") == 0, "holds left unsettled"
    assert redis_int("hlen", f"{prefix}alice:money-held") == 0, "money holds left unsettled"
    if limit == "tpm":
        return sum(int(v) for v in redis_int("hvals", f"{prefix}alice:tpm"))
    month = datetime.now(UTC).strftime("%Y-%m")
    counter = "money" if limit == "monthly_budget_usd" else "budget"
    return int(redis_int("get", f"{prefix}alice:{counter}:{month}") or 0)


def check_race(results: list[tuple[int, dict, bytes]], limit: str, charged: int | None) -> None:
    used, refused, whole = 0, [], limit_of(limit)
    for (status, _, body), sent in zip(results, bodies(len(results)), strict=True):
        answer = json.loads(body)
        if status == 200:
            assert answer["usage"]["total_tokens"] == 1 + sent["max_tokens"]  # exact reservation
            used += cost(limit, sent["max_tokens"])
        else:
            assert status == 429, body
            kind = answer["error"]["code"] if limit != "tpm" else answer["error"]["type"]
            assert kind == ("tokens" if limit == "tpm" else "insufficient_quota")
            refused.append(cost(limit, sent["max_tokens"]))
    if charged is not None:
        assert charged == used  # every admitted request charged once, with what it used
    assert used <= whole
    assert refused, "the race never reached the limit"
    assert min(refused) > whole - used  # no request refused while what was left could hold it
    assert used >= whole - cost(limit, max(SIZES))


@pytest.mark.parametrize("limit", ["monthly_token_budget", "tpm", "monthly_budget_usd"])
def test_500_racing_requests_through_two_instances_spend_the_limit_exactly(
    mock, keys, run_gateway, redis_prefix, limit
):
    _, url = mock
    value = BUDGET_USD if limit == "monthly_budget_usd" else LIMIT
    config = keys.config(
        [backend(url, "1", max_concurrency=2000)],
        [keys.tenant("alice", **{limit: value})],
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        limits=PRICED,
        # Two gateways, the mock and 500 clients share this process and its GIL: on CI's two
        # busy cores the mock once took over the default 2 s to accept a connection.
        timeouts={"connect_s": 15},
    )
    sent = bodies(500)
    with run_gateway(config) as one, run_gateway(config) as two:

        async def race():
            halves = await asyncio.gather(
                post_many(one, keys.key("alice"), sent[0::2], concurrency=250),
                post_many(two, keys.key("alice"), sent[1::2], concurrency=250),
            )
            merged = [None] * len(sent)
            merged[0::2], merged[1::2] = halves
            return merged

        results = asyncio.run(race())
        charged = charged_in_redis(redis_prefix, limit)
    check_race(results, limit, charged)


@pytest.mark.parametrize("limit", ["monthly_token_budget", "monthly_budget_usd"])
def test_500_racing_requests_in_one_process_spend_the_budget_exactly(
    mock, keys, run_gateway, limit
):
    _, url = mock
    value = BUDGET_USD if limit == "monthly_budget_usd" else LIMIT
    config = keys.config(
        [backend(url, "1", max_concurrency=2000)],
        [keys.tenant("alice", **{limit: value})],
        limits=PRICED,
    )
    with run_gateway(config) as base:
        results = asyncio.run(post_many(base, keys.key("alice"), bodies(500), concurrency=500))
        usage = httpx.get(
            f"{base}/v1/usage", headers={"Authorization": f"Bearer {keys.key('alice')}"}
        )
    check_race(results, limit, None)
    if limit == "monthly_budget_usd":  # the tenant reads what it spent, to the nano-dollar
        spent = sum(
            cost(limit, sent["max_tokens"])
            for (status, _, _), sent in zip(results, bodies(500), strict=True)
            if status == 200
        )
        shown = usage.json()
        assert round(shown["used"]["usd_this_month"] * 1e9) == spent
        assert shown["chargeback"] == {"input_per_million": 1.0, "output_per_million": 2.0}
        assert shown["remaining"]["monthly_budget_usd"] == pytest.approx(BUDGET_USD - spent / 1e9)


def test_a_request_naming_no_max_tokens_gets_a_bound_only_when_its_tenant_has_token_limits(
    mock, keys, run_gateway
):
    upstream, url = mock
    tenants = [
        keys.tenant("metered", tpm=100_000),
        keys.tenant("capped", monthly_token_budget=100_000, max_tokens_cap=8),
        keys.tenant("free", rpm=100),
    ]
    config = keys.config([backend(url, "1")], tenants, limits={"default_max_tokens": 64})
    with run_gateway(config) as base:
        asked = {}
        for name in ("metered", "capped", "free"):
            headers = {"Authorization": f"Bearer {keys.key(name)}"}
            body = chat(max_tokens=None)
            r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200
            asked[name] = upstream.requests[-1].get("max_tokens")
    assert asked == {"metered": 64, "capped": 8, "free": None}


class Spy:
    """The gateway's limiter, recording each admission's hold and each settlement."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.holds: list[Hold] = []
        self.settled: list[tuple[Hold, int]] = []
        self.nanos: list[int] = []  # what each settlement charged in money

    async def admit(self, tenant: TenantSpec, reserved: int, nanos: int = 0) -> Hold | None:
        hold = await self.inner.admit(tenant, reserved, nanos)
        self.holds.append(hold)
        return hold

    async def settle(
        self, tenant: TenantSpec, hold: Hold | None, tokens: int, nanos: int = 0
    ) -> None:
        self.nanos.append(nanos)
        self.settled.append((hold, tokens))
        await self.inner.settle(tenant, hold, tokens, nanos)

    def wait_settled(self, count: int) -> list[int]:
        """The tokens each request was settled with, once `count` have been."""
        deadline = time.monotonic() + 10
        while len(self.settled) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.holds) == len(self.settled) == count
        assert sorted(map(id, self.holds)) == sorted(id(h) for h, _ in self.settled)  # once each
        return [tokens for _, tokens in self.settled]


def spied(app) -> Spy:
    endpoints = [r.endpoint for r in app.routes if isinstance(r.endpoint, Completions)]
    spy = Spy(endpoints[0].limiter)
    for endpoint in endpoints:
        endpoint.limiter = spy
    return spy


@pytest.fixture
def slow_mock():
    upstream = MockUpstream(chunk_delay_s=0.02)
    with serve(upstream) as url:
        yield upstream, url


# alice's money: 1,000 nano-dollars a prompt token, 2,000 a completion token
ALICE_RATE = {"input_per_million": 1.0, "output_per_million": 2.0}


def metered(keys, url: str, **extra):
    return keys.config(
        [backend(url, "1")],
        [keys.tenant("alice", tpm=1_000_000, monthly_budget_usd=1000.0)],
        timeouts={"connect_s": 1, "read_s": 0.3},
        limits={"chargeback": {"tenants": {"alice": ALICE_RATE}}},
        **extra,
    )


def money_for(prompt_tokens: int, total_tokens: int) -> int:
    return 1000 * prompt_tokens + 2000 * (total_tokens - prompt_tokens)


def test_every_admitted_request_is_settled_once_however_it_ends(slow_mock, keys, home):
    upstream, url = slow_mock
    app = build_app(metered(keys, url), home)
    spy = spied(app)
    headers = {"Authorization": f"Bearer {keys.key('alice')}"}
    with serve(app) as base:

        def post(body: dict) -> int:
            return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers).status_code

        assert post(chat("one two", max_tokens=4)) == 200
        assert post(chat("one two", max_tokens=4, stream=True)) == 200
        upstream.faults["served-1"] = Fault(status=500, times=1)
        assert post(chat(max_tokens=4)) == 500  # the backend's own error, passed on
        upstream.faults["served-1"] = Fault(delay_s=1, times=1)
        assert post(chat(max_tokens=4)) == 504  # raised inside the endpoint
        upstream.faults["served-1"] = Fault(break_after=2, times=1)
        assert post(chat("one", max_tokens=4, stream=True)) == 200  # broken off after 2 chunks
        assert spy.wait_settled(5) == [6, 6, 0, 0, 3]
        # money is charged for the same tokens: 2 prompt tokens ("one two"), 1 ("one")
        assert spy.nanos == [money_for(2, 6), money_for(2, 6), 0, 0, money_for(1, 3)]
        assert all(hold.nanos > 0 for hold in spy.holds)  # each held its worst case first
        body = chat("one two three", max_tokens=200, stream=True)
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as r:
            read = 0
            for line in r.iter_lines():
                read += line.startswith("data: ")
                if read == 3:
                    break  # leaving the block hangs up
        gone = spy.wait_settled(6)[-1]
    assert 3 + 3 <= gone < 3 + 200  # charged what was generated until the client left
    assert spy.nanos[-1] == money_for(3, gone)  # in money too


def test_a_cancelled_request_is_settled_once_with_the_tokens_it_made(slow_mock, keys, home):
    _, url = slow_mock
    app = build_app(metered(keys, url), home)
    spy = spied(app)
    payload = json.dumps(chat("one two", max_tokens=200, stream=True)).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {keys.key('alice')}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def run() -> list[dict]:
        messages: list[dict] = []
        bodies = [{"type": "http.request", "body": payload, "more_body": False}]

        async def receive() -> dict:
            if bodies:
                return bodies.pop()
            await asyncio.Event().wait()  # the client never leaves: the task is cancelled

        async def send(message: dict) -> None:
            messages.append(message)

        async with app.router.lifespan_context(app):
            task = asyncio.ensure_future(app(scope, receive, send))
            while sum(m.get("more_body", False) for m in messages) < 3:
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return messages

    asyncio.run(run())
    [tokens] = spy.wait_settled(1)
    assert 2 + 3 <= tokens < 2 + 200
    assert spy.nanos == [money_for(2, tokens)]


@pytest.fixture
def alice() -> TenantSpec:
    return TenantSpec(name="alice", key_sha256="0" * 64, monthly_token_budget=100)


def test_redis_settle_without_a_hold_charges_once_and_never_goes_negative(redis_prefix, alice):
    month = datetime.now(UTC).strftime("%Y-%m")

    async def run() -> None:
        limiter = RedisLimiter(REDIS_URL, redis_prefix, hold_ttl_s=900)
        await limiter.open()
        try:
            await limiter.settle(alice, None, 5)  # admitted while Redis was down: nothing held
            hold = await limiter.admit(alice, 10)
            await limiter.settle(alice, Hold(hold.tokens, hold.second - 1), 0)  # no such hold
            await limiter.settle(alice, hold, 7)
            await limiter.settle(alice, Hold(30, hold.second), 0)  # a hold already lapsed
        finally:
            await limiter.close()

    asyncio.run(run())
    assert int(redis_int("get", f"{redis_prefix}alice:budget:{month}")) == 12
    assert redis_int("hlen", f"{redis_prefix}alice:held") == 0


def test_redis_unreachable_fails_each_limit_open_or_closed_by_policy(alice, caplog):
    tpm_only = TenantSpec(name="bob", key_sha256="1" * 64, tpm=1000)

    async def run(policy: OutagePolicy) -> tuple[Hold | None, Counter]:
        limiter = RedisLimiter("redis://127.0.0.1:1/0", "slipway-test-down:", 900, policy)
        await limiter.open()
        try:
            hold = await limiter.admit(tpm_only, 10)  # tpm fails open by default
            await limiter.settle(tpm_only, hold, 7)
            with pytest.raises(Unavailable, match="alice's monthly_token_budget fails closed"):
                await limiter.admit(alice, 10)
            return hold, limiter.outages
        finally:
            await limiter.close()

    hold, outages = asyncio.run(run(OutagePolicy()))
    assert hold is None and outages == {"admitted": 1, "refused": 1}
    assert "rate-limit store unreachable" in caplog.text and "7 tokens of 'bob'" in caplog.text
    assert caplog.text.count("limits fail as limits.on_store_down says") == 1  # not per request

    with pytest.raises(Unavailable, match="bob's tpm fails closed"):
        asyncio.run(run(OutagePolicy(tpm="closed")))


def test_a_money_budget_fails_closed_while_redis_is_unreachable():
    carol = TenantSpec(name="carol", key_sha256="2" * 64, monthly_budget_usd=5.0)

    async def run() -> None:
        limiter = RedisLimiter("redis://127.0.0.1:1/0", "slipway-test-down:", 900)
        await limiter.open()
        try:
            with pytest.raises(Unavailable, match="carol's monthly_budget_usd fails closed"):
                await limiter.admit(carol, 10, 5_000)
        finally:
            await limiter.close()

    asyncio.run(run())
