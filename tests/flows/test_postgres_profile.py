"""The production profile end to end: `make up` (serving.stack.operator) with Prefect and MLflow
both on PostgreSQL, set by one URL each, in fresh databases dropped afterwards. The deployments of
prefect.yaml are registered with their schedules, the worker runs a small real flow that registers
a model version over HTTP, and the rows land in PostgreSQL. Monitoring comes up with it:
Prometheus scrapes the gateway's port (a gateway the test serves there: with no champion `up`
starts none) with the SLO rules loaded and sends to the stack's Alertmanager, which routes the
runbook's alerts to the stack's incident webhook, whose events reach the stack's Prefect server,
where the incident automations run the runbook's deployment. `down` leaves no process behind."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import psycopg2
import pytest
import yaml

from configs.home import REPO, Home
from configs.slo import load_slo_config
from evaluation.benchmarks.mock_upstream import serve
from evaluation.monitoring.alerting import INCIDENTS
from evaluation.monitoring.slo import RULES, rule_file
from serving.gateway.app import build_app
from serving.processes import free_port, members, read_state
from serving.stack.prefect_server import POOL
from tasks import incident_automation
from tasks.registry import REGISTERED_EVENT, Registry
from tests.prometheus import binary
from tests.serving.conftest import Secrets

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
PG_AT = "postgres@127.0.0.1:5432"


def query(db: str, sql: str) -> list[tuple]:
    with psycopg2.connect(dbname=db, **PG) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def eventually(read: Callable[[], list], timeout_s: float = 60) -> list:
    deadline = time.monotonic() + timeout_s
    while not (rows := read()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return rows


@pytest.fixture
def databases() -> Iterator[tuple[str, str]]:
    """Two fresh databases (Prefect, MLflow), dropped even if the servers still hold them."""
    names = tuple(f"slipway_{kind}_{secrets.token_hex(4)}" for kind in ("prefect", "mlflow"))
    admin = psycopg2.connect(dbname="postgres", **PG)
    admin.autocommit = True
    for name in names:
        admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield names
    finally:
        for name in names:
            admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture
def gateway(home) -> Iterator[str]:
    """A real gateway with no routes: what `up` serves on the gateway's port once a champion is
    registered, here Prometheus' target."""
    with serve(build_app(Secrets().config([]), home)) as url:
        yield url


def stack(home: Home, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env, "SLIPWAY_HOME": str(home.root)},
        timeout=600,
        check=False,
    )


def answer(url: str, path: str) -> dict:
    """What a Prometheus or Alertmanager API answers (Prometheus': its `data`)."""
    r = httpx.get(url + path, timeout=10)
    assert r.status_code == 200, (path, r.text)
    body = r.json()
    return body.get("data", body)


