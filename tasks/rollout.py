"""The rollout's stages as plain functions (thin Prefect tasks at the end): check the candidate,
put it beside stable at weight 0, judge each step from the gateway's statistics, then promote it
or roll it back, and record every step in MLflow, Prefect events and the policy's webhook.

Who steers: the flow, through the gateway's admin API. A person steers through the registered
model's `rollout.control` tag (`python -m flows.rollout rollback|approve MODEL`), which the flow
reads at every look; `rollback` also withdraws the canary itself at once, so it works even when no
flow is running.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from configs.home import Home
from configs.rollout import RolloutPolicy, Stage
from evaluation.canary import Analysis, ArmSamples, analyse
from serving.stack import CHAMPION, Champion, StackError, answers, vet
from tasks.registry import Registry
from tasks.serving_control import GatewayAdmin, RunningVersion, ServingControlError

log = logging.getLogger(__name__)

ROLLOUTS = "slipway-rollouts"  # the MLflow experiment: one run per rollout
CONTROL = "rollout.control"  # registered-model tag a person writes to steer a running rollout
DRAIN_S = 30.0  # longest wait for requests in flight on a withdrawn backend
PROGRESS_EVERY_S = 10.0

Action = Literal["advance", "rollback"]


class RolloutRefused(RuntimeError):
    """A precondition failed before any traffic moved; nothing was changed."""


class AlreadyChampion(RolloutRefused):
    """Nothing to do: the candidate already serves as champion (e.g. a first release, whose
    registration also triggers the auto-rollout)."""


# ---- preconditions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the preconditions established: who is stable, who is the candidate, and the route."""

    model: str
    candidate: Champion
    stable: Champion
    stable_backends: tuple[dict[str, Any], ...]  # as the gateway describes them


def resolve(registry: Registry, model: str, candidate: str) -> str:
    """A version number, an alias (e.g. `challenger`) or a variant label (the newest version
    with that `variant` tag, e.g. `gptq-w8a8`) as a version number."""
    if candidate.isdigit():
        try:
            registry.client.get_model_version(model, candidate)
        except MlflowException:
            raise RolloutRefused(f"{model} has no version {candidate}") from None
        return candidate
    if (version := registry.alias(model, candidate)) is not None:
        return version
    found = registry.client.search_model_versions(f"name='{model}' and tags.variant='{candidate}'")
    if found:
        return max((str(v.version) for v in found), key=int)
    raise RolloutRefused(
        f"'{candidate}' is neither a version, an alias nor a variant of {model}; "
        "see the registered versions in MLflow"
    )


def preconditions(registry: Registry, admin: GatewayAdmin, model: str, candidate: str) -> Plan:
    """Raise RolloutRefused unless the candidate may take traffic: its evaluation passed, its
    signature verifies against its files and their digest is the registry's, it is not already
    champion, and the gateway serves exactly the champion as stable with no canary."""
    version = resolve(registry, model, candidate)
    champion = registry.alias(model, CHAMPION)
    if champion is None:
        raise RolloutRefused(
            f"{model} has no champion to canary against: the release makes the first one"
        )
    if version == champion:
        raise AlreadyChampion(f"{model} v{version} is already the champion: nothing to roll out")
    home = registry.home
    tags = registry.tags(model, version)
    if tags.get("rollout_status") in ("in_progress", "paused"):
        raise RolloutRefused(
            f"{model} v{version} is already being rolled out (rollout_status="
            f"{tags['rollout_status']}); approve or roll back that one first"
        )
    cand = Champion(model, version, tags, home)
    try:
        vet(cand, role="candidate")
    except StackError as e:
        raise RolloutRefused(str(e)) from e
    try:
        route = admin.route(model)
    except ServingControlError as e:
        raise RolloutRefused(f"the gateway cannot serve a canary of {model}: {e}") from e
    if canaries := [b["version"] for b in route["backends"] if b["role"] == "canary"]:
        raise RolloutRefused(
            f"the gateway already routes {model} to canary v{', v'.join(canaries)}: another "
            f"rollout is running or was cut off; `python -m flows.rollout rollback {model}` "
            "withdraws it"
        )
    stable = tuple(b for b in route["backends"] if b["weight"] > 0)
    if {b["version"] for b in stable} != {champion}:
        serving = ", ".join(f"v{b['version']}" for b in stable) or "nothing"
        raise RolloutRefused(
            f"the gateway serves {serving} as {model}'s stable, but the registry's champion is "
            f"v{champion}: restart the stack (`make down && make up`) so they agree"
        )
    stable_champion = Champion(model, champion, registry.tags(model, champion), home)
    return Plan(model, cand, stable_champion, stable)


