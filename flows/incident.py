"""The incident runbook: a paging SLO alert, sent by Alertmanager to the incident webhook and
turned into a `slipway.alert.firing` event, runs this flow (the incident automation,
tasks/incident_automation.py). It reads the state, decides (tasks/incident.py: roll a canary
back, revert a fresh champion to `previous`, or shed the lowest tier; hold where acting would make
things worse), acts through the gateway's admin API, which audits every change, checks the
outcome, and records the incident (timeline, evidence, action, outcome) in MLflow (experiment
slipway-incidents) and as a Prefect artifact `incident-<scope>`.

alert: one alert as Alertmanager sends it (labels, annotations, startsAt, fingerprint, status),
plus `received_at` from the webhook. previous_url: a revert serves `previous` from this running
server instead of reusing or starting its vLLM (flows/revert.py).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run

from configs.alerting import DEFAULT_ALERTING, load_alerting_config
from configs.home import Home
from flows.revert import revert
from tasks.gateway_admin import GatewayAdmin
from tasks.incident import (
    Alert,
    Decision,
    IncidentRecord,
    State,
    already_handled,
    decide,
    read_state,
)
from tasks.registry import Registry
from tasks.rollout.control import roll_back_by_hand
from tasks.servable import CHAMPION


@task(name="read-state", cache_policy=NO_CACHE)
def read_state_task(admin: GatewayAdmin, registry: Registry, alert: Alert) -> State:
    return read_state(admin, registry, alert)


def _evidence(alert: Alert, state: State) -> dict[str, Any]:
    return {
        "alert": {
            "labels": alert.labels,
            "annotations": alert.annotations,
            "starts_at": alert.starts_at,
            "prometheus": alert.generator_url,
        },
        "models": {
            name: {
                "champion": m.champion,
                "previous": m.previous,
                "champion_since": m.champion_since,
                "champion_reason": m.champion_reason,
                "failover": m.failover,
                "backends": [
                    {
                        "version": b.version,
                        "role": b.role,
                        "weight": b.weight,
                        "circuit": b.circuit,
                        "failover_requests": b.failover_requests,
                    }
                    for b in m.backends
                ],
                "runbook_last_action": m.last_action,
            }
            for name, m in state.models.items()
        },
        "tenants_by_tier": state.tiers,
    }


def _reason(alert: Alert) -> str:
    burn = alert.annotations.get("burn_rate")
    over = alert.annotations.get("windows")
    told = f" ({burn}x the error budget over {over})" if burn and over else ""
    return f"incident: {alert.name} on {alert.labels.get('slo', alert.scope)}{told}"


@task(name="act", cache_policy=NO_CACHE)
def act_task(
    decision: Decision,
    alert: Alert,
    home: Home,
    admin: GatewayAdmin,
    registry: Registry,
    gateway_url: str | None,
    previous_url: str | None,
    shed_s: float,
) -> tuple[str, str]:
    """Carry the decision out and check it took; (outcome, detail). Outcomes: done, refused (the
    revert's own checks said no; nothing moved), recorded (hold, none: nothing applied)."""
    if decision.action == "rollback":
        assert decision.model is not None
        withdrawn = roll_back_by_hand(home, decision.model, _reason(alert), gateway_url)
        left = [
            b["version"] for b in admin.route(decision.model)["backends"] if b["role"] != "stable"
        ]
        if left:
            return "failed", f"canary v{', v'.join(left)} still in the route after the rollback"
        return "done", f"withdrew canary v{', v'.join(withdrawn) or ' (none left)'}"
    if decision.action == "revert":
        assert decision.model is not None
        model, (current, previous) = decision.model, decision.versions
        from tasks.rollout.reconcile import Busy
        from tasks.rollout.revert import RevertRefused

        try:
            revert(model, _reason(alert), gateway_url, previous_url)
        except (RevertRefused, Busy) as e:
            return "refused", f"the revert refused, nothing moved: {e}"
        champion = registry.alias(model, CHAMPION)
        served = sorted(b["version"] for b in admin.route(model)["backends"] if b["weight"] > 0)
        if champion != previous or served != [previous]:
            return (
                "failed",
                f"after the revert champion is v{champion}, the gateway serves {served}",
            )
        return "done", f"v{previous} is champion again and served alone; v{current} withdrawn"
    if decision.action == "shed":
        assert decision.tier is not None
        admin.shed_tier(decision.tier, shed_s, _reason(alert))
        shed = {s["tier"]: s for s in admin.call("GET", "/admin/tiers")["sheds"]}
        if not shed.get(decision.tier, {}).get("active"):
            return "failed", f"tier '{decision.tier}' is not shed after the request"
        tenants = ", ".join(decision.tenants)
        return "done", (
            f"shed tier '{decision.tier}' (tenants {tenants}) for {shed_s:g} s: its requests "
            "get 503 + Retry-After on every gateway instance"
        )
    return "recorded", "nothing applied"


def _audit_since(admin: GatewayAdmin, decision: Decision, since: float) -> list[dict[str, Any]]:
    """The gateway's audit entries since `since` (Unix seconds) for what the runbook acted on:
    the model's route, or the tier it shed."""
    wanted = {("route.", decision.model), ("tier.", decision.tier)}
    entries = admin.call("GET", "/admin/audit", params={"limit": "200"})
    return [
        {k: e.get(k) for k in ("time", "actor", "action", "target", "request_id")}
        for e in entries["records"]
        if e["time"] >= since
        and any(e["action"].startswith(a) and e["target"] == t for a, t in wanted if t)
    ]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


@flow(name="incident")
def incident(
    alert: dict[str, Any],
    event_id: str = "",
    gateway_url: str | None = None,
    previous_url: str | None = None,
    config_path: str | None = None,
) -> str:
    """Handle one alert: decide, act, check, record. Returns '<action>: <outcome>', or
    'duplicate: <run id>' for an alert already handled (Alertmanager repeats firing alerts)."""
    say = get_run_logger().info
    home = Home.from_env()
    registry = Registry(home)
    policy = load_alerting_config(config_path or DEFAULT_ALERTING).incidents
    parsed = Alert.of(alert)
    record = IncidentRecord(parsed)
    record.at(parsed.starts_at, f"Prometheus: {parsed.name} {parsed.status} ({_reason(parsed)})")
    if parsed.received_at:
        record.at(parsed.received_at, "webhook: received from Alertmanager, event emitted")
    record.now(f"runbook: flow run {flow_run.get_id()} started for event {event_id or '-'}")
    if seen := already_handled(registry, parsed):
        say("%s (%s) was handled already: MLflow run %s", parsed.name, parsed.key, seen)
        return f"duplicate: {seen}"
    admin = GatewayAdmin.of(home, gateway_url)
    state = read_state_task(admin, registry, parsed)
    record.evidence = _evidence(parsed, state)
    record.now(f"state read: {', '.join(state.models) or 'no routed model'}")
    decision = decide(parsed, state, policy)
    record.decision = decision
    record.now(f"decided: {decision.action}: {decision.reason}")
    say("decided %s: %s", decision.action, decision.reason)
    since = time.time()
    try:
        record.outcome, record.detail = act_task(
            decision, parsed, home, admin, registry, gateway_url, previous_url, policy.shed_s
        )
    except BaseException as e:
        record.outcome, record.detail = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        record.now(f"outcome: {record.outcome}: {record.detail}")
        record.evidence["audit"] = _audit_since(admin, decision, since - 1)
        run_id = record.write(
            registry, {"event_id": event_id, "flow_run_id": str(flow_run.get_id() or "")}
        )
        create_markdown_artifact(
            record.markdown(),
            key=f"incident-{_slug(parsed.scope)}",
            description=f"{decision.action}: {record.outcome}"[:500],
        )
        emit_event(
            event=f"slipway.incident.{record.outcome}",
            resource={
                "prefect.resource.id": f"slipway.alert.{parsed.fingerprint}",
                "slipway.alertname": parsed.name,
                "slipway.model": decision.model or "",
            },
            payload={"action": decision.action, "detail": record.detail, "run_id": run_id},
        )
        say("incident recorded: MLflow run %s; %s: %s", run_id, record.outcome, record.detail)
    return f"{decision.action}: {record.outcome}"
