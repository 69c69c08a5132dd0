"""The queue in front of a full backend: a higher tier goes first, tenants of a tier share by
weighted fair queuing (one tenant's 40 waiting requests do not hold back four others' few), a
bounded queue and bounded waits answer 503 with Retry-After, and a tier's priority reaches vLLM
where the backend runs priority scheduling. Against the mock upstream, with its service time
making the backend's capacity known."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import aiohttp
import httpx
import pytest

from configs.gateway import QueueSpec, Tenant
from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from serving.gateway.exchange import Exchange
from serving.gateway.queue import FairQueue, give_slot, take_now, take_slot
from serving.gateway.usage import read_usage
from tests.serving.conftest import MODEL, backend, chat

TIERS = {"premium": {"priority": 10}, "batch": {"priority": 0}}


async def fire(base: str, key: str, body: dict, **headers: str) -> tuple[int, float, dict]:
    """One request: its status, when it finished (monotonic) and its body."""
    sent = {"Authorization": f"Bearer {key}", **headers}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/chat/completions", json=body, headers=sent) as r,
    ):
        return r.status, time.monotonic(), await r.json()


async def waiting(base: str) -> str:
    """The backend's waiting gauge, as /metrics shows it."""
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
        text = await r.text()
    line = f'slipway_gateway_backend_waiting{{model="{MODEL}",role="stable",version="1"}} '
    return text.split(line, 1)[1].split("\n", 1)[0]


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def test_a_higher_tier_waiting_goes_first(keys, run_gateway):
    upstream = MockUpstream(delay_s=0.2)
    with serve(upstream) as url:
        tenants = [keys.tenant("bob", tier="batch"), keys.tenant("pat", tier="premium")]
        config = keys.config(
            [backend(url, "1", max_concurrency=1)],
            tenants,
            queue={"max_waiting": 50, "tiers": TIERS},
        )
        with run_gateway(config) as base:

            async def go():
                batch = [
                    asyncio.ensure_future(fire(base, keys.key("bob"), chat(f"b{i}")))
                    for i in range(6)
                ]
                await asyncio.sleep(0.1)  # one batch request in flight, five waiting
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{base}/metrics") as r,
                ):
                    metrics = await r.text()
                premium = await fire(base, keys.key("pat"), chat("p"))
                return await asyncio.gather(*batch), premium, metrics

            batch, premium, metrics = asyncio.run(go())
    assert 'slipway_gateway_backend_waiting{model="tiny-chat",role="stable",version="1"} 5.0' in (
        metrics
    )
    assert {status for status, _, _ in batch} == {200} and premium[0] == 200
    # Only the batch request already in flight finished before it.
    assert sum(done < premium[1] for _, done, _ in batch) == 1


def test_tenants_of_a_tier_share_a_full_backend_fairly(keys, run_gateway):
    upstream = MockUpstream(delay_s=0.05)  # 2 slots: 40 requests/s
    with serve(upstream) as url:
        light = ["lia", "leo", "lou", "lux"]
        tenants = [keys.tenant("hank"), *(keys.tenant(n) for n in light)]
        config = keys.config(
            [backend(url, "1", max_concurrency=2)],
            tenants,
            queue={"max_waiting": 100, "default": {"max_wait_s": 30}},
        )
        with run_gateway(config) as base:

            async def go():
                heavy = [
                    asyncio.ensure_future(fire(base, keys.key("hank"), chat(f"hank {i}")))
                    for i in range(40)
                ]
                await asyncio.sleep(0.02)  # hank's 40 are in: 2 in flight, 38 waiting
                start = time.monotonic()
                small = [
                    fire(base, keys.key(name), chat(f"{name} {i}"))
                    for name in light
                    for i in range(3)
                ]
                return start, await asyncio.gather(*small), await asyncio.gather(*heavy)

            start, small, heavy = asyncio.run(go())
    assert {s for s, _, _ in small + heavy} == {200}  # everyone served in the end
    order = [r["messages"][0]["content"].split()[0] for r in upstream.requests]
    # Each light tenant's 3 were interleaved with hank's next 3, not queued behind his 38.
    last_light = max(i for i, who in enumerate(order) if who != "hank")
    assert last_light < 2 + 5 * 3, order
    waits = [
        sum(done - start for _, done, _ in small[k * 3 : k * 3 + 3]) / 3 for k in range(len(light))
    ]
    assert jain(waits) >= 0.9, waits


def test_a_full_queue_and_a_wait_past_its_limit_are_503_with_retry_after(keys, run_gateway):
    upstream = MockUpstream(delay_s=0.5)
    with serve(upstream) as url:
        config = keys.config(
            [backend(url, "1", max_concurrency=1)],
            queue={"max_waiting": 1, "default": {"max_wait_s": 0.2}},
        )
        with run_gateway(config) as base:

            async def go():
                first = asyncio.ensure_future(fire(base, keys.key("alice"), chat("one")))
                await asyncio.sleep(0.1)
                waits = asyncio.ensure_future(fire(base, keys.key("alice"), chat("two")))
                await asyncio.sleep(0.05)
                full = await fire(base, keys.key("alice"), chat("three"))
                return await first, await waits, full

            first, waited, full = asyncio.run(go())
    assert first[0] == 200
    assert (
        waited[0] == 503
        and "for the 0.2 s this request could wait" in waited[2]["error"]["message"]
    )
    assert full[0] == 503 and "1 waiting" in full[2]["error"]["message"]
    assert [r["messages"][0]["content"] for r in upstream.requests] == ["one"]


