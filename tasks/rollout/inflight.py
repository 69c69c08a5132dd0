"""What is moving a model's traffic right now: the record a rollout or a revert writes (the
registered-model tag `rollout.in_flight`) before it changes anything, and clears once it has
settled. It names the move (which version replaces which, its MLflow run) and its owner (process
and Prefect flow run), so that a reconcile tells a live flow, which it leaves alone, from a killed
one, after which it repairs, and whose Prefect flow run it marks Crashed."""

from __future__ import annotations

import os
import socket
from typing import Literal
from uuid import UUID

import httpx
import psutil
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Crashed

from configs.loader import Strict
from tasks.registry import Registry

IN_FLIGHT = "rollout.in_flight"  # registered-model tag: the move under way, while it lasts
ACTIVE = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]  # a run that holds a slot
PREFECT_ERRORS = (httpx.HTTPError, PrefectHTTPStatusError, ObjectNotFound)

Kind = Literal["rollout", "revert"]


def this_host() -> str:
    return socket.gethostname()


class Owner(Strict):
    """The process running a move, and its Prefect flow run (None outside a flow)."""

    host: str
    pid: int
    created: float  # the process's start time: with the pid, it names one process for good
    flow_run_id: str | None = None

    @classmethod
    def me(cls) -> Owner:
        created = psutil.Process().create_time()
        return cls(
            host=this_host(), pid=os.getpid(), created=created, flow_run_id=current_flow_run.id
        )

    def alive(self) -> bool:
        """Its process still runs (when it ran here) and its flow run has not ended. A flow run
        that Prefect cannot be asked about counts as alive: never repair under a live flow."""
        if self.host == this_host() and not self._process_alive():
            return False
        if self.flow_run_id is None:
            return True  # running here, or elsewhere with nothing to tell that it ended
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(self.flow_run_id)).state
        except ObjectNotFound:
            return False
        except PREFECT_ERRORS:
            return True
        return state is not None and not state.is_final()

    def _process_alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return (
                process.create_time() == self.created and process.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.NoSuchProcess:
            return False

    def __str__(self) -> str:
        run = f", Prefect flow run {self.flow_run_id}" if self.flow_run_id else ""
        return f"pid {self.pid} on {self.host}{run}"


class InFlight(Strict):
    """A move of `model`'s traffic from `source` (the champion when it began) to `target`."""

    kind: Kind
    source: str
    target: str
    run_id: str | None  # its MLflow run (experiment slipway-rollouts), once opened
    started_at: str
    owner: Owner

    def claim(self, registry: Registry, model: str) -> None:
        registry.set_model_tag(model, IN_FLIGHT, self.model_dump_json())

    @classmethod
    def read(cls, registry: Registry, model: str) -> InFlight | None:
        raw = registry.model_tag(model, IN_FLIGHT)
        return cls.model_validate_json(raw) if raw else None

    @staticmethod
    def clear(registry: Registry, model: str) -> None:
        registry.delete_model_tag(model, IN_FLIGHT)


def crash_flow_run(owner: Owner, why: str) -> str | None:
    """Mark the dead owner's flow run Crashed if Prefect still has it active, which releases its
    deployment's concurrency slot; what was done, or None when nothing was needed.

    Not when another run of its deployment is active: that one can only have started because
    Prefect already reaped the dead run's lease, and the dead run's exit from Running would then
    release the live run's slot (Prefect releases one slot at any exit from Running)."""
    if owner.flow_run_id is None:
        return None
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(owner.flow_run_id))
            if run.state is None or run.state.is_final():
                return None
            if run.deployment_id is not None:
                active = FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[run.deployment_id]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE)),
                )
                others = [
                    r for r in client.read_flow_runs(flow_run_filter=active) if r.id != run.id
                ]
                if others:
                    return (
                        f"left Prefect flow run '{run.name}' {run.state.name}: its slot was "
                        f"reaped already and run '{others[0].name}' holds it now"
                    )
            client.set_flow_run_state(run.id, Crashed(message=why), force=True)
    except PREFECT_ERRORS as e:
        return f"could not mark Prefect flow run {owner.flow_run_id} Crashed: {e}"
    return f"marked Prefect flow run '{run.name}' Crashed ({why})"
