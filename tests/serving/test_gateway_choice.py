"""Backend choice in process: weights, sticky session points, canary opt-out, open circuits."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from configs.gateway import BackendSpec, BreakerSpec, RouteSpec
from serving.gateway.choice import (
    choose,
    failover,
    fallback,
    point_for,
    session_point,
    takes_canary,
)
from serving.gateway.errors import Unavailable
from serving.gateway.routing import Route, RoutingTable
from tests.serving.conftest import MODEL, backend

POINTS = [(i + 0.5) / 1000 for i in range(1000)]  # evenly spread over [0, 1)


def route(
    *backends: dict, audience: str = "everyone", open_s: float = 30, failover: bool = False
) -> Route:
    specs = tuple(BackendSpec.model_validate(b) for b in backends)
    built = RoutingTable.empty().build_route(
        RouteSpec(model=MODEL, backends=specs), BreakerSpec(failures=1, open_s=open_s), 16
    )
    return Route.build(MODEL, built.backends, built.weights, audience, failover=failover)


def split(stable: float, canary: float, **options) -> Route:
    url = "http://127.0.0.1:9"
    return route(
        backend(url, "1", weight=stable), backend(url, "2", role="canary", weight=canary), **options
    )


def served(r: Route, canary: bool = True) -> Counter:
    return Counter(choose(r, p, canary).version for p in POINTS)


def test_points_are_shared_out_by_weight():
    assert served(split(80, 20)) == {"1": 800, "2": 200}
    assert served(split(100, 0)) == {"1": 1000}  # a zero weight takes a backend out of rotation


def test_a_session_keeps_its_backend_and_a_weight_change_moves_only_the_crossers():
    sessions = [f"session-{i}" for i in range(400)]
    assert all(point_for(s) == session_point(s) == point_for(s) for s in sessions)
    assert all(0 <= session_point(s) < 1 for s in sessions)
    before = {s: choose(split(50, 50), point_for(s), True).version for s in sessions}
    assert set(before.values()) == {"1", "2"}  # sessions spread over both
    after = {s: choose(split(40, 60), point_for(s), True).version for s in sessions}
    moved = {s for s in sessions if before[s] != after[s]}
    # Stable holds [0, 0.5) then [0, 0.4): only the sessions in [0.4, 0.5) cross the boundary.
    assert moved == {s for s in sessions if 0.4 <= session_point(s) < 0.5}
    assert moved and all(after[s] == "2" for s in moved)


def test_requests_without_a_session_are_spread_at_random():
    points = {point_for(None) for _ in range(100)}
    assert len(points) == 100 and all(0 <= p < 1 for p in points)


@pytest.mark.parametrize(
    ("audience", "tenant", "default", "expected"),
    [
        ("everyone", None, "in", True),
        ("everyone", None, "out", False),
        ("everyone", "out", "in", False),
        ("everyone", "in", "out", True),
        ("opted_in", None, "in", False),  # the tenant-first stage ignores the default
        ("opted_in", "in", "out", True),
        ("opted_in", "out", "in", False),
    ],
)
def test_who_takes_canary_traffic(audience, tenant, default, expected):
    assert takes_canary(split(50, 50, audience=audience), tenant, default) is expected


def test_opted_out_requests_get_stable_only_even_with_all_weight_on_the_canary():
    assert served(split(10, 90), canary=False) == {"1": 1000}
    assert served(split(0, 100), canary=False) == {"1": 1000}
    assert served(split(0, 100)) == {"2": 1000}


def test_an_open_circuit_falls_back_to_a_healthy_stable_backend():
    url = "http://127.0.0.1:9"
    r = route(
        backend(url, "1", weight=40),
        backend(url, "3", weight=40),
        backend(url, "2", role="canary", weight=20),
    )
    one, _, canary = r.backends
    canary.replicas[0].breaker.failure(time.monotonic())
    # The canary's points [0.8, 1) fall back at the same point among the stable ones: onto "3".
    assert served(r) == {"1": 400, "3": 600}
    one.replicas[0].breaker.failure(time.monotonic())
    assert served(r) == {"3": 1000}


def test_a_failed_attempt_is_retried_on_another_stable_backend_at_the_same_point():
    url = "http://127.0.0.1:9"
    r = route(backend(url, "1"), backend(url, "3"), backend(url, "2", role="canary"))
    one, three, canary = r.backends
    now = time.monotonic()
    retried = Counter(fallback(r, canary, p, now).version for p in POINTS)
    assert retried == {"1": 500, "3": 500}
    assert all(fallback(r, one, p, now) is three for p in POINTS)


def test_every_backend_failing_is_unavailable_with_retry_after():
    r = split(50, 50, open_s=30)
    for b in r.backends:
        b.replicas[0].breaker.failure(time.monotonic())
    for canary in (True, False):
        with pytest.raises(Unavailable, match="every backend of model 'tiny-chat' is failing") as e:
            choose(r, 0.3, canary)
        assert e.value.code == "circuit_open" and e.value.retry_after == 30


def test_failover_takes_a_healthy_canary_only_where_the_route_allows_it():
    url = "http://127.0.0.1:9"
    specs = (
        backend(url, "1", weight=90),
        backend(url, "2", role="canary", weight=5),
        backend(url, "3", role="canary", weight=5),
    )
    allowed, strict = route(*specs, failover=True), route(*specs)
    now = time.monotonic()
    for r in (allowed, strict):
        r.backends[0].replicas[0].breaker.failure(now)  # stable's circuit opens
    # Spread evenly over the healthy canaries whatever their weights; never the one that failed.
    assert Counter(failover(allowed, None, p, now).version for p in POINTS) == {"2": 500, "3": 500}
    two = allowed.backends[1]
    assert all(failover(allowed, two, p, now).version == "3" for p in POINTS)
    allowed.backends[2].replicas[0].breaker.failure(now)
    with pytest.raises(Unavailable, match="every backend"):
        failover(allowed, two, 0.5, now)  # the only healthy canary is the one that failed
    with pytest.raises(Unavailable, match="every backend"):
        failover(strict, None, 0.5, now)  # failover is opt-in
