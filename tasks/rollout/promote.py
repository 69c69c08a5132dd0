"""The one promotion sequence: a rollout's last step and a revert's only one.

Its order is what the reconcile relies on (tasks/rollout/reconcile.py): the version coming in is
already in the route; it takes all the traffic in one atomic swap (the old backend stays, at
weight 0, so the move can still be undone); then the `champion` alias moves, which decides it;
then the old backend is drained and removed and its vLLM stopped, which the reconcile finishes if
the flow dies first.
"""

from __future__ import annotations

from configs.home import Home
from tasks.engines import stop_version
from tasks.gateway_admin import GatewayAdmin
from tasks.registry import Registry
from tasks.rollout.route import hand_over, keep_only
from tasks.servable import ModelVersion


def promote(
    admin: GatewayAdmin,
    registry: Registry,
    home: Home,
    model: str,
    version: str,
    reason: str,
    replaced_reason: str | None = None,
) -> list[str]:
    """Make `version`, already in the route, the champion served alone: all traffic to it, the
    alias `champion` to it (the one replaced becomes `previous`, its history saying
    `replaced_reason`), the other backends drained and removed and their vLLM stopped. Returns
    the versions removed."""
    hand_over(admin, model, version)
    registry.promote(model, version, reason=reason, replaced_reason=replaced_reason)
    removed = keep_only(admin, model, version)
    for old in removed:
        stop_version(home, ModelVersion(model, old, {}, home).record)
    return removed
