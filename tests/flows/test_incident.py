"""Incidents that act, against the real parts: the incident webhook, the session's Prefect server
(events, the incident automation, the runbook deployment served by a runner process), the real
gateway (its admin API and audit log), the MLflow registry and the mock upstream.

- webhook -> event -> automation -> runbook (make test): an Alertmanager notification of a fast
  burn on a model whose canary is in progress rolls the canary back through the gateway's admin
  API (audited), and records the incident in MLflow and as a Prefect artifact; the same alert sent
  again (Alertmanager repeats) is recognised and changes nothing.
- the whole chain (make stress): a promoted champion starts failing (a fault in the mock
  upstream); a real Prometheus, with the SLO rules' windows shortened 20 times (1h -> 3 min,
  5m -> 15 s), fires the fast burn; a real Alertmanager sends it to the webhook and to the people's
  receiver; the event runs the runbook, which reverts to `previous`; the alert then resolves.
  Every hop is asserted and timed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.events import emit_event
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from configs.alerting import AlertingConfig, load_alerting_config
from configs.home import REPO
from configs.slo import Objectives, SloConfig
from evaluation.benchmarks.mock_upstream import Fault, serve
from evaluation.monitoring.alerting import INCIDENTS, alertmanager_config
from evaluation.monitoring.slo import write_rules
from flows.incident import incident
from serving.stack.alert_webhook import build_app
from tasks import incident_automation
from tasks.incident import INCIDENTS as INCIDENTS_EXPERIMENT
from tests.flows.conftest import latest_artifact, stored_events
from tests.flows.killing import routed, staged
from tests.flows.test_rollout import Stage, traffic
from tests.prometheus import binary, running_alertmanager, running_prometheus
from tests.releases import attestation_of
from tests.serving.conftest import MODEL

FAST = "SloErrorBudgetBurnFast"
SLO = f"{MODEL}-availability"
# The rule windows in the whole-chain test, 20 times shorter: 1h -> 3 min, 5m -> 15 s. (At 1/60
# the 5 s window holds 5 scrapes; on a loaded machine one missed scrape resolved the alert, and
# its next firing was a new alert.)
TIME_SCALE = 1 / 20
RUNNER = """
import json, sys
from flows.incident import incident
incident.serve(
    name="incident", parameters=json.loads(sys.argv[1]), print_starting_message=False, limit=1
)
"""


def backend(stage: Stage, version: str, role: str, weight: float) -> dict[str, Any]:
    digest = stage.registry.tags(MODEL, version)["digest"]
    return {
        "version": version,
        "url": stage.upstream_url,
        "served_model": f"{MODEL}-v{version}",
        "digest": digest,
        "expected_digest": digest,
        "attestation": attestation_of(stage.home, MODEL, version),
        "weight": weight,
        "role": role,
    }


def put_route(stage: Stage, *backends: dict[str, Any]) -> None:
    url = f"{stage.gateway_url}/admin/routes/{MODEL}"
    httpx.put(url, json={"backends": list(backends)}, headers=stage.admin).raise_for_status()


@contextmanager
def runbook_served(stage: Stage, log: Path) -> Iterator[None]:
    """The runbook deployment `incident/incident`, served by a runner process against the
    session's Prefect server (polling every second), its parameters pointing at this stage; and
    the incident automations applied to it."""
    from prefect.settings import PREFECT_API_URL

    parameters = {"gateway_url": stage.gateway_url, "previous_url": stage.upstream_url}
    env = {
        **os.environ,
        "SLIPWAY_HOME": str(stage.home.root),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PYTHONPATH": str(REPO),
    }
    with log.open("ab") as out:
        runner = subprocess.Popen(
            [sys.executable, "-c", RUNNER, json.dumps(parameters)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        with get_client(sync_client=True) as client:
            while True:  # the deployment as this runner registered it (an earlier test's stays)
                assert runner.poll() is None, f"the runner exited:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no deployment:\n{log.read_text()[-3000:]}"
                try:
                    found = client.read_deployment_by_name(incident_automation.RUNBOOK_DEPLOYMENT)
                    if found.parameters == parameters:
                        break
                except Exception:
                    pass
                time.sleep(0.5)
        names = incident_automation.apply(load_alerting_config().incidents.act_on)
        assert names == [f"slipway-incident-{FAST}"]
        time.sleep(2)  # the server loads new automations within a second or two
        yield
    finally:
        os.killpg(runner.pid, signal.SIGTERM)
        try:
            runner.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()


def runbook_runs(event_id: str) -> list:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(incident_automation.RUNBOOK_DEPLOYMENT)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )
    return [r for r in runs if r.parameters.get("event_id") == event_id]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, log: Path | None = None):
    """check()'s first truthy value, polled every 0.2 s."""
    deadline = time.monotonic() + timeout_s
    while True:
        if found := check():
            return found
        if time.monotonic() > deadline:
            told = log.read_text()[-4000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s\n{told}")
        time.sleep(0.2)


def finished_run(event_id: str, log: Path, timeout_s: float = 180):
    """The runbook's flow run for the event, once it has ended; it must have completed."""
    [run] = wait_for(f"a runbook run for event {event_id}", lambda: runbook_runs(event_id), 60, log)

    def ended():
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
        return state if state.is_final() else None

    state = wait_for("the runbook run to end", ended, timeout_s, log)
    assert state.is_completed(), (state, log.read_text()[-4000:])
    return run


def incident_runs(stage: Stage, key: str | None = None) -> list:
    experiment = stage.registry.client.get_experiment_by_name(INCIDENTS_EXPERIMENT)
    if experiment is None:
        return []
    where = f"tags.alert_key = '{key}'" if key else ""
    return stage.registry.client.search_runs([experiment.experiment_id], where)


def incident_md(stage: Stage, run_id: str) -> str:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="incident.md", tracking_uri=stage.registry.uri
    )
    return Path(path).read_text()


