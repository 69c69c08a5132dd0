"""Revert: `previous` back as champion in one step, the emergency path when a promoted model
misbehaves days later. No canary steps: `previous` served before, so once it verifies and answers
its health check it takes all the traffic at once, by the same promotion sequence a rollout ends
with (tasks/rollout/promote.py), and a revert killed anywhere is settled by the same reconcile.

Its record is a rollout's: a run in the MLflow experiment slipway-rollouts (tag kind=revert;
`candidate` is the version reinstated, `stable` the one reverted from) with story.md and
evidence.json and the seconds each stage took, tags on both versions, and Prefect events
`slipway.revert.{started,reverted,undone,needs_reconcile}`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.home import Home
from tasks.gateway_admin import GatewayAdmin
from tasks.registry import Registry
from tasks.rollout.control import now_iso
from tasks.rollout.inflight import InFlight, Owner
from tasks.rollout.plan import RolloutRefused
from tasks.rollout.record import (
    NEEDS_RECONCILE,
    PREVIOUS,
    ROLLOUTS,
    emit,
    tag_outcome,
    write_story,
)
from tasks.servable import CHAMPION, ModelVersion, NotServable, check_servable, version_of

log = logging.getLogger(__name__)


class RevertRefused(RolloutRefused):
    """A check failed before anything moved; nothing was changed."""


@dataclass(frozen=True)
class RevertPlan:
    """Who is reverted from (the champion) and who is reinstated (`previous`), verified."""

    model: str
    current: ModelVersion
    previous: ModelVersion
    verify_s: float  # how long the check of `previous` took


def revert_plan(registry: Registry, admin: GatewayAdmin, model: str) -> RevertPlan:
    """Raise RevertRefused unless `previous` may serve again: there is one, other than the
    champion, its evaluation passed, its signature verifies against its files and their digest
    is the registered one, and the gateway serves exactly the champion."""
    champion = registry.alias(model, CHAMPION)
    previous = registry.alias(model, PREVIOUS)
    if champion is None:
        raise RevertRefused(f"{model} has no champion: nothing is served, nothing to revert")
    if previous is None or previous == champion:
        raise RevertRefused(
            f"{model} has no previous champion to go back to (alias `previous` is "
            f"{'v' + previous if previous else 'not set'}): a rollout's promotion sets it"
        )
    start = time.monotonic()
    back = version_of(registry, model, previous)
    try:
        check_servable(back, role=PREVIOUS)
    except NotServable as e:
        raise RevertRefused(str(e)) from e
    verify_s = time.monotonic() - start
    routed = {b["version"] for b in admin.route(model)["backends"] if b["weight"] > 0}
    if routed != {champion}:
        raise RevertRefused(
            f"the gateway serves v{', v'.join(sorted(routed)) or ' nothing'} as {model}, not "
            f"the champion v{champion} alone: `slipway rollout reconcile {model}` first"
        )
    return RevertPlan(model, version_of(registry, model, champion), back, verify_s)


@task(name="verify-previous", cache_policy=NO_CACHE)
def revert_plan_task(home: Home, admin: GatewayAdmin, model: str) -> RevertPlan:
    return revert_plan(Registry(home), admin, model)


@dataclass
class RevertRecord:
    """The revert's record, open for its length: the in-flight claim, the MLflow run, the tags
    on both versions, the story and the seconds each stage took."""

    registry: Registry
    plan: RevertPlan
    reason: str
    claim: InFlight
    lines: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    opened: float = field(default_factory=time.monotonic)
    tell: Callable[[str], None] = log.info  # where its lines also go (the flow's run logger)

    @classmethod
    def open(
        cls,
        registry: Registry,
        plan: RevertPlan,
        reason: str,
        tell: Callable[[str], None] = log.info,
        repaired: tuple[str, ...] = (),
    ) -> RevertRecord:
        model, current, back = plan.model, plan.current, plan.previous
        started = now_iso()
        claim = InFlight(
            kind="revert",
            source=current.version,
            target=back.version,
            run_id=None,
            started_at=started,
            owner=Owner.me(),
        )
        claim.claim(registry, model)  # before anything is written or moved, as a rollout's
        run_id = registry.open_run(
            f"revert-{model}-v{current.version}",
            params={"reason": reason},
            tags={
                "kind": "revert",
                "model": model,
                "candidate": back.version,
                "stable": current.version,
                "candidate_digest": back.tags["digest"],
                "stable_digest": current.tags.get("digest", ""),
            },
            experiment=ROLLOUTS,
        )
        claim = claim.model_copy(update={"run_id": run_id})
        claim.claim(registry, model)
        registry.tag(
            model,
            current.version,
            {
                "revert_status": "in_progress",
                "revert_started_at": started,
                "revert_run_id": run_id,
                "revert_to": back.version,
            },
        )
        registry.tag(model, back.version, {"revert_run_id": run_id})
        record = cls(registry, plan, reason, claim, tell=tell)
        for line in repaired:
            record.say(f"{started}: before it began, the reconcile repaired: {line}")
        record.say(
            f"{started}: revert of {model} from champion {current} to previous {back} "
            f"({plan.verify_s:.1f} s to verify it): {reason}"
        )
        record.timed("verify", plan.verify_s)
        return record

    @property
    def run_id(self) -> str:
        return str(self.claim.run_id)

    def say(self, line: str) -> None:
        self.lines.append(line)
        self.tell(line)

    def timed(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(seconds, 2)
        self.registry.log_metrics(self.run_id, {f"seconds.{stage}": seconds})

    def announce(self, event: str, payload: dict[str, Any]) -> None:
        model, back = self.plan.model, self.plan.previous.version
        emit(f"slipway.revert.{event}", model, back, payload | {"run_id": self.run_id})

    def close(self, status: str, reason: str) -> str:
        """Tag both versions with the outcome, store story and evidence, end the run, give up the
        claim (kept when the gateway is left unsettled); the story."""
        model, current, back = self.plan.model, self.plan.current, self.plan.previous
        self.timed("total", self.plan.verify_s + time.monotonic() - self.opened)
        self.say(f"{now_iso()}: {status.replace('_', ' ')}: {reason}")
        tag_outcome(self.registry, model, "revert", current.version, back.version, status, reason)
        evidence = {
            "model": model,
            "kind": "revert",
            "candidate": back.version,
            "stable": current.version,
            "status": status,
            "reason": reason,
            "seconds": self.seconds,
        }
        unsettled = status == NEEDS_RECONCILE
        story = write_story(
            self.registry,
            self.run_id,
            f"Revert of {model} from v{current.version} to v{back.version}",
            self.lines,
            evidence,
            run_status="FAILED" if unsettled else "FINISHED",
        )
        if not unsettled:
            InFlight.clear(self.registry, model)
        return story