def test_a_tiers_priority_reaches_a_backend_with_priority_scheduling(mock, keys, run_gateway):
    upstream, url = mock
    tenants = [keys.tenant("pat", tier="premium"), keys.tenant("bob", tier="batch")]
    backends = [backend(url, "1", priority_scheduling=True)]
    config = keys.config(backends, tenants, queue={"tiers": TIERS})
    with run_gateway(config) as base:
        for who in ("pat", "bob"):
            auth = {"Authorization": f"Bearer {keys.key(who)}"}
            assert httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=auth).is_success
    # vLLM serves a lower value first.
    assert [r["priority"] for r in upstream.requests] == [-10, 0]


def test_a_client_that_hangs_up_while_waiting_leaves_the_queue_at_once(keys, run_gateway):
    """Its request is never sent, its place is freed while the request ahead still runs, and the
    slot it would have had goes to the next request; its usage row says it left."""
    upstream = MockUpstream(delay_s=3.0)
    with serve(upstream) as url:
        config = keys.config(
            [backend(url, "1", max_concurrency=1)],
            [keys.tenant("bob")],
            queue={"max_waiting": 10, "default": {"max_wait_s": 30}},
        )
        key = keys.key("bob")
        start = time.time()
        with run_gateway(config) as base:

            async def until(gauge: str) -> None:
                deadline = time.monotonic() + 10
                while await waiting(base) != gauge:
                    assert time.monotonic() < deadline, f"the waiting gauge never read {gauge}"
                    await asyncio.sleep(0.02)

            async def go():
                first = asyncio.ensure_future(fire(base, key, chat("first")))
                while not upstream.requests:  # in flight, for 3 s
                    await asyncio.sleep(0.02)
                leaver = asyncio.ensure_future(fire(base, key, chat("leaver")))
                await until("1.0")
                leaver.cancel()  # the client hangs up: its connection is closed
                await until("0.0")
                assert not first.done()  # the place was freed before any slot was
                return await first, await fire(base, key, chat("third"))

            first, third = asyncio.run(go())
    assert first[0] == third[0] == 200
    sent = [r["messages"][0]["content"] for r in upstream.requests]
    assert sent == ["first", "third"]
    rows = read_usage(start, time.time() + 1)
    left = rows[rows.status == 499]
    assert list(left.error_kind) == ["client_disconnected"] and list(left.completion_tokens) == [0]


class _Full:
    """A backend's slot accounting only, at its limit of one request in flight."""

    def __init__(self) -> None:
        self.inflight, self.max_concurrency, self.waiting = 1, 1, FairQueue()
        self.by_tier = Counter({"default": 1})


async def _forever() -> dict:
    await asyncio.Event().wait()
    return {}


def _waiter(name: str):
    exchange = Exchange("chat", name)
    exchange.tenant = Tenant(name=name)
    return exchange


@pytest.mark.parametrize("slot_handed_first", [False, True])
def test_a_request_cancelled_while_it_waits_leaves_no_place_and_no_slot_behind(slot_handed_first):
    """Cancelled (a shutdown, its handler torn down) while waiting: its place is freed, and a slot
    handed to it in the same instant goes to the next waiter, so the backend's count is exact."""
    queue = QueueSpec(max_waiting=5, default={"max_wait_s": 30})

    async def go() -> tuple[int, int, bool]:
        backend = _Full()
        first = asyncio.ensure_future(take_slot(backend, _waiter("a"), queue, "v1", _forever))
        second = asyncio.ensure_future(take_slot(backend, _waiter("b"), queue, "v1", _forever))
        await asyncio.sleep(0.01)
        assert backend.waiting.live == 2
        if slot_handed_first:
            give_slot(
                backend, queue, "default"
            )  # the slot goes to the first waiter, which is cancelled at once
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.sleep(0.01)
        if not slot_handed_first:
            give_slot(
                backend, queue, "default"
            )  # the request in flight is done: its slot is the second's
        await asyncio.wait_for(second, 1)
        return backend.inflight, backend.waiting.live, first.cancelled()

    assert asyncio.run(go()) == (1, 0, True)


def _backend(slots: int):
    from configs.gateway import BackendSpec, BreakerSpec
    from serving.gateway.routing import Backend

    spec = BackendSpec.model_validate(backend("http://127.0.0.1:9", "1", max_concurrency=slots))
    return Backend(MODEL, spec, BreakerSpec(), 16)