def audit(stage: Stage, since: float) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{stage.gateway_url}/admin/audit",
        params={"action": "route.", "limit": "100"},
        headers=stage.admin,
    )
    r.raise_for_status()
    return [e for e in r.json()["records"] if e["target"] == MODEL and e["time"] >= since]


def notification(fingerprint: str, starts_at: str) -> dict[str, Any]:
    """What Alertmanager POSTs for one firing fast burn on MODEL (webhook JSON, version 4)."""
    labels = {
        "alertname": FAST,
        "severity": "page",
        "slo": SLO,
        "sli": "availability",
        "model": MODEL,
    }
    return {
        "version": "4",
        "groupKey": f'{{}}/{{alertname=~"{FAST}"}}:{{alertname="{FAST}"}}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": INCIDENTS,
        "groupLabels": {"alertname": FAST},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.test:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {"summary": f"SLO {SLO}: burning", "burn_rate": "14.4"},
                "startsAt": starts_at,
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.test/graph",
                "fingerprint": fingerprint,
            }
        ],
    }


@pytest.mark.slow
def test_a_fast_burn_notification_rolls_the_canary_back_through_the_runbook(
    home, tmp_path, monkeypatch, prefect_server
):
    log = tmp_path / "runner.log"
    batch = {"name": "batchco", "tier": "batch"}
    with staged(home, tmp_path, monkeypatch, tenants=[batch]) as killable:
        stage: Stage = killable.stage
        put_route(
            stage,
            backend(stage, stage.stable, "stable", 90),
            backend(stage, stage.candidate, "canary", 10),
        )
        with runbook_served(stage, log), serve(build_app()) as webhook:
            since = time.time()
            fingerprint = secrets.token_hex(8)
            starts_at = datetime.now(UTC).isoformat()
            sent = time.monotonic()
            r = httpx.post(f"{webhook}/alerts", json=notification(fingerprint, starts_at))
            assert r.status_code == 200, r.text
            [emitted] = r.json()["emitted"]
            assert emitted["event"] == "slipway.alert.firing"
            [event] = stored_events(
                "slipway.alert.firing", where=lambda e: str(e.id) == emitted["id"]
            )
            assert event.resource["slipway.model"] == MODEL
            assert event.payload["alert"]["fingerprint"] == fingerprint
            run = finished_run(emitted["id"], log)
            took = time.monotonic() - sent
            assert run.parameters["alert"]["labels"]["alertname"] == FAST  # rendered as a dict

            # The rollback: the canary withdrawn, stable alone, the candidate tagged.
            assert routed(stage) == [(stage.stable, "stable", 100.0)]
            tags = stage.registry.tags(MODEL, stage.candidate)
            assert tags["rollout_status"] == "rolled_back"
            assert tags["rollout_reason"].startswith(f"by hand: incident: {FAST} on {SLO}")
            # ... through the admin API, which audited both moves as the admin.
            moves = audit(stage, since)
            assert [e["action"] for e in moves] == ["route.weights", "route.put"], moves
            assert {e["actor"] for e in moves} == {"admin"}, moves
            # The record: MLflow run and Prefect artifact, with timeline, evidence, outcome.
            [record] = incident_runs(stage, f"{fingerprint}@{starts_at}")
            assert record.data.tags["action"] == "rollback"
            assert record.data.tags["outcome"] == "done"
            assert record.data.tags["event_id"] == emitted["id"]
            assert record.data.tags["flow_run_id"] == str(run.id)
            told = incident_md(stage, record.info.run_id)
            for line in (
                "webhook: received from Alertmanager",
                "decided: rollback",
                f"outcome: done: withdrew canary v{stage.candidate}",
                '"action": "route.weights"',
                '"tenants_by_tier"',
            ):
                assert line in told, told
            artifact = latest_artifact(f"incident-{MODEL.lower().replace('.', '-')}")
            assert "decided: rollback" in artifact.data
            [done] = stored_events(
                "slipway.incident.done",
                where=lambda e: e.resource.id == f"slipway.alert.{fingerprint}",
            )
            assert done.payload["run_id"] == record.info.run_id

            # Alertmanager repeats a firing alert: the runbook (run here, in-process) sees it
            # handled and changes nothing.
            again = incident(event.payload["alert"], "repeat", stage.gateway_url)
            assert again == f"duplicate: {record.info.run_id}"
            assert len(incident_runs(stage, f"{fingerprint}@{starts_at}")) == 1
            assert audit(stage, since) == moves
    print(f"\nwebhook -> event -> automation -> runbook -> rollback recorded: {took:.1f} s")


