"""The incident webhook: Alertmanager POSTs its webhook JSON (version 4) here, and every alert in
it becomes a Prefect event, `slipway.alert.firing` or `slipway.alert.resolved`, which the incident
automation (tasks/incident_automation.py) turns into a run of the runbook. `slipway incidents
webhook` serves it.

The event's resource is the alert (`slipway.alert.<fingerprint>`, labelled with its alertname,
slo, model and severity, which automations match on); its payload holds the alert as Alertmanager
sent it, plus `received_at`, and the notification's receiver, group key and Alertmanager's URL.

With a token (`--token-file`, the same file as the receiver's `token_file` in
configs/alerting.yaml) a POST without `Authorization: Bearer <token>` is refused (401). An
event that cannot be emitted (no Prefect API) is a 503, so Alertmanager retries the notification.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from prefect.events import emit_event
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger(__name__)

EVENT = "slipway.alert.{status}"
PATH = "/alerts"
Emit = Callable[..., Any]  # prefect.events.emit_event's signature; returns the Event or None


class BadNotification(ValueError):
    """Not an Alertmanager webhook notification this receiver understands."""


def resource(alert: dict[str, Any]) -> dict[str, str]:
    labels = alert.get("labels") or {}
    out = {
        "prefect.resource.id": f"slipway.alert.{alert.get('fingerprint', '')}",
        "prefect.resource.name": str(labels.get("alertname", "")),
    }
    for label in ("alertname", "slo", "model", "severity", "sli"):
        if label in labels:
            out[f"slipway.{label}"] = str(labels[label])
    return out


def events(notification: Any, received_at: str) -> list[tuple[str, dict, dict]]:
    """(event name, resource, payload) for each alert of an Alertmanager notification."""
    if not isinstance(notification, dict) or notification.get("version") != "4":
        raise BadNotification("expected Alertmanager's webhook JSON, version 4")
    alerts = notification.get("alerts")
    if not isinstance(alerts, list):
        raise BadNotification("the notification has no list of alerts")
    out = []
    for alert in alerts:
        if not isinstance(alert, dict) or alert.get("status") not in ("firing", "resolved"):
            raise BadNotification(f"an alert without a firing or resolved status: {alert!r:.200}")
        if not isinstance(alert.get("labels"), dict) or not alert.get("fingerprint"):
            raise BadNotification(f"an alert without labels or fingerprint: {alert!r:.200}")
        payload = {
            "alert": {**alert, "received_at": received_at},
            "receiver": notification.get("receiver", ""),
            "group_key": notification.get("groupKey", ""),
            "external_url": notification.get("externalURL", ""),
            "truncated_alerts": notification.get("truncatedAlerts", 0),
        }
        out.append((EVENT.format(status=alert["status"]), resource(alert), payload))
    return out


def build_app(token: str | None = None, emit: Emit = emit_event) -> Starlette:
    async def receive(request: Request) -> JSONResponse:
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"error": "missing or wrong bearer token"}, 401)
        received_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        try:
            found = events(json.loads(await request.body()), received_at)
        except (ValueError, BadNotification) as e:
            return JSONResponse({"error": str(e)}, 400)
        emitted = []
        for name, res, payload in found:
            event = emit(event=name, resource=res, payload=payload)
            if event is None:
                log.error("no Prefect API to emit %s to: set PREFECT_API_URL", name)
                return JSONResponse({"error": "events cannot be emitted (no Prefect API)"}, 503)
            emitted.append(
                {"event": name, "id": str(event.id), "alert": res["prefect.resource.id"]}
            )
            log.info("%s: %s %s", name, res.get("slipway.alertname"), res.get("slipway.slo", ""))
        return JSONResponse({"emitted": emitted})

    async def healthy(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route(PATH, receive, methods=["POST"]), Route("/-/healthy", healthy)])
