"""Judging one step: set its weights, then look at the gateway's statistics every
`look_interval_s` until the sequential analysis decides, a person does, the canary stops
answering, or the time limit hands it to the policy's `on_inconclusive`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.rollout import RolloutPolicy, Stage
from evaluation.canary import Analysis, ArmSamples, analyse
from evaluation.paired import (
    balanced_at,
    latency_table,
    mirrored_arms,
    pair_counts,
    pair_table,
)
from evaluation.quality.logprob import Scorer
from serving.processes import answers
from tasks.gateway_admin import GatewayAdmin
from tasks.registry import Registry
from tasks.rollout.control import take_order
from tasks.rollout.plan import Plan

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0

Action = Literal["advance", "rollback"]


def arms(backend: dict[str, Any]) -> list[ArmSamples]:
    """A backend's organic and synthetic samples from the gateway's statistics."""
    return [
        ArmSamples.from_snapshot(backend, "organic"),
        ArmSamples.from_snapshot(backend["synthetic"], "synthetic"),
    ]


def _pairs(backend: dict[str, Any]) -> list[dict[str, Any]]:
    return (backend.get("pairs") or {}).get("pairs") or []


def look(
    snapshot: dict[str, Any],
    candidate: str,
    stable: set[str],
    stage: Stage,
    scorer: Scorer | None = None,
) -> Analysis | None:
    """The analysis of one look at the gateway's statistics, or None while stable has served
    nothing to compare with. A mirroring step adds the canary's copies to its arms and judges
    latency and answers on the pairs."""
    backends = snapshot["backends"]
    stable_arms = [a for b in backends if b["version"] in stable for a in arms(b)]
    if not any(a.requests for a in stable_arms):
        return None
    canary = [b for b in backends if b["version"] == candidate]
    canary_arms = [a for b in canary for a in arms(b)]
    if stage.mirror_rps is None:
        return analyse(stable_arms, canary_arms, stage.analysis)
    pairs = [p for b in canary for p in _pairs(b)]
    if scorer is not None and stage.analysis.quality.logprob:
        scorer.score(pairs)
    counts = pair_counts(pairs, stage.analysis, balanced_at(stage.weight))
    return analyse(stable_arms, canary_arms + mirrored_arms(pairs), stage.analysis, counts)


@dataclass(frozen=True)
class StepResult:
    index: int
    stage: Stage
    action: Action
    reason: str
    seconds: float
    looks: int
    paused: bool
    analysis: Analysis | None
    by: Literal["analysis", "time limit", "person", "health check"] = "analysis"
    pairs: tuple[dict[str, Any], ...] = ()  # a mirroring step's scored pairs (pair_table)
    timed: tuple[dict[str, Any], ...] = ()  # and every pair's latencies (latency_table)
    incident_s: float = 0.0  # time held while every stable backend was down (not in `seconds`)


@dataclass
class Steering:
    """What a step looks at besides the statistics: manual control and the canary's health."""

    registry: Registry
    model: str
    version: str
    canary_url: str
    on_look: Callable[[int, Stage, Analysis, dict[str, Any]], None] = lambda *a: None
    on_pause: Callable[[int, Stage, Analysis | None], None] = lambda *a: None
    say: Callable[[str], None] = log.info  # progress lines (the flow passes its run logger)
    scorer: Scorer | None = None  # mirrored answers by log-probability (evaluation/quality)
    looks: int = field(default=0)

    def control(self) -> dict[str, str] | None:
        """A person's instruction for this rollout, consumed when read."""
        return take_order(self.registry, self.model, self.version)


def step_weights(candidate: str, stable: set[str], stage: Stage) -> dict[str, float]:
    """A step's weights: the canary's share, the rest evenly among the stable backends."""
    share = (100.0 - stage.weight) / len(stable)
    return {candidate: float(stage.weight)} | dict.fromkeys(stable, share)


def step_mirror(candidate: str, stage: Stage) -> dict[str, Any] | None:
    """A step's copies of stable's requests to the canary, or None."""
    if not stage.mirror_rps:
        return None
    return {"to": candidate, "rate_rps": stage.mirror_rps, "max_in_flight": stage.mirror_in_flight}


def stable_down(snapshot: dict[str, Any], stable: set[str]) -> bool:
    """Whether every stable backend's circuit is open (the gateway has none to send to)."""
    circuits = [b["circuit"] for b in snapshot["backends"] if b["version"] in stable]
    return bool(circuits) and all(c != "closed" for c in circuits)


def warm_up(
    admin: GatewayAdmin,
    model: str,
    candidate: str,
    stage: Stage,
    look_interval_s: float,
    say: Callable[[str], None],
) -> None:
    """Let the canary answer `stage.warmup_copies` copies (or copy for the stage's time limit,
    whichever ends first), then start the statistics window anew: what a new engine answers the
    first time it sees a prompt is not what it answers from then on."""
    began = time.monotonic()
    answered = 0
    while answered < stage.warmup_copies and time.monotonic() - began < stage.max_seconds:
        time.sleep(look_interval_s)
        backends = admin.stats(model, samples=False)["backends"]
        answered = sum(b["shadow"]["requests"] for b in backends if b["version"] == candidate)
    admin.reset_stats(model)
    say(
        f"warm-up: the canary answered {answered} copies in {time.monotonic() - began:.0f} s, "
        "not judged; the shadow phase is judged from now"
    )