class People:
    """The people's receiver: a webhook that keeps what Alertmanager sends it."""

    def __init__(self) -> None:
        self.got: list[tuple[float, dict]] = []

    def app(self) -> Starlette:
        async def receive(request: Request) -> JSONResponse:
            self.got.append((time.monotonic(), json.loads(await request.body())))
            return JSONResponse({})

        return Starlette(routes=[Route("/notify", receive, methods=["POST"])])

    def alerts(self, name: str, status: str) -> list[float]:
        return [
            at
            for at, body in self.got
            for a in body["alerts"]
            if a["labels"]["alertname"] == name and a["status"] == status
        ]


def alerting(webhook: str, people: str) -> AlertingConfig:
    """The shipped alerting config with the test's endpoints and a 1 s group wait."""
    shipped = load_alerting_config()
    return shipped.model_copy(
        update={
            "alertmanager": shipped.alertmanager.model_copy(
                update={
                    "group_wait": "1s",
                    "group_interval": "1s",
                    "incident_webhook": shipped.alertmanager.incident_webhook.model_copy(
                        update={"url": f"{webhook}/alerts"}
                    ),
                    "notify": (
                        shipped.alertmanager.notify[0].model_copy(
                            update={
                                "webhook": shipped.alertmanager.notify[0].webhook.model_copy(
                                    update={"url": f"{people}/notify"}
                                )
                            }
                        ),
                    ),
                }
            )
        }
    )


