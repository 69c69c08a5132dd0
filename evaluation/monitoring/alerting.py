"""Alertmanager's config file from configs/alerting.yaml: every alert goes to the people's
receivers (resolutions too), and the alerts the incident runbook acts on go to the incident
webhook as well. `alertmanager_config` returns it as a dict; `write_alertmanager_config` writes
alertmanager.yml (check it with `amtool check-config`)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from configs.alerting import AlertingConfig, Receiver, Webhook

INCIDENTS = "slipway-incidents"  # the incident webhook's receiver name


def _webhook(hook: Webhook, send_resolved: bool) -> dict:
    out: dict = {"url": hook.url, "send_resolved": send_resolved, "max_alerts": hook.max_alerts}
    if hook.token_file:
        out["http_config"] = {
            "authorization": {"type": "Bearer", "credentials_file": hook.token_file}
        }
    return out


def _receiver(receiver: Receiver) -> dict:
    if receiver.webhook is not None:
        return {"name": receiver.name, "webhook_configs": [_webhook(receiver.webhook, True)]}
    if receiver.email is not None:
        email = receiver.email
        config = {
            "to": email.to,
            "from": email.sender,
            "smarthost": email.smarthost,
            "require_tls": email.require_tls,
            "send_resolved": True,
        }
        if email.auth_username:
            config["auth_username"] = email.auth_username
        if email.auth_password_file:
            config["auth_password_file"] = email.auth_password_file
        return {"name": receiver.name, "email_configs": [config]}
    assert receiver.chat is not None
    chat = receiver.chat
    return {
        "name": receiver.name,
        "slack_configs": [
            {
                "api_url_file": chat.api_url_file,
                "channel": chat.channel,
                "send_resolved": True,
                "title": "{{ .Status | toUpper }}: {{ .CommonLabels.alertname }} "
                "{{ .CommonLabels.slo }}",
                "text": "{{ range .Alerts }}{{ .Annotations.description }}\n{{ end }}",
            }
        ],
    }


def alertmanager_config(config: AlertingConfig) -> dict:
    """The routing tree: the alerts of `incidents.act_on` to the incident webhook (continue: the
    people hear of them too), then every alert to each receiver of `notify`."""
    spec = config.alertmanager
    acting = "|".join(config.incidents.act_on)
    last = len(spec.notify) - 1
    people = [{"receiver": r.name, "continue": i < last} for i, r in enumerate(spec.notify)]
    return {
        "route": {
            "receiver": spec.notify[0].name,
            "group_by": list(spec.group_by),
            "group_wait": spec.group_wait,
            "group_interval": spec.group_interval,
            "repeat_interval": spec.repeat_interval,
            "routes": [
                {
                    "receiver": INCIDENTS,
                    "matchers": [f"alertname=~{json.dumps(acting)}"],
                    "continue": True,
                },
                *people,
            ],
        },
        "receivers": [
            {
                "name": INCIDENTS,
                # The runbook acts on a firing alert; the resolution is an event too (recorded).
                "webhook_configs": [_webhook(spec.incident_webhook, True)],
            },
            *(_receiver(r) for r in spec.notify),
        ],
    }


def write_alertmanager_config(config: AlertingConfig, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "alertmanager.yml"
    path.write_text(yaml.safe_dump(alertmanager_config(config), sort_keys=False, width=1000))
    return path