def _of(tier: str, name: str = "t"):
    exchange = Exchange("chat", name)
    exchange.tenant = Tenant(name=name, tier=tier)
    return exchange


def test_a_reserved_share_is_lent_while_idle_and_kept_while_its_tier_is_active():
    """enterprise keeps half of 4 slots: while it sends nothing, batch may use all 4; once it has
    a request in flight, batch gets no more than it leaves (4 - its 2), and freed slots go to
    enterprise first while it holds fewer than 2, though batch waited longer at a higher
    priority."""
    queue = QueueSpec(
        max_waiting=10,
        tiers={"enterprise": {"reserved_share": 0.5}, "batch": {"priority": 5}},
        default={"max_wait_s": 30},
    )

    async def go() -> None:
        b = _backend(4)
        assert all(take_now(b, queue, "batch") for _ in range(4))  # lent: enterprise is idle
        assert not take_now(b, queue, "batch")
        batch = asyncio.ensure_future(take_slot(b, _of("batch", "b"), queue, "v1", _forever))
        await asyncio.sleep(0.01)
        ent = [
            asyncio.ensure_future(take_slot(b, _of("enterprise", f"e{i}"), queue, "v1", _forever))
            for i in range(2)
        ]
        await asyncio.sleep(0.01)
        give_slot(b, queue, "batch")  # goes to enterprise, below its share, not to batch
        await asyncio.sleep(0.01)
        assert ent[0].done() and not batch.done() and b.by_tier["enterprise"] == 1
        give_slot(b, queue, "batch")
        await asyncio.sleep(0.01)
        assert ent[1].done() and not batch.done() and b.by_tier["enterprise"] == 2
        # enterprise holds its share: a freed slot may now go to batch.
        give_slot(b, queue, "batch")
        await asyncio.sleep(0.01)
        assert batch.done() and dict(b.by_tier) == {"batch": 2, "enterprise": 2}
        # Enterprise down to one in flight: it still keeps one slot free from batch.
        give_slot(b, queue, "enterprise")
        assert b.inflight == 3 and not take_now(b, queue, "batch")
        assert take_now(b, queue, "enterprise")  # its own share
        # Enterprise idle again: its share is lent.
        give_slot(b, queue, "enterprise")
        give_slot(b, queue, "enterprise")
        assert take_now(b, queue, "batch") and take_now(b, queue, "batch")
        assert b.inflight == 4 and b.by_tier["batch"] == 4

    asyncio.run(go())


def test_reserved_shares_beyond_every_slot_or_on_the_default_tier_are_refused():
    with pytest.raises(ValueError, match="reserve more than every slot"):
        QueueSpec(tiers={"a": {"reserved_share": 0.6}, "b": {"reserved_share": 0.5}})
    with pytest.raises(ValueError, match="only a named tier may reserve"):
        QueueSpec(default={"reserved_share": 0.2})


@pytest.mark.parametrize("seed", range(8))
def test_no_slot_stays_free_while_a_request_it_may_go_to_waits(seed):
    """Work conservation, over random arrivals and completions of three tiers, one keeping a
    reserved share: whenever a request waits, each free slot is one the reserved share of another
    active tier keeps from it (an active tier below its own share never waits beside a free
    slot), and with no shares kept, no slot is free while anyone waits."""
    rng = random.Random(seed)
    queue = QueueSpec(
        max_waiting=1000,
        tiers={
            "enterprise": {"reserved_share": 0.5, "priority": 1},
            "standard": {"priority": 5},
            "batch": {"priority": 0},
        },
        default={"max_wait_s": 300},
    )
    slots, share = 4, 2  # enterprise keeps half of 4 slots while it is active

    def kept_from(b, tier: str) -> int:
        active = b.by_tier["enterprise"] or b.waiting.tiers["enterprise"]
        return max(0, share - b.by_tier["enterprise"]) if tier != "enterprise" and active else 0

    async def go() -> int:
        b = _backend(slots)
        tasks: list[tuple[str, asyncio.Future]] = []
        waited = 0
        for i in range(400):
            holders = [(t, f) for t, f in tasks if f.done()]
            if holders and rng.random() < 0.45:
                tier, task = holders[rng.randrange(len(holders))]
                tasks.remove((tier, task))
                give_slot(b, queue, tier)
            else:
                tier = rng.choice(["enterprise", "standard", "batch"])
                request = _of(tier, f"{tier}-{rng.randrange(3)}")
                tasks.append(
                    (tier, asyncio.ensure_future(take_slot(b, request, queue, "v1", _forever)))
                )
            for _ in range(3):
                await asyncio.sleep(0)
            free = slots - b.inflight
            for tier, waiting in b.waiting.tiers.items():
                if waiting:
                    waited += 1
                    assert free <= kept_from(b, tier), (i, tier, free, dict(b.by_tier))
        for _, task in tasks:
            task.cancel()
        await asyncio.gather(*(t for _, t in tasks), return_exceptions=True)
        return waited

    assert asyncio.run(go()) > 50  # the queue was busy, not idle, for the check to mean anything
