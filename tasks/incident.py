"""Incidents: what the runbook (flows/incident.py) does about a paging SLO alert, and the record
each run leaves.

`decide` is pure: from the alert (as Alertmanager sent it) and the state read just before (the
model's route and its backends' circuits from the gateway, its aliases from the registry, the
tenants and their tiers, the runbook's own recent actions) it picks one action:

- `rollback`: a canary is in the route (a rollout in progress): withdraw it; unless the route
  failed over to it and it is the only healthy backend (stable's circuits open), where withdrawing
  it would leave the model with nothing that answers: `hold`, a person decides;
- `revert`: the champion was promoted (not reinstated by a revert) within `revert_within_h` and a
  `previous` is registered: put `previous` back (the revert flow);
- `hold`: the runbook acted on this model within `cooldown_s` (the burn's windows are still
  recovering from what it did): record only;
- `shed`: otherwise, the lowest tier of `shed_tiers` that has tenants: the gateway refuses its
  requests (503 + Retry-After) for `shed_s`, on every instance, through its admin API (audited),
  so the capacity goes to the other tiers;
- `none`: a resolved alert, or one not in `act_on`.

A gateway-wide alert (no `model` label) considers every routed model, in name order, and takes the
first one's rollback, revert or hold; none of them: shed.

The record: an MLflow run in the experiment slipway-incidents (tags: alert, slo, model, action,
outcome, alert_key) with incident.md (timeline, evidence, action, outcome) and incident.json,
and the same markdown as a Prefect artifact. `alert_key` (fingerprint and start) makes the
runbook act once per alert however often Alertmanager repeats it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from configs.alerting import IncidentPolicy
from tasks.gateway_admin import GatewayAdmin, GatewayAdminError
from tasks.registry import Registry
from tasks.servable import CHAMPION

INCIDENTS = "slipway-incidents"  # the MLflow experiment: one run per incident the runbook handles
PREVIOUS = "previous"
REVERTED_FROM = "revert from"  # how a revert's promotion reason begins (flows/revert.py)

Action = Literal["rollback", "revert", "shed", "hold", "none"]


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 time as Alertmanager, MLflow tags and Python write them; None for none, or for
    Alertmanager's zero time (an alert with no end yet)."""
    if not value or value.startswith("0001-01-01"):
        return None
    value = value.replace("Z", "+00:00")
    if "." in value:  # Go writes up to 9 fraction digits; Python reads 6
        head, _, rest = value.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        value = f"{head}.{digits[:6]}{rest[len(digits) :]}"
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Alert:
    """One alert of an Alertmanager webhook (version 4), plus when the webhook received it."""

    name: str
    status: str  # firing or resolved
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    fingerprint: str
    generator_url: str = ""
    received_at: str = ""

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Alert:
        labels = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
        return cls(
            name=labels.get("alertname", ""),
            status=str(raw.get("status", "")),
            labels=labels,
            annotations={str(k): str(v) for k, v in (raw.get("annotations") or {}).items()},
            starts_at=str(raw.get("startsAt", "")),
            fingerprint=str(raw.get("fingerprint", "")),
            generator_url=str(raw.get("generatorURL", "")),
            received_at=str(raw.get("received_at", "")),
        )

    @property
    def model(self) -> str | None:
        return self.labels.get("model") or None

    @property
    def key(self) -> str:
        """The same alert, however often it is sent: its fingerprint and the start of its firing."""
        return f"{self.fingerprint}@{self.starts_at}"

    @property
    def scope(self) -> str:
        return self.model or "gateway"


@dataclass(frozen=True)
class BackendState:
    version: str
    role: str  # stable or canary
    weight: float
    circuit: str  # closed, half-open or open (the best of its replicas')
    failover_requests: int = 0  # served while standing in for a stable that could not

    @property
    def healthy(self) -> bool:
        return self.circuit == "closed"


@dataclass(frozen=True)
class ModelState:
    model: str
    backends: tuple[BackendState, ...]
    failover: bool  # the route lets a healthy canary serve while no stable backend can
    champion: str | None
    previous: str | None
    champion_since: str | None  # when the champion alias last moved, and why
    champion_reason: str = ""
    last_action: tuple[str, str] | None = None  # the runbook's latest (action, ended at) on it

    @property
    def canaries(self) -> list[BackendState]:
        return [b for b in self.backends if b.role == "canary"]


@dataclass(frozen=True)
class State:
    now: datetime
    models: dict[str, ModelState]
    tiers: dict[str, list[str]]  # tier -> its tenants


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    model: str | None = None
    versions: tuple[str, ...] = ()  # rollback: the canaries; revert: (champion, previous)
    tier: str | None = None
    tenants: tuple[str, ...] = ()