def check_monitoring(
    home: Home, gateway: str, ports: dict[str, int], prefect_api: str, prefect_db: str
) -> None:
    """What `up` started for monitoring answers and is wired as README says."""
    prometheus, alertmanager, webhook = (
        f"http://127.0.0.1:{ports[what]}" for what in ("prometheus", "alertmanager", "webhook")
    )

    def targets() -> list[dict]:
        return answer(prometheus, "/api/v1/targets")["activeTargets"]

    # Prometheus scrapes the gateway (every 10 s: the first scrape may take that long) ...
    [target] = eventually(lambda: [t for t in targets() if t["health"] == "up"], timeout_s=40)
    assert (target["labels"]["job"], target["scrapeUrl"]) == ("gateway", f"{gateway}/metrics")
    assert len(targets()) == 1
    # ... evaluates every group and rule of the file `make slo-rules` writes ...
    rules = str(home.root / "prometheus" / RULES)
    loaded = [
        (g["name"], g["file"], [r["name"] for r in g["rules"]])
        for g in answer(prometheus, "/api/v1/rules")["groups"]
    ]
    assert loaded == [
        (g["name"], rules, [r.get("record") or r["alert"] for r in g["rules"]])
        for g in rule_file(load_slo_config())["groups"]
    ]
    # ... and sends its alerts to the stack's Alertmanager.
    [sent_to] = answer(prometheus, "/api/v1/alertmanagers")["activeAlertmanagers"]
    assert sent_to["url"].startswith(f"{alertmanager}/api/")
    # Alertmanager routes the runbook's alerts to the stack's webhook.
    config = yaml.safe_load(answer(alertmanager, "/api/v2/status")["config"]["original"])
    assert config["route"]["routes"][0] == {
        "receiver": INCIDENTS,
        "matchers": ['alertname=~"SloErrorBudgetBurnFast"'],
        "continue": True,
    }
    [hook] = next(r for r in config["receivers"] if r["name"] == INCIDENTS)["webhook_configs"]
    assert hook["url"] == f"{webhook}/alerts"
    # The webhook turns a notification into an event on the stack's Prefect server (a
    # resolution: no automation acts on it).
    alert = {"status": "resolved", "labels": {"alertname": "Probe"}, "fingerprint": "f00d"}
    sent = httpx.post(f"{webhook}/alerts", json={"version": "4", "alerts": [alert]}, timeout=30)
    assert sent.status_code == 200, sent.text
    stored = "SELECT resource_id FROM events WHERE event = 'slipway.alert.resolved'"
    assert eventually(lambda: query(prefect_db, stored)) == [("slipway.alert.f00d",)]
    # The automations run the runbook's deployment on that server.
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as c:
        runbook = c.read_deployment_by_name(incident_automation.RUNBOOK_DEPLOYMENT)
        name = f"{incident_automation.PREFIX}SloErrorBudgetBurnFast"
        [automation] = c.read_automations_by_name(name)
    trigger = automation.trigger
    assert trigger.expect == {"slipway.alert.firing"}
    assert trigger.match.root == {"slipway.alertname": "SloErrorBudgetBurnFast"}
    assert [a.deployment_id for a in automation.actions] == [runbook.id]


