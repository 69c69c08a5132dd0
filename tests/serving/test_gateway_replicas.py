"""Replicas of one version: least-outstanding balancing with the engines' own queues, a session's
replica by consistent hashing with bounded load, a breaker per replica, a retry on a sibling, and
live state kept when a version is scaled. In process, then against mock upstreams."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest
from pydantic import ValidationError

from configs.gateway import BackendSpec, BreakerSpec, RouteSpec
from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from serving.gateway.engine_load import read_into
from serving.gateway.routing import Backend, RoutingTable
from serving.processes import free_port
from tests.serving.conftest import MODEL, backend, chat, post_many

URLS = ("http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003")
BREAKER = BreakerSpec(failures=1, open_s=30)


def version(*urls: str, **extra) -> Backend:
    spec = BackendSpec.model_validate(backend(urls[0], "1", replicas=list(urls[1:]), **extra))
    return Backend(MODEL, spec, BREAKER, 16)


def test_a_request_goes_to_the_replica_with_the_fewest_outstanding_requests():
    b = version(*URLS)
    a, two, three = b.replicas
    a.inflight, two.inflight, three.inflight = 3, 1, 2
    assert b.replica_for(None, time.monotonic(), 1.25) is two
    # What the engine holds waiting counts too (requests other gateways sent it).
    two.engine_waiting = 5
    assert b.replica_for(None, time.monotonic(), 1.25) is three


def test_an_open_replica_is_passed_over_and_every_open_circuit_gives_none():
    b = version(*URLS[:2])
    first, second = b.replicas
    now = time.monotonic()
    first.breaker.failure(now)  # failures=1 opens it
    assert all(b.replica_for(None, now, 1.25) is second for _ in range(5))
    assert b.healthy and b.circuit == "closed" and b.may_serve(now)
    assert not b.may_serve(now, besides=second)  # the only one that would take it
    second.breaker.failure(now)
    assert b.replica_for(None, now, 1.25) is None
    assert not b.healthy and b.circuit == "open" and b.retry_after(now) == pytest.approx(30)
    # After open_s one probe goes through (half-open), to one replica only.
    later = now + 31
    probe = b.replica_for(None, later, 1.25)
    assert probe is not None and b.replica_for(None, later, 1.25) is not probe


def test_sessions_keep_their_replica_spread_evenly_and_move_only_with_theirs():
    b = version(*URLS)
    now = time.monotonic()
    sessions = [f"conversation-{i}" for i in range(600)]
    placed = {s: b.replica_for(s, now, 1.25).url for s in sessions}
    assert all(b.replica_for(s, now, 1.25).url == placed[s] for s in sessions)  # sticky
    assert all(150 <= n <= 250 for n in Counter(placed.values()).values()), Counter(placed.values())
    # Scaled down to two replicas: only the sessions of the one removed move.
    smaller = version(*URLS[:2])
    moved = {s for s in sessions if smaller.replica_for(s, now, 1.25).url != placed[s]}
    assert moved == {s for s in sessions if placed[s] == URLS[2]}


def test_a_session_leaves_its_replica_once_that_one_is_loaded_past_the_bound():
    b = version(*URLS)
    now = time.monotonic()
    session = "conversation-7"
    home = b.replica_for(session, now, 1.25)
    home.inflight = 1  # one request in flight does not move a conversation
    assert b.replica_for(session, now, 1.25) is home
    home.inflight = 4  # at most ceil(1.25 x (4 + 1) / 3) + 1 = 4 with this one: over
    away = b.replica_for(session, now, 1.25)
    assert away is not home
    home.inflight = 2  # ceil(1.25 x 3 / 3) + 1 = 3: within the bound again, back home
    assert b.replica_for(session, now, 1.25) is home


def test_scaling_a_version_keeps_its_statistics_and_the_replicas_that_stay():
    table = RoutingTable.empty()
    first = table.build_route(
        RouteSpec(model=MODEL, backends=(version(*URLS[:2]).spec,)), BREAKER, 16
    )
    live = first.backends[0]
    live.stats.observe(0.1, 0.05, 0.01, 3, 4)
    kept = live.replicas[0]
    kept.inflight = 2
    spec = BackendSpec.model_validate(backend(URLS[0], "1", replicas=[URLS[2]]))
    table = table.with_route(first, 1)
    second = table.build_route(RouteSpec(model=MODEL, backends=(spec,)), BREAKER, 16)
    again = second.backends[0]
    assert again is live and again.stats.requests == 1  # the version's evidence stays
    assert again.replicas[0] is kept and kept.inflight == 2
    assert [r.url for r in again.replicas] == [URLS[0], URLS[2]]
    assert again.max_concurrency == 2 * spec.max_concurrency  # per replica


def test_a_version_naming_a_server_twice_is_refused():
    with pytest.raises(ValidationError, match="names a server twice"):
        BackendSpec.model_validate(backend(URLS[0], "1", replicas=[URLS[0] + "/v1"]))
    with pytest.raises(ValidationError, match="is not an http"):
        BackendSpec.model_validate(backend(URLS[0], "1", replicas=["127.0.0.1:9002"]))


def test_the_engine_reading_takes_vllm_gauges_summed_over_engines():
    b = version(URLS[0])
    text = (
        'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="m"} 2.0\n'
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 400.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 100.0\n'
    )
    replica = b.replicas[0]
    assert read_into(replica, text)
    assert (replica.engine_waiting, replica.prefix_hit_rate) == (5, 0.25)
    assert not read_into(replica, "some_other_server_metric 1\n")


# ---- against mock upstreams ----------------------------------------------------------------------


def test_load_is_shared_by_both_replicas_and_admin_stats_show_each(keys, run_gateway):
    one, two = MockUpstream(delay_s=0.05), MockUpstream(delay_s=0.05)
    with serve(one) as u1, serve(two) as u2:
        config = keys.config([backend(u1, "1", replicas=[u2])])
        with run_gateway(config) as url:
            answers = asyncio.run(post_many(url, keys.key("alice"), [chat()] * 60))
            stats = httpx.get(
                f"{url}/admin/stats/{MODEL}", headers={"Authorization": f"Bearer {keys.admin}"}
            ).json()["backends"][0]
    assert [status for status, *_ in answers] == [200] * 60
    # 32 at a time over two replicas of equal speed: each gets close to half.
    assert 20 <= len(one.requests) <= 40 and len(one.requests) + len(two.requests) == 60
    assert [r["url"] for r in stats["replicas"]] == [u1, u2]
    assert all(r["circuit"] == "closed" and r["inflight"] == 0 for r in stats["replicas"])


def test_a_dead_replica_fails_no_request_and_its_circuit_opens(keys, run_gateway):
    live = MockUpstream()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with serve(live) as alive:
        # Polling off: the dead replica must be found by requests, and retried past.
        config = keys.config(
            [backend(dead, "1", replicas=[alive])],
            breaker={"failures": 2, "open_s": 60},
            balance={"poll_s": 0},
        )
        with run_gateway(config) as url:
            answers = asyncio.run(post_many(url, keys.key("alice"), [chat()] * 20, concurrency=1))
            stats = httpx.get(
                f"{url}/admin/stats/{MODEL}", headers={"Authorization": f"Bearer {keys.admin}"}
            ).json()["backends"][0]
    assert [status for status, *_ in answers] == [200] * 20
    assert len(live.requests) == 20
    circuits = {r["url"]: r["circuit"] for r in stats["replicas"]}
    assert circuits == {dead: "open", alive: "closed"} and stats["circuit"] == "closed"
    assert stats["requests"] == 22 and stats["errors"] == 2  # two failed tries, then skipped


def test_a_replica_whose_engine_reports_a_queue_is_avoided(keys, run_gateway):
    busy, idle = MockUpstream(), MockUpstream()
    busy.waiting = 50  # its engine says 50 requests wait there (another gateway's, say)
    with serve(busy) as b, serve(idle) as i:
        config = keys.config([backend(b, "1", replicas=[i])], balance={"poll_s": 0.05})
        with run_gateway(config) as url:
            deadline = time.monotonic() + 10
            admin = {"Authorization": f"Bearer {keys.admin}"}
            while time.monotonic() < deadline:  # until the first reading is in
                replicas = httpx.get(f"{url}/admin/stats/{MODEL}", headers=admin).json()
                waiting = [r["engine_waiting"] for r in replicas["backends"][0]["replicas"]]
                if waiting == [50, 0]:
                    break
                time.sleep(0.05)
            assert waiting == [50, 0]
            answers = asyncio.run(post_many(url, keys.key("alice"), [chat()] * 10, concurrency=1))
    assert [status for status, *_ in answers] == [200] * 10
    assert (len(busy.requests), len(idle.requests)) == (0, 10)