def _failed_over_to(model: ModelState, canary: BackendState) -> bool:
    """The route stands on this canary alone: failover on, no stable backend healthy, and it the
    one healthy backend."""
    healthy = [b for b in model.backends if b.healthy]
    stable_down = not any(b.healthy for b in model.backends if b.role == "stable")
    return model.failover and stable_down and healthy == [canary]


def _for_model(model: ModelState, policy: IncidentPolicy, now: datetime) -> Decision | None:
    if model.last_action is not None:
        action, at = model.last_action
        ended = parse_time(at)
        if ended is not None and (now - ended).total_seconds() < policy.cooldown_s:
            ago = (now - ended).total_seconds()
            return Decision(
                "hold",
                f"the runbook's {action} of {model.model} ended {ago:.0f} s ago (cooldown "
                f"{policy.cooldown_s:g} s): its burn windows are still recovering; recorded only",
                model.model,
            )
    if canaries := model.canaries:
        for canary in canaries:
            if _failed_over_to(model, canary):
                stable = ", ".join(
                    f"v{b.version} ({b.circuit})" for b in model.backends if b.role == "stable"
                )
                return Decision(
                    "hold",
                    f"the gateway failed over to canary v{canary.version} "
                    f"({canary.failover_requests} requests), the only healthy backend of "
                    f"{model.model} (stable {stable}): rolling it back would leave nothing "
                    "that answers; a person decides",
                    model.model,
                    (canary.version,),
                )
        versions = tuple(sorted(c.version for c in canaries))
        return Decision(
            "rollback",
            f"a rollout of {model.model} is in progress (canary v{', v'.join(versions)}): "
            "withdraw the canary",
            model.model,
            versions,
        )
    since = parse_time(model.champion_since)
    promoted = not model.champion_reason.startswith(REVERTED_FROM)
    if (
        model.champion
        and model.previous
        and model.previous != model.champion
        and promoted
        and since is not None
        and now - since < timedelta(hours=policy.revert_within_h)
    ):
        hours = (now - since).total_seconds() / 3600
        return Decision(
            "revert",
            f"champion v{model.champion} of {model.model} was promoted {hours:.1f} h ago "
            f"(within {policy.revert_within_h:g} h): put previous v{model.previous} back",
            model.model,
            (model.champion, model.previous),
        )
    return None


def decide(alert: Alert, state: State, policy: IncidentPolicy) -> Decision:
    """The one action for `alert` in `state` (see the module's docstring)."""
    if alert.status != "firing":
        return Decision("none", f"{alert.name} is {alert.status or 'of no status'}: nothing to do")
    if alert.name not in policy.act_on:
        return Decision(
            "none", f"{alert.name} is not one the runbook acts on ({', '.join(policy.act_on)})"
        )
    scope = [alert.model] if alert.model else sorted(state.models)
    for name in scope:
        model = state.models.get(name)
        if model is not None and (decision := _for_model(model, policy, state.now)):
            return decision
    where = f"{alert.model}" if alert.model else "the gateway"
    why = (
        f"no canary in progress and no champion promoted within {policy.revert_within_h:g} h "
        f"for {where}"
    )
    for tier in policy.shed_tiers:
        if tenants := state.tiers.get(tier):
            return Decision(
                "shed",
                f"{why}: shed the lowest tier, '{tier}' ({len(tenants)} tenants)",
                alert.model,
                tier=tier,
                tenants=tuple(sorted(tenants)),
            )
    return Decision(
        "hold",
        f"{why}, and no tenant in a sheddable tier ({', '.join(policy.shed_tiers) or 'none'}): "
        "nothing the runbook may do; a person investigates",
        alert.model,
    )


# ---- reading the state --------------------------------------------------------------------------


def model_state(
    admin: GatewayAdmin, registry: Registry, model: str, last: tuple[str, str] | None
) -> ModelState:
    stats = admin.stats(model, samples=False)
    backends = tuple(
        BackendState(
            version=b["version"],
            role=b["role"],
            weight=float(b["weight"]),
            circuit=b["circuit"],
            failover_requests=int(b.get("failover", {}).get("total_requests", 0)),
        )
        for b in stats["backends"]
    )
    history = registry.alias_history(model, CHAMPION)
    latest = history[-1] if history else {}
    return ModelState(
        model=model,
        backends=backends,
        failover=bool(stats.get("failover")),
        champion=registry.alias(model, CHAMPION),
        previous=registry.alias(model, PREVIOUS),
        champion_since=latest.get("at"),
        champion_reason=latest.get("reason", ""),
        last_action=last,
    )


