"""Choosing a backend for one request: weighted, sticky per session, canary opt-out, breakers,
and failover to a healthy canary where the route allows it.

A session key is hashed to a fixed point in [0, 1) and scaled into the weight space, so while the
weights stay the same a session always lands on the same backend; when they change, only the
sessions whose point crosses a moved boundary switch.
"""

from __future__ import annotations

import random
import time
from bisect import bisect_right
from hashlib import blake2b

from serving.gateway.errors import Unavailable
from serving.gateway.routing import Backend, Pick, Route

_SCALE = float(1 << 64)


def session_point(session: str) -> float:
    """A stable, uniformly spread point in [0, 1) for a session key."""
    return int.from_bytes(blake2b(session.encode(), digest_size=8).digest(), "big") / _SCALE


def _at(pick: Pick, point: float) -> Backend:
    index = bisect_right(pick.cumulative, point * pick.total)
    return pick.backends[min(index, len(pick.backends) - 1)]


def point_for(session: str | None) -> float:
    """The request's point in [0, 1): fixed for a session, random otherwise."""
    return session_point(session) if session is not None else random.random()


def takes_canary(route: Route, tenant_canary: str | None, default: str) -> bool:
    """Whether a tenant's request may land on a canary: its own choice, else the default.

    In a rollout's tenant-first stage (audience "opted_in") only tenants that chose "in" do.
    """
    if route.audience == "opted_in":
        return tenant_canary == "in"
    return (tenant_canary or default) == "in"


def choose(route: Route, point: float, canary: bool) -> Backend:
    """The backend at `point`; canary=False picks among stable backends only.

    Falls back to a healthy stable backend when every circuit of the chosen one is open, and
    raises Unavailable when there is none. Which replica serves is chosen once the request has
    its slot (Backend.replica_for).
    """
    backend = _at(route.everyone if canary else route.stable, point)
    now = time.monotonic()
    if backend.may_serve(now):
        return backend
    return fallback(route, backend, point, now)


def fallback(route: Route, failed: Backend, point: float, now: float) -> Backend:
    """A stable backend other than `failed` with a closed circuit (same point, fewer choices)."""
    healthy = [
        (b, w)
        for b, w in zip(route.stable.backends, _weights(route.stable), strict=True)
        if b is not failed and b.healthy
    ]
    if healthy:
        return _at(Pick.of(healthy), point)
    raise _all_failing(route, now)


def failover(route: Route, failed: Backend | None, point: float, now: float) -> Backend:
    """A canary other than `failed` with a closed circuit, for a route whose stable backends
    cannot serve (route.failover); raises Unavailable when the route has none or does not allow
    it."""
    if not route.failover:
        raise _all_failing(route, now)
    healthy = [
        (b, 1.0) for b in route.backends if b.role == "canary" and b is not failed and b.healthy
    ]
    if not healthy:
        raise _all_failing(route, now)
    return _at(Pick.of(healthy), point)


def _all_failing(route: Route, now: float) -> Unavailable:
    wait = min((b.retry_after(now) for b in route.backends), default=1.0)
    return Unavailable(
        f"every backend of model '{route.model}' is failing (circuit open); retry shortly",
        code="circuit_open",
        retry_after=max(1, round(wait)),
    )


def _weights(pick: Pick) -> list[float]:
    previous = 0.0
    out = []
    for c in pick.cumulative:
        out.append(c - previous)
        previous = c
    return out
