"""The auto-rollout automation: a newly registered model version whose evaluation passed starts the
rollout deployment for it (model, candidate=version), without anyone typing a command.

The registry emits `slipway.model.registered` for every new version (tasks/registry.py); this
Prefect automation matches the ones labelled `slipway.eval_status: passed` and runs the
`rollout/rollout` deployment with parameters templated from the event. It is off unless asked for
(`SLIPWAY_AUTO_ROLLOUT=1 make up`): a release then changes what is served with nobody watching.
Applying it is idempotent; applying it disabled deletes it, so switching the setting off works.
"""

from __future__ import annotations

from uuid import UUID

from prefect.automations import AutomationCore, EventTrigger, Posture, RunDeployment
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from tasks.registry import REGISTERED_EVENT

NAME = "slipway-auto-rollout"
ROLLOUT_DEPLOYMENT = "rollout/rollout"  # flow name / deployment name, as in prefect.yaml


def run_on_each(
    name: str,
    description: str,
    event: str,
    match: dict[str, str],
    deployment_id: UUID,
    parameters: dict[str, str],
) -> AutomationCore:
    """An automation that runs the deployment once for each `event` whose labels match, with
    `parameters` rendered by the server from the event (Jinja)."""
    return AutomationCore(
        name=name,
        description=description,
        trigger=EventTrigger(
            expect={event}, match=match, posture=Posture.Reactive, threshold=1, within=0
        ),
        actions=[
            RunDeployment(source="selected", deployment_id=deployment_id, parameters=parameters)
        ],
    )


def automation(deployment_id: UUID) -> AutomationCore:
    """Run the deployment, once per event, for each passed version registered."""
    return run_on_each(
        NAME,
        "Roll out every newly registered model version whose evaluation passed.",
        REGISTERED_EVENT,
        {"slipway.eval_status": "passed"},
        deployment_id,
        # Labels of the registered resource.
        {
            "model": "{{ event.resource['slipway.model'] }}",
            "candidate": "{{ event.resource['slipway.version'] }}",
        },
    )


def apply(enabled: bool, deployment: str = ROLLOUT_DEPLOYMENT) -> str:
    """Create or replace the automation on the current Prefect API, starting `deployment`; delete
    it when not enabled. Returns what was done, for the caller to print. Raises LookupError when
    the deployment is missing."""
    with get_client(sync_client=True) as client:
        stale = client.read_automations_by_name(NAME)
        for found in stale:
            client.delete_automation(found.id)
        if not enabled:
            return f"automation {NAME} " + ("deleted (disabled)" if stale else "off")
        try:
            target = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise LookupError(
                f"auto-rollout needs the {deployment} deployment: deploy prefect.yaml first"
            ) from None
        client.create_automation(automation(target.id))
    return f"automation {NAME} on: each passed registration runs {deployment}"