def last_actions(registry: Registry, models: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Per model, the runbook's latest rollback or revert that acted: (action, ended at)."""
    out: dict[str, tuple[str, str]] = {}
    for model in models:
        runs = registry.finished_runs(
            INCIDENTS,
            f"tags.model = '{model}' and tags.acted = 'true'",
            max_results=1,
        )
        if runs:
            run = runs[0]
            ended = datetime.fromtimestamp(run.info.end_time / 1000, UTC).isoformat()
            out[model] = (run.data.tags.get("action", "?"), ended)
    return out


def read_state(admin: GatewayAdmin, registry: Registry, alert: Alert) -> State:
    """What `decide` reads: the alert's model (or every routed model), the tenants by tier."""
    if alert.model:
        models = [alert.model]
    else:
        models = sorted(r["model"] for r in admin.call("GET", "/admin/routes")["routes"])
    last = last_actions(registry, models)
    found = {}
    for model in models:
        try:
            found[model] = model_state(admin, registry, model, last.get(model))
        except GatewayAdminError as e:
            if "(404)" not in str(e):
                raise
    tiers: dict[str, list[str]] = {}
    for tenant in admin.call("GET", "/admin/tenants")["tenants"]:
        tiers.setdefault(tenant["tier"], []).append(tenant["name"])
    return State(datetime.now(UTC), found, tiers)


def already_handled(registry: Registry, alert: Alert) -> str | None:
    """The run id of the incident already recorded for this very alert (same fingerprint and
    start), or None."""
    found = registry.client.get_experiment_by_name(INCIDENTS)
    if found is None:
        return None
    runs = registry.client.search_runs(
        [found.experiment_id], filter_string=f"tags.alert_key = '{alert.key}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


# ---- the record ----------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class IncidentRecord:
    """One incident: the timeline (time, what happened), the evidence, the action and its
    outcome."""

    alert: Alert
    timeline: list[tuple[str, str]] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    decision: Decision | None = None
    outcome: str = "open"
    detail: str = ""

    def at(self, when: str, what: str) -> None:
        self.timeline.append((when, what))

    def now(self, what: str) -> None:
        self.at(now_iso(), what)

    @property
    def title(self) -> str:
        return f"Incident: {self.alert.name} on {self.alert.labels.get('slo', self.alert.scope)}"

    def markdown(self) -> str:
        d = self.decision
        action = "(none decided)" if d is None else f"**{d.action}**: {d.reason}"
        lines = [
            f"# {self.title}",
            "",
            f"- alert: `{self.alert.name}` {self.alert.status}, labels "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.alert.labels.items())),
            f"- summary: {self.alert.annotations.get('summary', '')}",
            f"- action: {action}",
            f"- outcome: **{self.outcome}**{': ' + self.detail if self.detail else ''}",
            "",
            "## Timeline (UTC)",
            "",
            *(f"- {when}: {what}" for when, what in sorted(self.timeline)),
            "",
            "## Evidence",
            "",
            "```json",
            json.dumps(self.evidence, indent=2, default=str),
            "```",
        ]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "alert": asdict(self.alert),
            "decision": asdict(self.decision) if self.decision else None,
            "outcome": self.outcome,
            "detail": self.detail,
            "timeline": [{"at": when, "what": what} for when, what in sorted(self.timeline)],
            "evidence": self.evidence,
        }

    def write(self, registry: Registry, extra_tags: dict[str, str]) -> str:
        """The MLflow run (experiment slipway-incidents) with incident.md and incident.json;
        returns its id."""
        d = self.decision
        action = d.action if d else "none"
        acted = d is not None and d.action in ("rollback", "revert") and self.outcome == "done"
        tags = {
            "kind": "incident",
            "alert": self.alert.name,
            "alert_key": self.alert.key,
            "slo": self.alert.labels.get("slo", ""),
            "model": (d.model if d and d.model else self.alert.model) or "",
            "action": action,
            "outcome": self.outcome,
            "acted": str(acted).lower(),
            **extra_tags,
        }
        run_id = registry.open_run(
            f"incident-{self.alert.name}-{self.alert.scope}",
            params={"reason": d.reason if d else "", "detail": self.detail},
            tags=tags,
            experiment=INCIDENTS,
        )
        with tempfile.TemporaryDirectory() as workdir:
            files = [Path(workdir) / "incident.md", Path(workdir) / "incident.json"]
            files[0].write_text(self.markdown() + "\n")
            files[1].write_text(json.dumps(self.as_json(), indent=2, default=str) + "\n")
            registry.close_run(run_id, files)
        return run_id