@pytest.mark.slow
def test_up_on_postgresql_deploys_runs_a_flow_and_down_leaves_nothing(
    home, databases, gateway, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    binary("prometheus", "prometheus")
    binary("prometheus-alertmanager", "prometheus-alertmanager")
    prefect_db, mlflow_db = databases
    mlflow_port, prefect_port = free_port(), free_port()
    monitoring = {"prometheus": free_port(), "alertmanager": free_port(), "webhook": free_port()}
    mlflow_url, api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    env = {
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{PG_AT}/{prefect_db}",
        "SLIPWAY_MLFLOW_BACKEND": f"postgresql://{PG_AT}/{mlflow_db}",
        "MLFLOW_TRACKING_URI": mlflow_url,  # for `up` itself, reading the champions
        "SLIPWAY_AUTO_ROLLOUT": "1",
    }
    # prefect.yaml's deployments and the probe flow beside them.
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    probe = {
        "name": "probe",
        "entrypoint": "tests/flows/profile_probe.py:probe",
        "work_pool": {"name": POOL},
    }
    prefect_file = tmp_path / "prefect.yaml"
    deployments = [*config["deployments"], probe]
    prefect_file.write_text(yaml.safe_dump({**config, "deployments": deployments}))
    variant = tmp_path / "variant"
    (variant / "weights").mkdir(parents=True)
    (variant / "weights" / "model.safetensors").write_bytes(b"weights")
    seen_file = tmp_path / "seen.json"

    procs = []
    try:
        up = stack(
            home,
            env,
            "up",
            "--mlflow-port",
            str(mlflow_port),
            "--prefect-port",
            str(prefect_port),
            "--prefect-file",
            str(prefect_file),
            "--gateway-port",
            gateway.rsplit(":", 1)[1],
            *(a for what, port in monitoring.items() for a in (f"--{what}-port", str(port))),
        )
        procs = read_state(home)
        assert up.returncode == 0, up.stdout + up.stderr
        assert [p.what for p in procs] == [
            "prometheus",
            "alertmanager",
            "incident webhook",
            "mlflow",
            "prefect server",
            "prefect worker",
        ]
        for proc in procs[:3]:
            assert f"{proc.url}  (log {proc.log})" in up.stdout
        assert "automations slipway-incident-SloErrorBudgetBurnFast on" in up.stdout
        assert f"export PREFECT_API_URL={api}" in up.stdout
        assert "deployment run 'profile-probe/probe'" in up.stdout
        assert "deployment run 'release/release'\n" in up.stdout
        assert (
            "deployment run 'rollout/rollout' -p model=<model> -p candidate=<candidate>"
            in up.stdout
        )
        assert "deployment run 'drift/drift'  # also cron 0 * * * * UTC" in up.stdout
        assert "automation slipway-auto-rollout on" in up.stdout
        assert "No registered model has a `champion` yet" in up.stdout
        assert stack(home, env, "status").stdout.count("running, answers") == 6
        check_monitoring(home, gateway, monitoring, api, prefect_db)

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            for d in config["deployments"]:
                found = client.read_deployment_by_name(f"{d['name']}/{d['name']}")
                assert found.work_pool_name == POOL and found.pull_steps == config["pull"]
                # `prefect deploy` fills in the stack's environment (`up` sets it: here the base).
                given = {
                    k: "base" if v == "{{ $SLIPWAY_ENVIRONMENT }}" else v
                    for k, v in d["parameters"].items()
                }
                assert found.parameters == given and set(found.tags) == set(d["tags"])
                crons = [(s.schedule.cron, s.schedule.timezone) for s in found.schedules]
                assert crons == [(s["cron"], s["timezone"]) for s in d.get("schedules", [])]
            parameters = {
                "out": str(seen_file),
                "variant_dir": str(variant),
                "model": "pg-model",
                "digest": "sha256:" + "3" * 64,
            }
            run = run_deployment("profile-probe/probe", parameters=parameters, timeout=300)
            assert run.state.is_completed(), run.state
            # Its registration passed, so the automation started the real rollout deployment.
            rollout = client.read_deployment_by_name("rollout/rollout")
            only_rollout = DeploymentFilter(id=DeploymentFilterId(any_=[rollout.id]))
            [started] = eventually(lambda: client.read_flow_runs(deployment_filter=only_rollout))
            expected = {**rollout.parameters, "model": "pg-model", "candidate": "1"}
            assert started.parameters == expected

        assert json.loads(seen_file.read_text()) == {
            "MLFLOW_TRACKING_URI": mlflow_url,
            "PREFECT_API_URL": api,
            "SLIPWAY_HOME": str(home.root),
            "SLIPWAY_REPO": str(REPO),
            "cwd": str(REPO),
        }
        assert Registry(home, tracking_uri=mlflow_url).alias("pg-model", "champion") == "1"
        # The rows are in PostgreSQL, not in a sqlite file beside them.
        assert query(mlflow_db, "SELECT name, version FROM model_versions") == [("pg-model", 1)]
        assert query(mlflow_db, "SELECT alias FROM registered_model_aliases") == [("champion",)]
        runs = query(prefect_db, "SELECT id::text, state_type FROM flow_run")
        assert (str(run.id), "COMPLETED") in runs
        # The server stores events in batches, a moment after they arrive.
        events = f"SELECT resource_id FROM events WHERE event = '{REGISTERED_EVENT}'"
        assert eventually(lambda: query(prefect_db, events)) == [("slipway.model.pg-model.1",)]
        assert not [*home.mlflow.glob("*.db"), *home.prefect.glob("*.db")]
    finally:
        down = stack(home, env, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert procs and all(members(p) == [] for p in procs)
