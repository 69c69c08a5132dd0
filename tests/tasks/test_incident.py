"""The incident runbook's decisions (tasks/incident.py, `decide`) on stub states: each alert kind
and state to its action, the failover exception, the cooldown, the lowest sheddable tier; and the
incident webhook's translation of Alertmanager's JSON into events (serving/stack/alert_webhook.py)
with a stub emitter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import httpx
import pytest

from configs.alerting import IncidentPolicy
from evaluation.benchmarks.mock_upstream import serve
from serving.stack.alert_webhook import BadNotification, build_app, events
from tasks.incident import (
    Alert,
    BackendState,
    ModelState,
    State,
    decide,
    parse_time,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = IncidentPolicy(
    act_on=("SloErrorBudgetBurnFast",), revert_within_h=72, cooldown_s=900, shed_tiers=("batch",)
)
TIERS = {"premium": ["acme"], "standard": ["globex"], "batch": ["initech", "hooli"]}


def alert(model: str | None = "m", name: str = "SloErrorBudgetBurnFast", status: str = "firing"):
    labels = {"alertname": name, "severity": "page", "slo": f"{model or 'gateway'}-availability"}
    if model:
        labels["model"] = model
    return Alert.of(
        {
            "status": status,
            "labels": labels,
            "annotations": {"burn_rate": "14.4", "windows": "1h and 5m"},
            "startsAt": "2026-03-01T11:58:00.123456789Z",
            "fingerprint": "abc123",
        }
    )


def stable(version: str = "2", circuit: str = "closed", weight: float = 100) -> BackendState:
    return BackendState(version, "stable", weight, circuit)


def canary(version: str = "3", circuit: str = "closed", weight: float = 10, failover: int = 0):
    return BackendState(version, "canary", weight, circuit, failover)


def model(
    *backends: BackendState,
    failover: bool = False,
    champion: str | None = "2",
    previous: str | None = "1",
    promoted_h_ago: float | None = 500,
    reason: str = "rollout: every step not worse",
    last_action: tuple[str, str] | None = None,
    name: str = "m",
) -> ModelState:
    since = None if promoted_h_ago is None else (NOW - timedelta(hours=promoted_h_ago)).isoformat()
    return ModelState(
        name,
        tuple(backends) or (stable(),),
        failover,
        champion,
        previous,
        since,
        reason,
        last_action,
    )


def state(*models: ModelState, tiers: dict | None = None) -> State:
    return State(NOW, {m.model: m for m in models}, TIERS if tiers is None else tiers)


def test_a_canary_in_progress_is_rolled_back():
    d = decide(alert(), state(model(stable(weight=90), canary())), POLICY)
    assert (d.action, d.model, d.versions) == ("rollback", "m", ("3",))


def test_every_canary_is_rolled_back_even_at_weight_zero():
    s = state(model(stable(), canary("3", weight=0), canary("4", weight=0)))
    d = decide(alert(), s, POLICY)
    assert (d.action, d.versions) == ("rollback", ("3", "4"))


def test_a_canary_the_gateway_failed_over_to_and_the_only_healthy_backend_is_kept():
    s = state(model(stable(circuit="open"), canary(failover=42), failover=True))
    d = decide(alert(), s, POLICY)
    assert (d.action, d.versions) == ("hold", ("3",))
    assert "failed over to canary v3 (42 requests), the only healthy backend" in d.reason


@pytest.mark.parametrize(
    "backends, failover",
    [
        (
            (stable(circuit="open"), canary()),
            False,
        ),  # the route has no failover: nothing stands on it
        ((stable(circuit="half-open"), stable("5"), canary()), True),  # another stable is healthy
        ((stable(circuit="open"), canary(circuit="open")), True),  # the canary is down too
        ((stable(circuit="open"), canary(), canary("4")), True),  # not the only healthy backend
    ],
)
def test_without_a_failover_onto_the_canary_alone_it_is_rolled_back(backends, failover):
    d = decide(alert(), state(model(*backends, failover=failover)), POLICY)
    assert d.action == "rollback"


def test_a_champion_burning_budget_after_a_promotion_is_reverted():
    d = decide(alert(), state(model(promoted_h_ago=2)), POLICY)
    assert (d.action, d.model, d.versions) == ("revert", "m", ("2", "1"))
    assert "promoted 2.0 h ago" in d.reason


@pytest.mark.parametrize(
    "changes",
    [
        {"promoted_h_ago": 73},  # promoted too long ago to be suspected
        {"previous": None},  # nothing to go back to
        {"previous": "2"},  # previous is the champion itself
        {"promoted_h_ago": 1, "reason": "revert from v3: incident"},  # reinstated, not promoted
        {"promoted_h_ago": None},  # no alias history
    ],
)
def test_a_champion_not_freshly_promoted_is_not_reverted_the_lowest_tier_is_shed(changes):
    d = decide(alert(), state(model(**changes)), POLICY)
    assert (d.action, d.tier, d.tenants) == ("shed", "batch", ("hooli", "initech"))


def test_shedding_takes_the_first_tier_with_tenants_and_never_one_not_named():
    policy = POLICY.model_copy(update={"shed_tiers": ("free", "batch", "standard")})
    d = decide(alert(), state(model(), tiers={"batch": ["b"], "standard": ["s"]}), policy)
    assert (d.action, d.tier, d.tenants) == ("shed", "batch", ("b",))
    d = decide(alert(), state(model(), tiers={"premium": ["p"], "standard": ["s"]}), POLICY)
    assert d.action == "hold" and "no tenant in a sheddable tier (batch)" in d.reason


def test_after_the_runbook_acted_further_alerts_are_recorded_only_until_the_cooldown_ends():
    recent = ("revert", (NOW - timedelta(seconds=60)).isoformat())
    s = state(model(stable(weight=90), canary(), last_action=recent))
    d = decide(alert(), s, POLICY)
    assert d.action == "hold" and "revert of m ended 60 s ago (cooldown 900 s)" in d.reason
    old = ("revert", (NOW - timedelta(seconds=901)).isoformat())
    s = state(model(stable(weight=90), canary(), last_action=old))
    assert decide(alert(), s, POLICY).action == "rollback"


def test_resolved_alerts_and_alerts_not_acted_on_do_nothing():
    s = state(model(stable(weight=90), canary()))
    assert decide(alert(status="resolved"), s, POLICY).action == "none"
    d = decide(alert(name="SloErrorBudgetBurnTicket"), s, POLICY)
    assert d.action == "none" and "not one the runbook acts on" in d.reason


def test_a_gateway_wide_alert_acts_on_the_first_model_that_explains_it():
    quiet = model(name="a")
    rolling = model(stable(weight=90), canary(), name="b")
    fresh = model(promoted_h_ago=1, name="c")
    d = decide(alert(model=None), state(quiet, rolling, fresh), POLICY)
    assert (d.action, d.model) == ("rollback", "b")
    d = decide(alert(model=None), state(quiet, fresh), POLICY)
    assert (d.action, d.model) == ("revert", "c")
    d = decide(alert(model=None), state(quiet), POLICY)
    assert (d.action, d.model, d.tier) == ("shed", None, "batch")


def test_an_alert_for_a_model_acts_on_that_model_only():
    other = model(stable(weight=90), canary(), name="other")
    d = decide(alert(model="m"), state(model(), other), POLICY)
    assert d.action == "shed"  # m has no canary and no fresh champion; other's canary is not m's


def test_alert_times_as_alertmanager_writes_them():
    a = alert()
    assert parse_time(a.starts_at) == datetime(2026, 3, 1, 11, 58, 0, 123456, tzinfo=UTC)
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert a.key == "abc123@2026-03-01T11:58:00.123456789Z" and a.model == "m"


NOTIFICATION = {
    "version": "4",
    "groupKey": '{}:{alertname="SloErrorBudgetBurnFast"}',
    "status": "firing",
    "receiver": "slipway-incidents",
    "externalURL": "http://alertmanager:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "SloErrorBudgetBurnFast",
                "slo": "m-availability",
                "model": "m",
            },
            "annotations": {"summary": "burning"},
            "startsAt": "2026-03-01T11:58:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "fingerprint": "f1",
        },
        {
            "status": "resolved",
            "labels": {"alertname": "SloErrorBudgetBurnSlow", "slo": "gateway-availability"},
            "annotations": {},
            "startsAt": "2026-03-01T10:00:00Z",
            "endsAt": "2026-03-01T11:00:00Z",
            "fingerprint": "f2",
        },
    ],
}


def test_each_alert_of_a_notification_becomes_one_event():
    found = events(NOTIFICATION, "2026-03-01T11:58:01Z")
    assert [(name, res["prefect.resource.id"]) for name, res, _ in found] == [
        ("slipway.alert.firing", "slipway.alert.f1"),
        ("slipway.alert.resolved", "slipway.alert.f2"),
    ]
    _, res, payload = found[0]
    assert res["slipway.alertname"] == "SloErrorBudgetBurnFast" and res["slipway.model"] == "m"
    assert "slipway.model" not in found[1][1]  # a gateway-wide alert has no model
    assert payload["alert"]["received_at"] == "2026-03-01T11:58:01Z"
    assert payload["alert"]["fingerprint"] == "f1" and payload["receiver"] == "slipway-incidents"
    for bad in ({"version": "3", "alerts": []}, {"version": "4"}, {"version": "4", "alerts": [{}]}):
        with pytest.raises(BadNotification):
            events(bad, "now")


def test_the_webhook_checks_its_token_and_answers_503_when_no_event_can_be_emitted():
    emitted: list[dict] = []

    def emit(**kwargs):
        emitted.append(kwargs)
        return SimpleNamespace(id=f"id-{len(emitted)}")

    with serve(build_app(token="s3cret", emit=emit)) as url:
        assert httpx.post(f"{url}/alerts", json=NOTIFICATION).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(f"{url}/alerts", json=NOTIFICATION, headers=wrong).status_code == 401
        assert emitted == []
        good = {"Authorization": "Bearer s3cret"}
        r = httpx.post(f"{url}/alerts", json=NOTIFICATION, headers=good)
        assert r.status_code == 200, r.text
        assert [e["id"] for e in r.json()["emitted"]] == ["id-1", "id-2"]
        assert [e["event"] for e in emitted] == ["slipway.alert.firing", "slipway.alert.resolved"]
        r = httpx.post(f"{url}/alerts", content=b"{not json", headers=good)
        assert r.status_code == 400
    with serve(build_app(emit=lambda **_: None)) as url:
        r = httpx.post(f"{url}/alerts", json=NOTIFICATION)
        assert r.status_code == 503 and "no Prefect API" in r.json()["error"]
