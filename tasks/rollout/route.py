"""Moving traffic in the gateway: a version joins at weight 0, takes all the traffic, is left
alone in the route, or (a canary) is withdrawn. Every move is one atomic table swap in the
gateway; a backend leaves the route only once its requests in flight are drained."""

from __future__ import annotations

import logging
import time
from typing import Any

from tasks.engines import RunningVersion
from tasks.gateway_admin import GatewayAdmin

log = logging.getLogger(__name__)

DRAIN_S = 30.0  # longest wait for requests in flight on a withdrawn backend


def _spec(backend: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A backend as PUT /admin/routes wants it (the description also carries weight and more)."""
    keys = (
        "version",
        "url",
        "replicas",
        "served_model",
        "digest",
        "attestation",
        "weight",
        "role",
        "max_concurrency",
        "priority_scheduling",
    )
    spec = {k: backend[k] for k in keys if backend.get(k) is not None} | changes
    return spec | {"expected_digest": spec["digest"]}


def describe(backends: list[dict[str, Any]]) -> str:
    """A route as a person reads it: `v1 (stable, 0%), v2 (canary, 100%)`."""
    return ", ".join(f"v{b['version']} ({b['role']}, {b['weight']:g}%)" for b in backends)


def add_canary(admin: GatewayAdmin, model: str, running: RunningVersion) -> None:
    """A version joins the route as canary at weight 0: reachable, but no traffic yet."""
    version = running.version
    canary = {
        "version": version.version,
        **running.servers,
        "served_model": version.served_name,
        "digest": version.tags["digest"],
        "attestation": version.attestation,
        "weight": 0,
        "role": "canary",
    }
    others = [b for b in admin.route(model)["backends"] if b["version"] != version.version]
    admin.put_route(model, [*(_spec(b) for b in others), _spec(canary)])


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
    admin.set_weights(model, weights, mirror=None)  # no more copies to it either
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


def hand_over(admin: GatewayAdmin, model: str, version: str) -> None:
    """All of the route's traffic to `version` in one atomic swap; the other backends stay, at
    weight 0, so that requests in flight on them finish (and the move can still be undone)."""
    nothing = {b["version"]: 0.0 for b in admin.route(model)["backends"]}
    admin.set_weights(model, nothing | {version: 100.0}, mirror=None)


def keep_only(admin: GatewayAdmin, model: str, version: str) -> list[str]:
    """Once the other backends' requests in flight have finished, a route of `version` alone, as
    stable. Returns the versions removed. `version` must be in the route."""
    others = {b["version"] for b in admin.route(model)["backends"]} - {version}
    _drain(admin, model, others)
    kept = next(b for b in admin.route(model)["backends"] if b["version"] == version)
    admin.put_route(model, [_spec(kept, role="stable", weight=100.0)])
    return sorted(others)