def judge_step(
    admin: GatewayAdmin,
    plan: Plan,
    index: int,
    stage: Stage,
    policy: RolloutPolicy,
    steer: Steering,
) -> StepResult:
    """Set the step's weights, then look every `look_interval_s` until the analysis decides,
    a person does, the canary stops answering, or the time limit hands it to `on_inconclusive`.
    A paused step keeps its weights and its analysis: 'worse' still rolls back, 'not worse' or
    an approval advances."""
    model, cand = plan.model, plan.candidate.version
    stable = {b["version"] for b in plan.stable_backends}
    admin.set_weights(
        model, step_weights(cand, stable, stage), stage.audience, step_mirror(cand, stage)
    )
    if stage.warmup_copies:
        warm_up(admin, model, cand, stage, policy.look_interval_s, steer.say)
    start = last_said = time.monotonic()
    paused = False
    analysis: Analysis | None = None
    misses = 0  # failed /health checks of the canary in a row
    down_since: float | None = None  # when every stable backend was last seen down
    incident_s = 0.0

    snapshot: dict[str, Any] = {"backends": []}

    def result(action: Action, reason: str, by: str = "analysis") -> StepResult:
        seconds = time.monotonic() - start
        pairs = timed = ()
        if stage.mirror_rps is not None:
            mirrored = [p for b in snapshot["backends"] if b["version"] == cand for p in _pairs(b)]
            if steer.scorer is not None:
                steer.scorer.annotate(mirrored)
            pairs = tuple(pair_table(mirrored, stage.analysis))
            timed = tuple(latency_table(mirrored))
        return StepResult(
            index,
            stage,
            action,
            reason,
            seconds,
            steer.looks,
            paused,
            analysis,
            by,
            pairs,
            timed,
            incident_s,
        )

    while True:
        time.sleep(policy.look_interval_s)
        steer.looks += 1
        if order := steer.control():
            action: Action = "rollback" if order["action"] == "rollback" else "advance"
            return result(action, f"{order['action']} by hand: {order.get('reason', '')}", "person")
        misses = 0 if answers(steer.canary_url + "/health") else misses + 1
        if misses >= policy.health_failures:
            return result(
                "rollback",
                f"the canary at {steer.canary_url} stopped answering /health "
                f"({misses} checks in a row)",
                "health check",
            )
        snapshot = admin.stats(model)
        canary = [b for b in snapshot["backends"] if b["version"] == cand]
        if stable_down(snapshot, stable):
            # The gateway fails over to the canary (or answers 503): what the canary serves now
            # is no evidence, and rolling it back could leave the model with nothing healthy.
            # The step holds, its clock stopped, until stable serves again.
            now = time.monotonic()
            if down_since is None:
                down_since = now
                steer.say(f"step {index + 1}: incident: every stable backend's circuit is open")
            continue
        if down_since is not None:
            held = time.monotonic() - down_since
            start += held
            incident_s += held
            down_since = None
            steer.say(f"step {index + 1}: stable serves again after {held:.0f} s; judging resumes")
        if any(b["circuit"] != "closed" for b in canary):
            # Its requests now go to stable, so the analysis would starve: the gateway has judged.
            return result(
                "rollback",
                "the gateway opened the canary's circuit after consecutive "
                f"failures ({canary[0]['errors']} errors in {canary[0]['requests']} requests)",
                "health check",
            )
        fresh = look(snapshot, cand, stable, stage, steer.scorer)
        if fresh is not None:
            analysis = fresh
            steer.on_look(index, stage, analysis, snapshot)
            if analysis.decision == "worse":
                return result("rollback", "; ".join(analysis.reasons))
            if analysis.decision == "not_worse":
                return result("advance", "; ".join(analysis.reasons))
        now = time.monotonic()
        if now - last_said >= PROGRESS_EVERY_S:
            last_said = now
            said = "; ".join(analysis.reasons[:2]) if analysis else "no stable requests yet"
            steer.say(f"step {index + 1} ({stage.label}): {said}")
        if not paused and now - start >= stage.max_seconds:
            why = f"inconclusive after {stage.max_seconds:.0f} s"
            if analysis is not None:
                why += f" ({'; '.join(analysis.reasons)})"
            if policy.on_inconclusive == "rollback":
                return result("rollback", why, "time limit")
            paused = True
            steer.on_pause(index, stage, analysis)
            steer.say(
                f"step {index + 1} paused, {why}: approve with `slipway rollout approve "
                f"{model}` or roll back with `slipway rollout rollback {model}`"
            )


@task(
    name="judge-step",
    task_run_name="judge {stage.weight}% ({stage.audience})",
    cache_policy=NO_CACHE,
)
def judge_step_task(
    admin: GatewayAdmin,
    plan: Plan,
    index: int,
    stage: Stage,
    policy: RolloutPolicy,
    steer: Steering,
) -> StepResult:
    return judge_step(admin, plan, index, stage, policy, steer)
