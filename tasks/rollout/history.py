"""The rollout's record: one MLflow run for its whole length, the in-flight claim and tags on the
candidate's version, Prefect events and the policy's webhook at every step, and the story told as
markdown (tasks/rollout/record.py writes what every move shares)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from configs.rollout import RolloutPolicy, Stage
from evaluation.canary import Analysis
from evaluation.paired import quality_summary
from tasks.registry import Registry
from tasks.rollout.control import CONTROL, now_iso
from tasks.rollout.inflight import InFlight, Owner
from tasks.rollout.plan import Plan
from tasks.rollout.record import NEEDS_RECONCILE, ROLLOUTS, emit, tag_outcome, write_story
from tasks.rollout.steps import StepResult

log = logging.getLogger(__name__)


def announce(event: str, plan: Plan, payload: dict[str, Any], webhook_url: str | None) -> None:
    """The event `slipway.rollout.<event>` about the candidate, and the policy's webhook."""
    emit(f"slipway.rollout.{event}", plan.model, plan.candidate.version, payload, webhook_url)


def look_metrics(analysis: Analysis, weight: int) -> dict[str, float]:
    """One look as MLflow metrics: counts, and each test's statistic and limit."""
    metrics = {"canary_weight": float(weight)}
    for key, verdict in analysis.verdicts.items():
        basis = key.replace("+", "_and_")  # MLflow metric names allow no '+'
        metrics[f"{basis}.canary_requests"] = verdict.n_canary
        metrics[f"{basis}.stable_requests"] = verdict.n_stable
    for t in analysis.tests:
        name = t.metric if t.kind == "comparison" else f"slo.{t.metric}"
        metrics |= {
            f"{name}.stable": t.stable,
            f"{name}.canary": t.canary,
            f"{name}.p_worse": t.p_worse,
            f"{name}.p_not_worse": t.p_not_worse,
        }
    return {k: float(v) for k, v in metrics.items() if not math.isnan(v)}  # NaN: no samples yet


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class History:
    """The rollout's record: one MLflow run open for its whole length (policy as params, every look
    as metrics), tags on the candidate's version, and the story told as markdown."""

    registry: Registry
    plan: Plan
    run_id: str
    claim: InFlight  # the in-flight record this rollout holds until it has settled
    lines: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    looks: int = 0
    tell: Callable[[str], None] = log.info  # where its lines also go (the flow's run logger)

    @classmethod
    def open(
        cls,
        registry: Registry,
        plan: Plan,
        policy_path: str,
        policy: RolloutPolicy,
        tell: Callable[[str], None] = log.info,
        repaired: tuple[str, ...] = (),
    ) -> History:
        model, cand, stable = plan.model, plan.candidate, plan.stable
        started = now_iso()
        # Claimed before anything is written or moved: a reconcile meanwhile sees a live owner, and
        # one after a kill knows what to settle.
        claim = InFlight(
            kind="rollout",
            source=stable.version,
            target=cand.version,
            run_id=None,
            started_at=started,
            owner=Owner.me(),
        )
        claim.claim(registry, model)
        run_id = registry.open_run(
            f"rollout-{model}-v{cand.version}",
            params={"policy_file": policy_path, **_flat(policy.model_dump(mode="json"))},
            tags={
                "kind": "rollout",
                "model": model,
                "candidate": cand.version,
                "stable": stable.version,
                "candidate_digest": cand.tags["digest"],
                "stable_digest": stable.tags["digest"],
            },
            experiment=ROLLOUTS,
        )
        claim = claim.model_copy(update={"run_id": run_id})
        claim.claim(registry, model)
        # An order left from an earlier rollout of this version must not steer this one.
        registry.delete_model_tag(model, CONTROL)
        registry.tag(
            model,
            cand.version,
            {
                "rollout_status": "in_progress",
                "rollout_started_at": started,
                "rollout_run_id": run_id,
                "rollout_against": stable.version,
            },
        )
        history = cls(registry, plan, run_id, claim, tell=tell)
        for line in repaired:
            history.say(f"{started}: before it began, the reconcile repaired: {line}")
        steps = ", ".join(s.label for s in policy.stages())
        history.say(f"{started}: canary {cand} against champion {stable}; steps {steps}, then 100%")
        return history

    def say(self, line: str) -> None:
        self.lines.append(line)
        self.tell(line)

    def look(self, index: int, stage: Stage, analysis: Analysis, snapshot: dict[str, Any]) -> None:
        self.looks += 1
        metrics = look_metrics(analysis, stage.weight) | {"step": float(index + 1)}
        self.registry.log_metrics(self.run_id, metrics, step=self.looks)

    def pause(self, index: int, stage: Stage, analysis: Analysis | None) -> None:
        """A step hit its time limit undecided: it waits for a person (the tag tells `approve`)."""
        self.registry.tag(
            self.plan.model, self.plan.candidate.version, {"rollout_status": "paused"}
        )
        self.say(f"{now_iso()}: step {index + 1} ({stage.label}) paused, waiting for approval")

    def step(self, r: StepResult) -> None:
        counts = ""
        if r.analysis is not None and r.by != "analysis":  # the analysis's reason holds them
            chosen = r.analysis.verdicts[r.analysis.basis]
            counts = (
                f" ({chosen.n_canary} canary / {chosen.n_stable} stable requests, "
                f"{r.analysis.basis})"
            )
        paused = " after a pause" if r.paused else ""
        self.say(
            f"{now_iso()}: step {r.index + 1}, {r.stage.label}: {r.action}{paused} "
            f"by {r.by} in {r.seconds:.0f} s{counts}: {r.reason}"
        )
        if r.stage.mirror_rps is not None:
            self.say(f"step {r.index + 1} answers: {quality_summary(r.pairs)}")
        self.steps.append(
            {
                "step": r.index + 1,
                "weight": r.stage.weight,
                "audience": r.stage.audience,
                "action": r.action,
                "by": r.by,
                "paused": r.paused,
                "seconds": round(r.seconds, 1),
                "incident_s": round(r.incident_s, 1),  # held while stable was down
                "looks": r.looks,
                "reason": r.reason,
                "mirrored_pairs": list(r.pairs),
                "latency_pairs": list(r.timed),
                "analysis": None
                if r.analysis is None
                else {
                    "decision": r.analysis.decision,
                    "basis": r.analysis.basis,
                    "reasons": list(r.analysis.reasons),
                    "tests": [t.__dict__ for t in r.analysis.tests],
                },
            }
        )
        self.registry.set_run_tag(
            self.run_id, f"step{r.index + 1}", f"{r.action}: {r.reason}"[:4900]
        )
        if r.paused and r.action == "advance":
            self.registry.tag(
                self.plan.model, self.plan.candidate.version, {"rollout_status": "in_progress"}
            )

    def close(self, status: str, reason: str) -> str:
        """Tag the version with the outcome, store story and evidence, end the run, and give up
        the in-flight claim (kept when the gateway is left unsettled: the reconcile needs it);
        the story."""
        model, version = self.plan.model, self.plan.candidate.version
        self.say(f"{now_iso()}: {status.replace('_', ' ')}: {reason}")
        tag_outcome(
            self.registry, model, "rollout", self.plan.stable.version, version, status, reason
        )
        evidence = {
            "model": model,
            "candidate": version,
            "stable": self.plan.stable.version,
            "status": status,
            "reason": reason,
            "steps": self.steps,
        }
        unsettled = status == NEEDS_RECONCILE
        story = write_story(
            self.registry,
            self.run_id,
            f"Rollout of {model} v{version}",
            self.lines,
            evidence,
            run_status="FAILED" if unsettled else "FINISHED",
        )
        if not unsettled:
            InFlight.clear(self.registry, model)
        return story
