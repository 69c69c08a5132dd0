"""The rollout deployment's concurrency slot (prefect.yaml: limit 1) after its flow is SIGKILLed,
against a real Prefect server (the session's) and a real process worker, deployed from prefect.yaml.

Prefect 3.8.8 holds the slot as a lease that the flow process renews (every 225 s, for 300 s)
and releases it at any exit from Running. So:

- flow process killed, worker alive: the worker sees its child exit -9 and marks the run Crashed,
  which frees the slot at once; the next run of the deployment gets it, and its own reconcile
  settles what the killed one left;
- worker killed too: nothing marks the run, which stays Running and keeps the slot until the
  lease expires (up to 300 s later, when the server's lease reaper frees the slot but leaves the
  run Running); `slipway rollout reconcile` marks it Crashed, which frees the slot at once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from configs.home import REPO
from serving.processes import Proc, stop
from serving.stack.prefect_server import deploy, start_worker
from tasks.rollout.inflight import InFlight
from tests.flows.killing import flow_run_state, in_flight, reconcile_by_hand, routed, staged
from tests.serving.conftest import MODEL

pytestmark = pytest.mark.slow


def eventually(check: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.25)


def active_slots(deployment_id: UUID) -> int:
    with get_client(sync_client=True) as client:
        limit = client.read_deployment(deployment_id).global_concurrency_limit
    assert limit is not None and limit.limit == 1
    return limit.active_slots


def test_the_rollout_slot_is_free_again_after_its_flow_is_killed(
    home, tmp_path, monkeypatch, prefect_server
):
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")  # the worker polls every second
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [deployment] = [d for d in config["deployments"] if d["name"] == "rollout"]
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump({**config, "deployments": [deployment]}))
    policy = tmp_path / "slow.yaml"  # no traffic: step 1 waits at 20% until it is killed
    policy.write_text(yaml.safe_dump({"steps": [20, 100], "max_seconds": 600}))
    procs: list[Proc] = []
    with staged(home, tmp_path, monkeypatch) as killable:
        stage = killable.stage
        parameters = {
            "model": MODEL,
            "candidate": stage.candidate,
            "policy": str(policy),
            "gateway_url": stage.gateway_url,
            "candidate_url": stage.upstream_url,
        }

        def start_run_until_its_step() -> InFlight:
            run = run_deployment("rollout/rollout", parameters=parameters, timeout=0)

            def in_its_step() -> bool:
                claim = InFlight.read(stage.registry, MODEL)
                mine = claim is not None and claim.owner.flow_run_id == str(run.id)
                return mine and (stage.candidate, "canary", 20.0) in routed(stage)

            eventually(in_its_step, f"run {run.name}'s first step; worker log {procs[0].log}")
            assert flow_run_state(str(run.id)) == "RUNNING"
            return in_flight(stage.registry, MODEL)

        try:
            start_worker(home, api, home.tracking_uri, procs, print)
            [worker] = procs
            deploy(home, api, prefect_file)
            with get_client(sync_client=True) as client:
                deployment_id = client.read_deployment_by_name("rollout/rollout").id

            first = start_run_until_its_step()
            assert active_slots(deployment_id) == 1
            os.kill(first.owner.pid, signal.SIGKILL)  # the flow process only
            eventually(lambda: flow_run_state(str(first.owner.flow_run_id)) == "CRASHED", "Crashed")
            assert active_slots(deployment_id) == 0

            # The slot is free: the next run starts, and reconciles what the first one left.
            second = start_run_until_its_step()
            told = stage.registry.tags(MODEL, stage.candidate)
            assert told["rollout_run_id"] == second.run_id
            first_run = stage.registry.client.get_run(str(first.run_id))
            assert first_run.info.status == "KILLED", first_run.info.status
            assert first_run.data.tags["rollout_status"] == "rolled_back"

            os.killpg(worker.pgid, signal.SIGKILL)  # the worker, then its flow
            os.kill(second.owner.pid, signal.SIGKILL)
            time.sleep(5)  # nothing marks the run: it keeps its slot
            assert flow_run_state(str(second.owner.flow_run_id)) == "RUNNING"
            assert active_slots(deployment_id) == 1

            said = reconcile_by_hand(stage)
            assert "marked Prefect flow run" in said and "Crashed" in said, said
            assert flow_run_state(str(second.owner.flow_run_id)) == "CRASHED"
            assert active_slots(deployment_id) == 0
            assert routed(stage) == [(stage.stable, "stable", 100.0)]
        finally:
            stop(procs, 10)
