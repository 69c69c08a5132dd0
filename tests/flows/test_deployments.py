"""The deployments of prefect.yaml and the auto-rollout automation against the session's real
Prefect server: registering a version whose evaluation passed starts a run of the rollout
deployment for it, a failed one starts nothing. What `prefect deploy` registers from prefect.yaml
(pool, schedules, pull step) is checked on the production profile (test_postgres_profile.py)."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

from configs.home import REPO, Home
from serving.stack.prefect_server import POOL
from tasks import auto_rollout
from tasks.registry import register_task

PREFECT_YAML = yaml.safe_load((REPO / "prefect.yaml").read_text())
FLOWS = ("rollout", "revert", "incident", "regression", "drift", "cost")
SCHEDULED = {"regression": "0 2 * * *", "drift": "0 * * * *", "cost": "30 0 * * *"}


def test_prefect_yaml_deploys_every_flow_from_the_checkout_on_the_process_pool():
    by_name = {d["name"]: d for d in PREFECT_YAML["deployments"]}
    flows = {name: f"flows/{name}.py:{name}" for name in (*FLOWS, "release")}
    # The release's variants run as flow runs of their own when it fans out.
    assert {n: d["entrypoint"] for n, d in by_name.items()} == flows | {
        "release-variant": "flows/release.py:release_variant"
    }
    for name, d in by_name.items():
        assert d["work_pool"]["name"] == POOL and d["description"] and "slipway" in d["tags"]
        crons = [(s["cron"], s["timezone"]) for s in d.get("schedules", [])]
        assert crons == ([(SCHEDULED[name], "UTC")] if name in SCHEDULED else []), name
    [step] = PREFECT_YAML["pull"]
    assert step == {
        "prefect.deployments.steps.set_working_directory": {"directory": "{{ $SLIPWAY_REPO }}"}
    }


@flow(name="register-for-test")
def register(root: str, name: str, variant_dir: str, digest: str, status: str) -> str:
    tags = {"eval_status": status}
    return register_task(Home(Path(root)), name, Path(variant_dir), digest, tags).version


def runs_of(deployment_id: UUID) -> list[dict[str, object]]:
    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    return [r.parameters for r in found]


@pytest.mark.slow
def test_a_passed_registration_starts_a_rollout_run_for_it_and_a_failed_one_none(
    prefect_server, home, tmp_path
):
    # A deployment standing in for rollout/rollout, with no worker: its runs stay scheduled. The
    # real one is started the same way on the production profile (test_postgres_profile.py).
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("rollout-stand-in")
        deployment_id = client.create_deployment(flow_id, "auto")
    assert "on: each passed registration runs" in auto_rollout.apply(True, "rollout-stand-in/auto")
    variant = tmp_path / "variant"
    (variant / "weights").mkdir(parents=True)
    (variant / "weights" / "model.safetensors").write_bytes(b"weights")

    def release(digest: str, status: str) -> str:
        return register(str(home.root), "auto-m", str(variant), digest, status)

    failed = release("sha256:" + "1" * 64, "failed")
    passed = release("sha256:" + "2" * 64, "passed")
    assert release("sha256:" + "2" * 64, "passed") == passed  # already registered: no new event

    # Events reach the automation in order: once the passed one has started its run, the failed
    # one, emitted first, has been judged already.
    deadline = time.monotonic() + 90
    while not (started := runs_of(deployment_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # a second run, were one wrongly started, shows up here
    assert runs_of(deployment_id) == [{"model": "auto-m", "candidate": passed}], (failed, started)

    assert auto_rollout.apply(False, "rollout-stand-in/auto").endswith("deleted (disabled)")
    with get_client(sync_client=True) as client:
        assert client.read_automations_by_name(auto_rollout.NAME) == []
