"""Fan-out onto the work pool: one flow run of a deployment per parameter set, all started at
once (the pool's workers take them as they poll), then waited for; their results come back
through Prefect's result storage, which the flows share (the home's, on one machine)."""

from __future__ import annotations

import time
from typing import Any

POLL_S = 2.0


class DeploymentRunFailed(RuntimeError):
    """A fanned-out flow run ended other than Completed; the message names it."""


def run_all(deployment: str, parameter_sets: list[dict[str, Any]]) -> list[Any]:
    """The result of each parameter set's flow run of `deployment`, in order; called from a flow,
    each run is its subflow in the UI."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    started = [run_deployment(deployment, parameters=p, timeout=0) for p in parameter_sets]
    results = []
    with get_client(sync_client=True) as client:
        for run in started:
            while not (state := client.read_flow_run(run.id).state) or not state.is_final():
                time.sleep(POLL_S)
            if not state.is_completed():
                raise DeploymentRunFailed(
                    f"flow run {run.name} ({run.id}) of {deployment} ended {state.name}: "
                    f"{state.message or 'no message'}"
                )
            results.append(state.result())
    return results