# ---- the route -----------------------------------------------------------------------------------


def _spec(backend: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A backend as PUT /admin/routes wants it (the description also carries weight and more)."""
    keys = ("version", "url", "served_model", "digest", "verified", "weight", "role",
            "max_concurrency")  # fmt: skip
    spec = {k: backend[k] for k in keys if backend.get(k) is not None} | changes
    return spec | {"expected_digest": spec["digest"]}


def add_canary(admin: GatewayAdmin, plan: Plan, running: RunningVersion) -> None:
    """The candidate joins the route as canary at weight 0: reachable, but no traffic yet."""
    cand = plan.candidate
    canary = {
        "version": cand.version, "url": running.url, "served_model": cand.served_name,
        "digest": cand.tags["digest"], "verified": True, "weight": 0, "role": "canary",
    }  # fmt: skip
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
    admin.put_route(model, [
        _spec(b, weight=100.0 * b["weight"] / total if total else 100.0 / len(stable)) for b in stable
    ])  # fmt: skip
    return sorted(versions)


def make_stable(admin: GatewayAdmin, plan: Plan) -> None:
    """Promotion in the gateway: all traffic to the candidate, then (drained) it alone, as stable."""
    model, cand = plan.model, plan.candidate
    old = {b["version"] for b in plan.stable_backends}
    admin.set_weights(model, {cand.version: 100.0} | dict.fromkeys(old, 0.0))
    _drain(admin, model, old)
    canary = next(b for b in admin.route(model)["backends"] if b["version"] == cand.version)
    admin.put_route(model, [_spec(canary, role="stable", weight=100.0)])


# ---- judging a step ------------------------------------------------------------------------------


def arms(backend: dict[str, Any]) -> list[ArmSamples]:
    """A backend's organic and synthetic samples from the gateway's statistics."""
    return [
        ArmSamples.from_snapshot(backend, "organic"),
        ArmSamples.from_snapshot(backend["synthetic"], "synthetic"),
    ]


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
    looks: int = field(default=0)

    def control(self) -> dict[str, str] | None:
        """A person's instruction for this rollout, consumed when read."""
        raw = self.registry.client.get_registered_model(self.model).tags.get(CONTROL)
        if not raw:
            return None
        order = json.loads(raw)
        if order.get("version") != self.version:
            return None
        self.registry.client.delete_registered_model_tag(self.model, CONTROL)
        return order


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
    share = (100.0 - stage.weight) / len(stable)
    admin.set_weights(
        model, {cand: float(stage.weight)} | dict.fromkeys(stable, share), stage.audience
    )
    start = last_said = time.monotonic()
    paused = False
    analysis: Analysis | None = None

    def result(action: Action, reason: str, by: str = "analysis") -> StepResult:
        seconds = time.monotonic() - start
        return StepResult(index, stage, action, reason, seconds, steer.looks, paused, analysis, by)

    while True:
        time.sleep(policy.look_interval_s)
        steer.looks += 1
        if order := steer.control():
            action: Action = "rollback" if order["action"] == "rollback" else "advance"
            return result(action, f"{order['action']} by hand: {order.get('reason', '')}", "person")
        if not answers(steer.canary_url + "/health"):
            return result(
                "rollback",
                f"the canary at {steer.canary_url} stopped answering /health",
                "health check",
            )
        snapshot = admin.stats(model)
        canary = [b for b in snapshot["backends"] if b["version"] == cand]
        if any(b["circuit"] != "closed" for b in canary):
            # Its requests now go to stable, so the analysis would starve: the gateway has judged.
            return result("rollback", "the gateway opened the canary's circuit after consecutive "
                          f"failures ({canary[0]['errors']} errors in {canary[0]['requests']} requests)",
                          "health check")  # fmt: skip
        stables = [b for b in snapshot["backends"] if b["version"] in stable]
        stable_arms = [a for b in stables for a in arms(b)]
        if any(a.requests for a in stable_arms):  # else nothing to compare the canary with yet
            analysis = analyse(stable_arms, [a for b in canary for a in arms(b)], stage.analysis)
            steer.on_look(index, stage, analysis, snapshot)
            if analysis.decision == "worse":
                return result("rollback", "; ".join(analysis.reasons))
            if analysis.decision == "not_worse":
                return result("advance", "; ".join(analysis.reasons))
        now = time.monotonic()
        if now - last_said >= PROGRESS_EVERY_S:
            last_said = now
            said = "; ".join(analysis.reasons[:2]) if analysis else "no stable requests yet"
            steer.say(f"step {index + 1} ({stage.weight}%): {said}")
        if not paused and now - start >= stage.max_seconds:
            why = f"inconclusive after {stage.max_seconds:.0f} s"
            if analysis is not None:
                why += f" ({'; '.join(analysis.reasons)})"
            if policy.on_inconclusive == "rollback":
                return result("rollback", why, "time limit")
            paused = True
            steer.on_pause(index, stage, analysis)
            steer.say(
                f"step {index + 1} paused, {why}: approve with `python -m flows.rollout approve "
                f"{model}` or roll back with `python -m flows.rollout rollback {model}`"
            )  # fmt: skip


# ---- telling people ------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def announce(event: str, plan: Plan, payload: dict[str, Any], webhook_url: str | None) -> None:
    """A Prefect event (automations and notifications react to it) and the policy's webhook.
    A webhook that fails is logged, never fatal: the rollout's decision stands."""
    model, version = plan.model, plan.candidate.version
    emit_event(
        event=f"slipway.rollout.{event}",
        resource={
            "prefect.resource.id": f"slipway.model.{model}.{version}",
            "slipway.model": model,
            "slipway.version": version,
        },
        payload=payload,
    )
    if webhook_url:
        body = {"event": f"slipway.rollout.{event}", "model": model, "version": version} | payload
        try:
            httpx.post(webhook_url, json=body, timeout=5).raise_for_status()
        except httpx.HTTPError as e:
            log.warning("webhook %s failed for %s: %s", webhook_url, event, e)


def look_metrics(analysis: Analysis, weight: int) -> dict[str, float]:
    """One look as MLflow metrics: counts, and each test's statistic and limit."""
    metrics = {"canary_weight": float(weight)}
    for basis, verdict in analysis.verdicts.items():
        basis = basis.replace("+", "_and_")  # MLflow metric names allow no '+'
        metrics[f"{basis}.canary_requests"] = verdict.n_canary
        metrics[f"{basis}.stable_requests"] = verdict.n_stable
    for t in analysis.tests:
        name = t.metric if t.kind == "comparison" else f"slo.{t.metric}"
        metrics |= {
            f"{name}.stable": t.stable, f"{name}.canary": t.canary,
            f"{name}.p_worse": t.p_worse, f"{name}.p_not_worse": t.p_not_worse,
        }  # fmt: skip
    return {k: float(v) for k, v in metrics.items() if not math.isnan(v)}  # NaN: no samples yet


# ---- history -------------------------------------------------------------------------------------


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
    ) -> History:
        model, cand, stable = plan.model, plan.candidate, plan.stable
        run_id = registry.open_run(
            f"rollout-{model}-v{cand.version}",
            params={"policy_file": policy_path, **_flat(policy.model_dump(mode="json"))},
            tags={"model": model, "candidate": cand.version, "stable": stable.version,
                  "candidate_digest": cand.tags["digest"], "stable_digest": stable.tags["digest"]},
            experiment=ROLLOUTS,
        )  # fmt: skip
        # An order left from an earlier rollout of this version must not steer this one.
        if CONTROL in registry.client.get_registered_model(model).tags:
            registry.client.delete_registered_model_tag(model, CONTROL)
        started = now_iso()
        registry.tag(model, cand.version, {
            "rollout_status": "in_progress", "rollout_started_at": started,
            "rollout_run_id": run_id, "rollout_against": stable.version,
        })  # fmt: skip
        history = cls(registry, plan, run_id, tell=tell)
        steps = ", ".join(
            f"{s.weight}%" + (" (opted-in tenants)" if s.audience == "opted_in" else "")
            for s in policy.stages()
        )
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
        self.say(f"{now_iso()}: step {index + 1} ({stage.weight}%) paused, waiting for approval")

    def step(self, r: StepResult) -> None:
        audience = " of opted-in tenants" if r.stage.audience == "opted_in" else ""
        counts = ""
        if r.analysis is not None and r.by != "analysis":  # the analysis's reason holds them
            chosen = r.analysis.verdicts[r.analysis.basis]
            counts = f" ({chosen.n_canary} canary / {chosen.n_stable} stable requests, {r.analysis.basis})"
        paused = " after a pause" if r.paused else ""
        self.say(
            f"{now_iso()}: step {r.index + 1}, {r.stage.weight}%{audience}: {r.action}{paused} "
            f"by {r.by} in {r.seconds:.0f} s{counts}: {r.reason}"
        )
        self.steps.append({
            "step": r.index + 1, "weight": r.stage.weight, "audience": r.stage.audience,
            "action": r.action, "by": r.by, "paused": r.paused, "seconds": round(r.seconds, 1),
            "looks": r.looks, "reason": r.reason,
            "analysis": None if r.analysis is None else {
                "decision": r.analysis.decision, "basis": r.analysis.basis,
                "reasons": list(r.analysis.reasons),
                "tests": [t.__dict__ for t in r.analysis.tests],
            },
        })  # fmt: skip
        self.registry.client.set_tag(
            self.run_id, f"step{r.index + 1}", f"{r.action}: {r.reason}"[:4900]
        )
        if r.paused and r.action == "advance":
            self.registry.tag(
                self.plan.model, self.plan.candidate.version, {"rollout_status": "in_progress"}
            )

    def close(self, status: str, reason: str, workdir: Path) -> str:
        """Tag the version with the outcome, store story and evidence, end the run; the story."""
        model, version = self.plan.model, self.plan.candidate.version
        ended = now_iso()
        self.say(f"{ended}: {status.replace('_', ' ')}: {reason}")
        self.registry.tag(model, version, {
            "rollout_status": status, "rollout_ended_at": ended, "rollout_reason": reason[:4900],
        })  # fmt: skip
        story = "\n".join([f"# Rollout of {model} v{version}", "", *(f"- {line}" for line in self.lines),
                           "", f"MLflow run `{self.run_id}` (experiment `{ROLLOUTS}`) holds every look."])  # fmt: skip
        (workdir / "story.md").write_text(story + "\n")
        evidence = {"model": model, "candidate": version, "stable": self.plan.stable.version,
                    "status": status, "reason": reason, "steps": self.steps}  # fmt: skip
        (workdir / "evidence.json").write_text(json.dumps(evidence, indent=2, default=str) + "\n")
        self.registry.client.set_tag(self.run_id, "rollout_status", status)
        self.registry.close_run(self.run_id, [workdir / "story.md", workdir / "evidence.json"])
        return story


# ---- Prefect -------------------------------------------------------------------------------------


@task(name="preconditions", cache_policy=NO_CACHE)
def preconditions_task(home: Home, admin: GatewayAdmin, model: str, candidate: str) -> Plan:
    return preconditions(Registry(home), admin, model, candidate)


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
