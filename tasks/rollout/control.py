"""A person's hands on a rollout: roll the canary back at once, or let a paused step advance.

Orders travel through the registered model's `rollout.control` tag, which a running flow reads
(and consumes) at every look; a rollback also withdraws the canary here and now, so it works
even when no flow is running.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from configs.home import Home
from tasks.engines import stop_version
from tasks.gateway_admin import GatewayAdmin
from tasks.registry import Registry
from tasks.rollout.route import withdraw_canary
from tasks.servable import ModelVersion

CONTROL = "rollout.control"  # registered-model tag a person writes to steer a running rollout


class NothingToApprove(RuntimeError):
    """No rollout of the model is paused waiting for an approval."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def take_order(registry: Registry, model: str, version: str) -> dict[str, str] | None:
    """A person's instruction for the rollout of `version`, consumed when read."""
    raw = registry.model_tag(model, CONTROL)
    if not raw:
        return None
    order = json.loads(raw)
    if order.get("version") != version:
        return None
    registry.delete_model_tag(model, CONTROL)
    return order


def give_order(registry: Registry, model: str, version: str, action: str, reason: str) -> dict:
    order = {"action": action, "version": version, "at": now_iso(), "reason": reason}
    registry.set_model_tag(model, CONTROL, json.dumps(order))
    return order


def roll_back_by_hand(
    home: Home, model: str, reason: str, gateway_url: str | None = None
) -> list[str]:
    """Withdraw the canary at once and tell a running rollout flow (it records the rollback);
    with no flow running, record it here. Returns the withdrawn versions."""
    registry = Registry(home)
    versions = withdraw_canary(GatewayAdmin.of(home, gateway_url), model)
    for version in versions:
        order = give_order(registry, model, version, "rollback", reason)
        registry.tag(
            model,
            version,
            {
                "rollout_status": "rolled_back",
                "rollout_ended_at": order["at"],
                "rollout_reason": f"by hand: {reason}",
            },
        )
        stop_version(home, ModelVersion(model, version, {}, home).record)
    return versions


def approve(home: Home, model: str) -> str:
    """Let the paused step of `model`'s rollout advance. Returns the version approved."""
    registry = Registry(home)
    paused = registry.versions(model, rollout_status="paused")
    if not paused:
        raise NothingToApprove(f"no rollout of {model} is paused waiting for an approval")
    give_order(registry, model, paused[-1], "approve", "approved")
    return paused[-1]
