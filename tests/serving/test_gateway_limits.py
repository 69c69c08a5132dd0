"""Tenant limits: exact under 1000 racing requests, in one process and across two sharing Redis;
requests in flight at once, exact and released when each is done."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from tests.serving.conftest import REDIS_URL, backend, chat, post_many


def wide(url: str) -> dict:
    return backend(url, "1", max_concurrency=2000)


def test_exactly_rpm_requests_admitted_in_process(mock, keys, run_gateway):
    _, url = mock
    config = keys.config([wide(url)], [keys.tenant("alice", rpm=100)])
    with run_gateway(config) as base:
        rs = asyncio.run(post_many(base, keys.key("alice"), [chat()] * 1000, concurrency=1000))
    statuses = [status for status, _, _ in rs]
    assert statuses.count(200) == 100 and statuses.count(429) == 900
    limited = next(h for status, h, _ in rs if status == 429)
    assert 1 <= int(limited["Retry-After"]) <= 60


def test_exactly_rpm_requests_admitted_across_two_instances(mock, keys, run_gateway, redis_prefix):
    _, url = mock
    config = keys.config(
        [wide(url)], [keys.tenant("alice", rpm=100)], redis_url=REDIS_URL, redis_prefix=redis_prefix
    )
    with run_gateway(config) as one, run_gateway(config) as two:

        async def both():
            # One request on each instance first, so both are known to draw on the shared count;
            # which instance wins the race that follows is up to the scheduler.
            opening = [
                *await post_many(one, keys.key("alice"), [chat()], concurrency=1),
                *await post_many(two, keys.key("alice"), [chat()], concurrency=1),
            ]
            race = await asyncio.gather(
                post_many(one, keys.key("alice"), [chat()] * 499, concurrency=499),
                post_many(two, keys.key("alice"), [chat()] * 499, concurrency=499),
            )
            return opening, race[0] + race[1]

        opening, race = asyncio.run(both())
    assert [s for s, _, _ in opening] == [200, 200]
    statuses = [s for s, _, _ in opening + race]
    assert statuses.count(200) == 100 and statuses.count(429) == 900  # one shared limit, not two


@pytest.mark.parametrize("shared", [False, True])
def test_token_limits_and_budget(mock, keys, run_gateway, redis_prefix, shared):
    _, url = mock
    tenants = [keys.tenant("alice", tpm=17), keys.tenant("bob", monthly_token_budget=17)]
    extra = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix} if shared else {}
    limits = {"template_tokens_per_message": 0}
    with run_gateway(keys.config([wide(url)], tenants, limits=limits, **extra)) as base:

        def post(tenant: str, **body):
            return httpx.post(
                f"{base}/v1/chat/completions",
                json=chat("one two", **body),
                headers={"Authorization": f"Bearer {keys.key(tenant)}"},
            )

        # Each call holds 7 prompt bytes + max_tokens 4 = 11 and uses 2 prompt + 4 completion = 6
        # tokens, streamed or not: a third call is refused with 5 tokens left, which cannot hold 11.
        r = post("alice", max_tokens=20)  # 27 held: more than the whole limit, never admitted
        assert r.status_code == 400 and r.json()["error"]["code"] == "reservation_over_limit"
        assert post("alice", max_tokens=4).status_code == 200
        assert post("alice", max_tokens=4, stream=True).status_code == 200
        r = post("alice", max_tokens=4)
        assert (
            r.status_code == 429
            and r.json()["error"]["type"] == "tokens"
            and int(r.headers["Retry-After"]) >= 1
        )
        assert post("bob", max_tokens=4).status_code == 200
        assert post("bob", max_tokens=4).status_code == 200
        r = post("bob", max_tokens=4)
        assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
        assert "monthly token budget" in r.json()["error"]["message"]


@pytest.mark.parametrize("shared", [False, True], ids=["one-instance", "two-sharing-redis"])
def test_exactly_max_inflight_requests_at_once_and_released_when_done(
    keys, run_gateway, redis_prefix, shared
):
    upstream = MockUpstream(delay_s=1.0)  # every request in flight for a second
    tenants = [keys.tenant("alice", max_inflight=3), keys.tenant("bob")]
    extra = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix} if shared else {}
    with serve(upstream) as url:
        config = keys.config([wide(url)], tenants, **extra)
        with run_gateway(config) as one, run_gateway(config) as two:
            bases = (one, two) if shared else (one, one)

            async def burst() -> list[int]:
                racing = await asyncio.gather(
                    *(
                        post_many(b, keys.key("alice"), [chat()] * 10, concurrency=10)
                        for b in bases
                    ),
                    post_many(one, keys.key("bob"), [chat()] * 5, concurrency=5),
                )
                alice = [s for r in racing[:-1] for s, _, _ in r]
                assert [s for s, _, _ in racing[-1]] == [200] * 5  # another tenant is not held
                return alice

            first = asyncio.run(burst())
            again = asyncio.run(burst())  # every slot was released when its request ended
    assert first.count(200) == 3 and first.count(429) == 17
    assert again.count(200) == 3 and again.count(429) == 17


def test_a_client_that_hangs_up_gives_its_in_flight_slot_back(keys, run_gateway):
    upstream = MockUpstream(chunk_delay_s=0.05)
    with serve(upstream) as url:
        config = keys.config([wide(url)], [keys.tenant("alice", max_inflight=1)])
        headers = {"Authorization": f"Bearer {keys.key('alice')}"}
        body = chat(max_tokens=200, stream=True)
        with run_gateway(config) as base:
            post = f"{base}/v1/chat/completions"
            with httpx.stream("POST", post, json=body, headers=headers) as r:
                lines = r.iter_lines()  # held: a generator dropped closes the response
                next(lines)
                assert httpx.post(post, json=chat(), headers=headers).status_code == 429
            # The stream is gone: its slot comes back once the gateway has seen the hang-up.
            statuses = []
            for _ in range(50):
                statuses.append(httpx.post(post, json=chat(), headers=headers).status_code)
                if statuses[-1] == 200:
                    break
                time.sleep(0.02)
    assert statuses[-1] == 200 and len(statuses) < 50
