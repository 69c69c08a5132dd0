"""What a tenant is told about its limits: x-ratelimit-* headers on every admitted response and
GET /v1/usage, in process and through Redis; and what each limit does when Redis goes away
mid-load (its own redis-server, stopped and started again)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from configs.gateway import StateSpec
from serving.gateway.spend import SPEND, SpendBook
from serving.gateway.state import store_for
from tests.serving.conftest import REDIS_URL, backend, chat, post_many


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def ask(base: str, key: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=bearer(key))


@pytest.fixture(params=["local", "redis"])
def shared(request) -> dict:
    if request.param == "local":
        return {}
    return {"redis_url": REDIS_URL, "redis_prefix": request.getfixturevalue("redis_prefix")}


def test_each_response_says_what_is_left_of_the_minute_until_the_limit_refuses(
    mock, keys, run_gateway, shared
):
    _, url = mock
    tenant = keys.tenant("alice", rpm=4, tpm=100_000)
    with run_gateway(keys.config([backend(url, "1")], [tenant], **shared)) as base:
        seen = []
        for _ in range(4):
            r = httpx.post(
                f"{base}/v1/chat/completions", json=chat(), headers=bearer(keys.key("alice"))
            )
            assert r.status_code == 200, r.text
            seen.append(r)
        refused = ask(base, keys.key("alice"))
    assert refused.status_code == 429
    assert [r.headers["x-ratelimit-remaining-requests"] for r in seen] == ["3", "2", "1", "0"]
    assert {r.headers["x-ratelimit-limit-requests"] for r in seen} == {"4"}
    assert {r.headers["x-ratelimit-limit-tokens"] for r in seen} == {"100000"}
    assert all(1 <= int(r.headers["x-ratelimit-reset-requests"].rstrip("s")) <= 60 for r in seen)
    left = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in seen]
    assert left == sorted(left, reverse=True) and len(set(left)) == 4  # each request's tokens
    assert 0 < 100_000 - left[0] < 200  # only the first request's reservation: "hello", 2 tokens


def test_a_tenant_without_limits_gets_no_ratelimit_headers(mock, keys, run_gateway):
    _, url = mock
    with run_gateway(keys.config([backend(url, "1")])) as base:
        r = httpx.post(
            f"{base}/v1/chat/completions", json=chat(), headers=bearer(keys.key("alice"))
        )
    assert r.status_code == 200
    assert not [h for h in r.headers if h.startswith("x-ratelimit")]


def test_a_tenant_reads_its_own_usage_and_what_is_left(mock, keys, run_gateway, shared):
    _, url = mock
    tenants = [
        keys.tenant("alice", tier="premium", rpm=50, monthly_token_budget=10_000),
        keys.tenant("bob"),
    ]
    with run_gateway(keys.config([backend(url, "1")], tenants, **shared)) as base:
        replies = asyncio.run(post_many(base, keys.key("alice"), [chat()] * 6, concurrency=3))
        mine = httpx.get(f"{base}/v1/usage", headers=bearer(keys.key("alice"))).json()
        theirs = httpx.get(f"{base}/v1/usage", headers=bearer(keys.key("bob"))).json()
    charged = sum(
        httpx.Response(200, content=body).json()["usage"]["total_tokens"] for _, _, body in replies
    )
    assert mine["tenant"] == "alice" and mine["tier"] == "premium"
    assert mine["used"]["requests_this_minute"] == 6
    assert mine["used"]["tokens_this_month"] == charged > 0
    assert mine["used"]["tokens_held"] == 0  # all settled
    assert mine["remaining"] == {
        "requests_this_minute": 44,
        "tokens_this_minute": None,  # no tpm
        "monthly_token_budget": 10_000 - charged,
        "monthly_budget_usd": None,  # no money budget
    }
    assert theirs["tenant"] == "bob" and theirs["used"]["requests_this_minute"] == 0


# ---- Redis outage --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A redis-server of this test's own, to stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is not installed (.ci/run installs it)"
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    redis = OwnRedis()
    redis.start()
    yield redis
    if redis.proc is not None and redis.proc.poll() is None:
        redis.stop()


def test_when_redis_stops_mid_load_the_budget_fails_closed_and_the_request_rate_open(
    mock, keys, run_gateway, own_redis, caplog
):
    _, url = mock
    tenants = [
        keys.tenant("metered", monthly_token_budget=1_000_000),
        keys.tenant("chatty", rpm=10_000),
    ]
    config = keys.config([backend(url, "1")], tenants, redis_url=own_redis.url)

    def status(base: str, tenant: str) -> int:
        reply = httpx.post(
            f"{base}/v1/chat/completions", json=chat(), headers=bearer(keys.key(tenant))
        )
        return reply.status_code

    with run_gateway(config) as base:
        before = asyncio.run(post_many(base, keys.key("metered"), [chat()] * 20, concurrency=4))
        assert {s for s, _, _ in before} == {200}
        own_redis.stop()
        down = {t: [status(base, t) for _ in range(10)] for t in ("metered", "chatty")}
        refused = ask(base, keys.key("metered"))
        metrics = httpx.get(f"{base}/metrics").text
        own_redis.start()  # the same port: the pool reconnects
        after = [status(base, "metered") for _ in range(3)]

    assert down == {"metered": [503] * 10, "chatty": [200] * 10}
    error = refused.json()["error"]
    assert error["code"] == "limits_unavailable"
    assert "'metered's monthly_token_budget fails closed" in error["message"]
    assert refused.headers["retry-after"] == "1"
    assert 'slipway_gateway_limits_store_down_total{decision="admitted"} 10.0' in metrics
    assert 'slipway_gateway_limits_store_down_total{decision="refused"} 11.0' in metrics
    assert caplog.text.count("limits fail as limits.on_store_down says") == 1  # not one per request
    assert after == [200, 200, 200]


# ---- monthly budget across restarts --------------------------------------------------------------


# 200 tokens, or what 200 completion tokens cost at 1 dollar per million
@pytest.mark.parametrize(
    ("limit", "value", "spent"),
    [
        ("monthly_token_budget", 200, "tokens_this_month"),
        ("monthly_budget_usd", 2e-4, "usd_this_month"),
    ],
)
def test_a_monthly_budget_outlives_a_restart_without_redis(
    mock, keys, run_gateway, limit, value, spent
):
    _, url = mock
    tenant = keys.tenant("alice", **{limit: value})
    rate = {"input_per_million": 1.0, "output_per_million": 1.0}
    config = keys.config(
        [backend(url, "1")], [tenant], limits={"chargeback": {"tenants": {"alice": rate}}}
    )
    key = keys.key("alice")
    with run_gateway(config) as base:
        assert all(ask(base, key).status_code == 200 for _ in range(5))
        before = httpx.get(f"{base}/v1/usage", headers=bearer(key)).json()["used"]
    assert before[spent] > 0

    with run_gateway(config) as base:  # the same store under the same SLIPWAY_HOME
        again = httpx.get(f"{base}/v1/usage", headers=bearer(key)).json()["used"]
        assert again[spent] == before[spent]
        while (reply := ask(base, key)).status_code == 200:
            pass
        after = httpx.get(f"{base}/v1/usage", headers=bearer(key)).json()["used"]
    assert reply.status_code == 429 and reply.json()["error"]["code"] == "insufficient_quota"
    assert before[spent] < after[spent] <= value  # never over, across the restart


def test_two_instances_adding_charges_to_one_store_lose_none(home):
    async def run() -> int:
        stores = [store_for(StateSpec(), home) for _ in range(2)]
        for store in stores:
            await store.open()
        books = [SpendBook(store, interval_s=0.01) for store in stores]
        for book in books:
            await book.open()
        for i in range(200):
            books[i % 2].add("alice", "2026-12", 3)
            if i % 7 == 0:
                await asyncio.sleep(0.005)  # flushes run in between, racing each other
        for book in books:
            await book.close()
        total = (await stores[0].read(SPEND)).records["alice|2026-12"].value["tokens"]
        for store in stores:
            await store.close()
        return total

    assert asyncio.run(run()) == 600


def test_a_charge_whose_write_is_in_flight_at_shutdown_is_stored_once(home):
    """The store commits a write and its caller is still waiting when the gateway shuts down:
    cancelling the writer then would keep the batch pending and store it twice."""

    async def run() -> int:
        store = store_for(StateSpec(), home)
        await store.open()
        writing = asyncio.Event()
        commit = store.write

        async def slow_write(*args, **kwargs):
            await commit(*args, **kwargs)
            writing.set()
            await asyncio.sleep(0.2)  # committed; the caller has not heard back yet

        store.write = slow_write
        book = SpendBook(store, interval_s=0.01)
        await book.open()
        book.add("alice", "2026-12", 5)
        await writing.wait()
        await book.close()
        total = (await store.read(SPEND)).records["alice|2026-12"].value["tokens"]
        await store.close()
        return total

    assert asyncio.run(run()) == 5
