"""The production profile end to end: `make up` (serving.stack.operator) with Prefect and MLflow
both on PostgreSQL, set by one URL each, in fresh databases dropped afterwards. The deployments of
prefect.yaml are registered with their schedules, the worker runs a small real flow that registers
a model version over HTTP, and the rows land in PostgreSQL; `down` leaves no process behind."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psycopg2
import pytest
import yaml

from configs.home import REPO, Home
from serving.processes import free_port, members, read_state
from serving.stack.prefect_server import POOL
from tasks.registry import REGISTERED_EVENT, Registry

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


@pytest.mark.slow
def test_up_on_postgresql_deploys_runs_a_flow_and_down_leaves_nothing(home, databases, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    prefect_db, mlflow_db = databases
    mlflow_port, prefect_port = free_port(), free_port()
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
        )
        procs = read_state(home)
        assert up.returncode == 0, up.stdout + up.stderr
        assert [p.what for p in procs] == ["mlflow", "prefect server", "prefect worker"]
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
        assert stack(home, env, "status").stdout.count("running, answers") == 3

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