@pytest.mark.stress
def test_a_failing_promoted_champion_is_reverted_through_the_whole_chain(
    home, tmp_path, monkeypatch, prefect_server
):
    prometheus = binary("prometheus", "prometheus")
    alertmanager = binary("prometheus-alertmanager", "prometheus-alertmanager")
    log = tmp_path / "runner.log"
    slo = SloConfig(models={MODEL: Objectives(availability=0.999)})
    rules = write_rules(slo, tmp_path / "rules", time_scale=TIME_SCALE)
    hops: dict[str, float] = {}
    received = threading.Event()
    events: list[Any] = []

    def emit(**kwargs: Any) -> Any:
        event = emit_event(**kwargs)
        if kwargs["event"] == "slipway.alert.firing":
            hops.setdefault("webhook", time.monotonic())
            events.append(event)
            received.set()
        if kwargs["event"] == "slipway.alert.resolved":
            hops.setdefault("resolved at the webhook", time.monotonic())
        return event

    # No circuit opens: every request reaches the failing champion, the SLI sees each failure.
    batch = {"name": "batchco", "tier": "batch"}
    with staged(home, tmp_path, monkeypatch, breaker={"failures": 1000}, tenants=[batch]) as k:
        stage: Stage = k.stage
        good, bad = stage.stable, stage.candidate
        stage.registry.promote(MODEL, bad, reason="rollout: every step not worse")
        put_route(stage, backend(stage, bad, "stable", 100))
        people = People()
        with (
            runbook_served(stage, log),
            serve(build_app(emit=emit)) as webhook,
            serve(people.app()) as people_url,
            running_alertmanager(
                alertmanager,
                tmp_path / "am",
                alertmanager_config(alerting(webhook, people_url)),
            ) as am,
            running_prometheus(
                prometheus, tmp_path / "prom", stage.gateway_url, rules, alertmanager=am
            ) as prom,
            traffic(stage, workers=2) as statuses,
        ):
            ratio = f'slo:sli_error:ratio_rate5m{{slo="{SLO}"}}'
            wait_for("a healthy ratio recorded", lambda: prom.query(ratio, time.time()), 30)
            time.sleep(2)
            assert not prom.alerts(), prom.alerts()  # healthy: nothing fires
            since = time.time()
            start = time.monotonic()
            stage.upstream.faults[f"{MODEL}-v{bad}"] = Fault(status=500)  # the champion fails

            def firing() -> bool:
                return any(
                    a["labels"]["alertname"] == FAST and a["labels"]["slo"] == SLO
                    for a in prom.alerts()
                )

            wait_for("Prometheus firing the fast burn", firing, 60, prom.log)
            hops["prometheus"] = time.monotonic()

            def in_alertmanager() -> bool:
                found = httpx.get(f"{am}/api/v2/alerts", params={"filter": f"alertname={FAST}"})
                return any(INCIDENTS in [r["name"] for r in a["receivers"]] for a in found.json())

            wait_for("Alertmanager holding it", in_alertmanager, 30)
            hops["alertmanager"] = time.monotonic()
            assert received.wait(30), "Alertmanager never called the incident webhook"
            event = events[0]
            stored = stored_events("slipway.alert.firing", where=lambda e: e.id == event.id)
            assert stored and stored[0].resource["slipway.slo"] == SLO
            hops["prefect event"] = time.monotonic()
            [_run] = wait_for("the automation's run", lambda: runbook_runs(str(event.id)), 60, log)
            hops["automation run"] = time.monotonic()
            finished_run(str(event.id), log)
            hops["runbook done"] = time.monotonic()

            # The revert: previous is champion again and served alone.
            assert stage.registry.alias(MODEL, "champion") == good
            assert stage.registry.alias(MODEL, "previous") == bad
            assert routed(stage) == [(good, "stable", 100.0)]
            assert stage.registry.tags(MODEL, bad)["revert_status"] == "reverted"
            moves = audit(stage, since)
            assert [e["action"] for e in moves][:2] == ["route.put", "route.weights"], moves
            assert moves[-1]["action"] == "route.put" and len(moves) == 3, moves
            [record] = [r for r in incident_runs(stage) if r.data.tags["event_id"] == str(event.id)]
            acted = [r.data.tags["action"] for r in incident_runs(stage)]
            assert acted.count("revert") == 1, acted  # once, however often the alert came
            assert (record.data.tags["action"], record.data.tags["outcome"]) == ("revert", "done")
            told = incident_md(stage, record.info.run_id)
            assert f"Prometheus: {FAST} firing" in told and "decided: revert" in told, told
            assert f"outcome: done: v{good} is champion again" in told, told
            artifact = latest_artifact(f"incident-{MODEL.lower().replace('.', '-')}")
            assert "decided: revert" in artifact.data

            # The people heard of it; the burn stops once previous serves, and the alert resolves.
            assert people.alerts(FAST, "firing"), people.got
            wait_for("the alert resolved", lambda: people.alerts(FAST, "resolved"), 90)
            hops["resolved"] = time.monotonic()
            stored_events("slipway.alert.resolved", where=lambda e: "slipway.slo" in e.resource)
    failed = [s for s in statuses if s != 200]
    assert failed and statuses[-1] == 200, set(statuses)  # clients saw the burn, and its end
    last = start
    line = []
    for hop in (
        "prometheus",
        "alertmanager",
        "webhook",
        "prefect event",
        "automation run",
        "runbook done",
        "resolved",
    ):
        line.append(f"{hop} +{hops[hop] - last:.1f} s")
        last = max(last, hops[hop])
    print(f"\nfault -> {'; '.join(line)}; total {hops['resolved'] - start:.1f} s")
    print(f"firing events at the webhook: {len(events)}")
