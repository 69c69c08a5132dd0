"""Two gateway processes behind one port (SO_REUSEPORT), on one state store and one Redis: both
serve, /admin/stats asked of either adds up both instances' windows exactly, and a tenant's
request rate holds exactly across them. The rollout judged across both is in
tests/flows/test_rollout_instances.py."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from serving.gateway.auth import key_hash
from serving.gateway.mirror import PairLog
from serving.gateway.peers import Answer, Peer
from serving.gateway.stats import BackendStats
from serving.gateway.stats_merge import merge
from tests.serving.conftest import MODEL, REDIS_URL, SIGNER, backend, chat
from tests.serving.instances import fresh, stats, together, two_gateways


@pytest.fixture
def gateways(mock, keys, redis_prefix, tmp_path):
    """Both processes on v1 (stable) and v2 (canary) at 50/50; alice unlimited, bob at 50 rpm."""
    _, url = mock
    config = {
        "admin_token_sha256": key_hash(keys.admin),
        "routes": [
            {
                "model": MODEL,
                "backends": [backend(url, "1", weight=50), backend(url, "2", "canary", 50)],
            }
        ],
        "tenants": [keys.tenant("alice"), keys.tenant("bob", rpm=50)],
        "redis_url": REDIS_URL,
        "redis_prefix": redis_prefix,
        "state": {"url": REDIS_URL, "redis_prefix": redis_prefix, "poll_interval_s": 0.05},
        "usage": {"url": f"sqlite:///{tmp_path / 'usage.sqlite'}"},
        "trust": SIGNER.trust(),
        "instances": {"heartbeat_s": 0.5},
    }
    with two_gateways(config, tmp_path, keys.admin) as base:
        yield base


def test_statistics_asked_of_either_instance_add_up_both_exactly(gateways, keys):
    served: Counter[str] = Counter()
    with fresh(gateways, keys.key("alice")) as client:
        for _ in range(120):
            r = client.post("/v1/chat/completions", json=chat())
            assert r.status_code == 200, r.text
            served[r.headers["x-slipway-backend"]] += 1
    answers = {}  # by the instance that answered (listed first), until both have
    with fresh(gateways, keys.admin) as admin:
        while len(answers) < 2:
            snapshot = stats(admin, samples=True)
            answers[snapshot["instances"][0]["id"]] = snapshot
    for snapshot in answers.values():
        assert together(snapshot)
        # Both instances served part of the traffic, and together all of it.
        per_instance = [i["requests"] for i in snapshot["instances"]]
        assert all(n > 0 for n in per_instance) and sum(per_instance) == 120, per_instance
        backends = {b["version"]: b for b in snapshot["backends"]}
        assert {v: b["requests"] for v, b in backends.items()} == served
        for version, b in backends.items():
            assert b["errors"] == 0 and b["e2e_s"]["count"] == served[version]
            assert len(b["e2e_s"]["samples"]) == served[version]  # every instance's, once
    first, second = answers.values()
    assert [b["requests"] for b in first["backends"]] == [b["requests"] for b in second["backends"]]


def test_a_tenant_s_request_rate_holds_exactly_across_both_instances(gateways, keys):
    # One at a time first, so both instances admit some (the kernel spreads the connections);
    # then a race for the rest of the minute's 50, a new connection per request.
    with fresh(gateways, keys.key("bob")) as client:
        opening = [client.post("/v1/chat/completions", json=chat()).status_code for _ in range(20)]

    async def race() -> list[int]:
        headers = {"Authorization": f"Bearer {keys.key('bob')}"}
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> int:
                url = f"{gateways}/v1/chat/completions"
                async with session.post(url, json=chat(), headers=headers) as r:
                    await r.read()
                    return r.status

            return await asyncio.gather(*(one() for _ in range(180)))

    statuses = opening + asyncio.run(race())
    assert opening == [200] * 20
    assert statuses.count(200) == 50 and statuses.count(429) == 150  # one limit, not one each
    with fresh(gateways, keys.admin) as admin:
        per_instance = [i["requests"] for i in stats(admin)["instances"]]
    assert all(n > 0 for n in per_instance) and sum(per_instance) == 50, per_instance


def window(instance: str, revision: int, latency: float, requests: int) -> dict:
    """An instance's /admin/stats?local=true of one backend that served `requests`, each taking
    `latency`, kept in a reservoir of 10 samples."""
    stats = BackendStats(10)
    for _ in range(requests):
        stats.observe(latency, latency, None, 1, 1)
    empty = BackendStats(10).snapshot(True)
    return {
        "instance": instance,
        "revision": revision,
        "backends": [
            {
                "version": "1",
                "inflight": 0,
                "waiting": 0,
                "circuit": "closed",
                **stats.snapshot(True),
                **dict.fromkeys(("failover", "synthetic", "shadow"), empty),
                "pairs": PairLog(10).snapshot(True),
            }
        ],
    }


def test_merged_samples_weigh_each_instance_by_what_it_saw_within_one_window():
    mine = window("a", 3, 1.0, 900)
    answers = [
        Answer(Peer("b", "http://b"), window("b", 3, 2.0, 100)),
        Answer(Peer("c", "http://c"), window("c", 2, 3.0, 50)),  # not yet in the new window
        Answer(Peer("d", "http://d"), None, "ClientConnectorError: refused"),
    ]
    [b] = merge(mine, answers, 10, with_samples=True)["backends"]
    assert b["requests"] == 1000 and b["e2e_s"]["count"] == 1000
    assert b["e2e_s"]["mean"] == pytest.approx(1.1)
    # Both reservoirs were full (10 of 900 and 10 of 100): 9 to 1, not 10 to 10.
    assert sorted(b["e2e_s"]["samples"]) == [1.0] * 9 + [2.0]
    listed = merge(mine, answers, 10, with_samples=False)["instances"]
    assert [(i["id"], i["requests"], i["added"], i["error"]) for i in listed] == [
        ("a", 900, True, None),
        ("b", 100, True, None),
        ("c", 50, False, None),
        ("d", None, False, "ClientConnectorError: refused"),
    ]
