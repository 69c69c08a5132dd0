"""The incident automations: per alert kind the runbook acts on (configs/alerting.yaml
`incidents.act_on`), one Prefect automation that runs the runbook deployment (`incident/incident`,
flows/incident.py) for each `slipway.alert.firing` event of that alert, the alert as its
parameter. The incident webhook (serving/stack/alert_webhook.py) emits the events. Applying is
idempotent: every slipway-incident-* automation is replaced.
"""

from __future__ import annotations

from uuid import UUID

from prefect.automations import AutomationCore
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from tasks.auto_rollout import run_on_each

FIRING = "slipway.alert.firing"
PREFIX = "slipway-incident-"
RUNBOOK_DEPLOYMENT = "incident/incident"  # flow name / deployment name, as in prefect.yaml


def automation(alertname: str, deployment_id: UUID) -> AutomationCore:
    return run_on_each(
        f"{PREFIX}{alertname}",
        f"Run the incident runbook for each {alertname} alert that fires.",
        FIRING,
        {"slipway.alertname": alertname},
        deployment_id,
        # One expression: the server renders it as JSON, so the flow gets a dict.
        {"alert": "{{ event.payload.alert }}", "event_id": "{{ event.id | string }}"},
    )


def apply(alertnames: tuple[str, ...], deployment: str = RUNBOOK_DEPLOYMENT) -> list[str]:
    """Replace the incident automations on the current Prefect API with one per alert name.
    Returns their names. Raises LookupError when the deployment is missing."""
    with get_client(sync_client=True) as client:
        try:
            target = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise LookupError(
                f"the incident automations need the {deployment} deployment: deploy prefect.yaml "
                "first (`make up` does)"
            ) from None
        for found in client.read_automations():
            if found.name.startswith(PREFIX):
                client.delete_automation(found.id)
        for name in alertnames:
            client.create_automation(automation(name, target.id))
    return [f"{PREFIX}{name}" for name in alertnames]
