"""What every move of a model's traffic leaves behind, whether a rollout, a revert or the reconcile
that settles one a killed flow left: Prefect events (and the policy's webhook), the version tags
that say how it ended, and the story and evidence in its MLflow run (experiment slipway-rollouts).

Outcomes: a rollout ends `promoted` or `rolled_back`, a revert `reverted` or `undone`, and either
`needs_reconcile` when the flow could not settle the gateway on its way out (the next reconcile
does). Which of the two consistent outcomes it is follows the registry's `champion` alias alone.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import httpx
from prefect.events import emit_event

from tasks.registry import Registry
from tasks.rollout.control import now_iso
from tasks.rollout.inflight import Kind

log = logging.getLogger(__name__)

ROLLOUTS = "slipway-rollouts"  # the MLflow experiment: one run per rollout or revert
PREVIOUS = "previous"  # the alias of the champion a promotion replaced: what a revert reinstates
NEEDS_RECONCILE = "needs_reconcile"
# A version tag with one of these values names a move that has not ended yet.
UNSETTLED = {
    "rollout_status": ("in_progress", "paused", NEEDS_RECONCILE),
    "revert_status": ("in_progress", NEEDS_RECONCILE),
}


def emit(
    topic: str,
    model: str,
    version: str,
    payload: dict[str, Any],
    webhook_url: str | None = None,
) -> None:
    """A Prefect event (automations and notifications react to it) and the policy's webhook.
    A webhook that fails is logged, never fatal: the decision stands."""
    emit_event(
        event=topic,
        resource={
            "prefect.resource.id": f"slipway.model.{model}.{version}",
            "slipway.model": model,
            "slipway.version": version,
        },
        payload=payload,
    )
    if webhook_url:
        body = {"event": topic, "model": model, "version": version} | payload
        try:
            httpx.post(webhook_url, json=body, timeout=5).raise_for_status()
        except httpx.HTTPError as e:
            log.warning("webhook %s failed for %s: %s", webhook_url, topic, e)


def outcome_of(kind: Kind, target: str, champion: str | None) -> str:
    """How a move ended, from the registry's `champion` alone: it brought `target` in or not."""
    if kind == "rollout":
        return "promoted" if champion == target else "rolled_back"
    return "reverted" if champion == target else "undone"


def tag_outcome(
    registry: Registry, model: str, kind: Kind, source: str, target: str, outcome: str, reason: str
) -> None:
    """The version tags that say how a move ended: a rollout's on its candidate (`target`); a
    revert's on the version reverted from (`source`) and, once reverted, on the one reinstated."""
    ended, reason = now_iso(), reason[:4900]  # MLflow tag values are bounded
    if kind == "rollout":
        tags = {"rollout_status": outcome, "rollout_ended_at": ended, "rollout_reason": reason}
        registry.tag(model, target, tags)
        return
    tags = {"revert_status": outcome, "revert_ended_at": ended, "revert_reason": reason}
    if outcome == "reverted":
        tags["rollout_status"] = "reverted"
        registry.tag(model, target, {"reinstated_at": ended, "reinstated_reason": reason})
    registry.tag(model, source, tags)


def write_story(
    registry: Registry,
    run_id: str,
    title: str,
    lines: list[str],
    evidence: dict[str, Any],
    run_status: str = "FINISHED",
) -> str:
    """story.md (the lines as a list under `title`) and evidence.json into the run, its
    `rollout_status` tag set to the evidence's status, and the run ended; returns the story."""
    story = "\n".join(
        [
            f"# {title}",
            "",
            *(f"- {line}" for line in lines),
            "",
            f"MLflow run `{run_id}` (experiment `{ROLLOUTS}`) holds the evidence.",
        ]
    )
    with tempfile.TemporaryDirectory() as workdir:
        files = [Path(workdir) / "story.md", Path(workdir) / "evidence.json"]
        files[0].write_text(story + "\n")
        files[1].write_text(json.dumps(evidence, indent=2, default=str) + "\n")
        registry.set_run_tag(run_id, "rollout_status", str(evidence["status"]))
        registry.close_run(run_id, files, status=run_status)
    return story
