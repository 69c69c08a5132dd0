"""Moving traffic in the gateway: the canary joins at weight 0, is withdrawn, or becomes stable.
Every move is one atomic table swap in the gateway; a withdrawn backend is drained first."""

from __future__ import annotations

import logging
import time
from typing import Any

from tasks.engines import RunningVersion
from tasks.gateway_admin import GatewayAdmin
from tasks.rollout.plan import Plan

log = logging.getLogger(__name__)

DRAIN_S = 30.0  # longest wait for requests in flight on a withdrawn backend


def _spec(backend: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A backend as PUT /admin/routes wants it (the description also carries weight and more)."""
    keys = (
        "version",
        "url",
        "served_model",
        "digest",
        "verified",
        "weight",
        "role",
        "max_concurrency",
    )
    spec = {k: backend[k] for k in keys if backend.get(k) is not None} | changes
    return spec | {"expected_digest": spec["digest"]}


def add_canary(admin: GatewayAdmin, plan: Plan, running: RunningVersion) -> None:
    """The candidate joins the route as canary at weight 0: reachable, but no traffic yet."""
    cand = plan.candidate
    canary = {
        "version": cand.version,
        "url": running.url,
        "served_model": cand.served_name,
        "digest": cand.tags["digest"],
        "verified": True,
        "weight": 0,
        "role": "canary",
    }
    admin.put_route(plan.model, [*(_spec(b) for b in plan.stable_backends), _spec(canary)])


def _drain(admin: GatewayAdmin, model: str, versions: set[str]) -> None:
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline:
        backends = admin.stats(model, samples=False)["backends"]
        if not any(b["inflight"] for b in backends if b["version"] in versions):
            return
        time.sleep(0.2)
    log.warning(
        "requests still in flight on %s after %.0f s; withdrawing anyway", versions, DRAIN_S
    )


def withdraw_canary(admin: GatewayAdmin, model: str) -> list[str]:
    """Canary weight 0 at once (one atomic table swap), then, once its requests in flight have
    finished, a route of the stable backends alone. Returns the withdrawn versions."""
    route = admin.route(model)
    canaries = [b for b in route["backends"] if b["role"] == "canary"]
    if not canaries:
        return []
    stable = [b for b in route["backends"] if b["role"] == "stable"]
    weights = {b["version"]: 0.0 for b in canaries}
    if not any(b["weight"] > 0 for b in stable):  # traffic was all on the canary: give it back
        weights |= {b["version"]: 100.0 / len(stable) for b in stable}
    admin.set_weights(model, weights)
    versions = {b["version"] for b in canaries}
    _drain(admin, model, versions)
    total = sum(b["weight"] for b in stable)
    admin.put_route(
        model,
        [
            _spec(b, weight=100.0 * b["weight"] / total if total else 100.0 / len(stable))
            for b in stable
        ],
    )
    return sorted(versions)


def make_stable(admin: GatewayAdmin, plan: Plan) -> None:
    """Promotion in the gateway: all traffic to the candidate, then (drained) it alone, as
    stable."""
    model, cand = plan.model, plan.candidate
    old = {b["version"] for b in plan.stable_backends}
    admin.set_weights(model, {cand.version: 100.0} | dict.fromkeys(old, 0.0))
    _drain(admin, model, old)
    canary = next(b for b in admin.route(model)["backends"] if b["version"] == cand.version)
    admin.put_route(model, [_spec(canary, role="stable", weight=100.0)])
