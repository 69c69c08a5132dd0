"""Alerting (configs/alerting.yaml): whom Alertmanager tells of the SLO alerts, and what the
incident runbook (flows/incident.py) may do on its own when a paging alert fires.

evaluation/monitoring/alerting.py renders the `alertmanager` section as Alertmanager's own config
file (`slipway incidents alertmanager-config`); tasks/incident.py decides by the `incidents`
section."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from configs.home import REPO
from configs.loader import Strict, load_yaml

DEFAULT_ALERTING = REPO / "configs" / "alerting.yaml"
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")  # Prometheus' duration syntax
_ALERT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _duration(value: str) -> str:
    if not _DURATION.match(value):
        raise ValueError(f"{value!r} is not a duration (e.g. 30s, 5m, 4h)")
    return value


class Webhook(Strict):
    """An HTTP endpoint Alertmanager POSTs its webhook JSON (version 4) to."""

    url: str = Field(pattern=r"^https?://", description="where Alertmanager POSTs")
    token_file: str | None = Field(
        None,
        description="a file holding the bearer token Alertmanager sends (the incident webhook "
        "checks it: `slipway incidents webhook --token-file`)",
    )
    max_alerts: int = Field(0, ge=0, description="alerts per POST; 0: all")


class Email(Strict):
    to: str = Field(min_length=3)
    sender: str = Field(min_length=3, description="the From: address")
    smarthost: str = Field(pattern=r"^[^:\s]+:[0-9]+$", description="host:port of the SMTP relay")
    auth_username: str | None = None
    auth_password_file: str | None = Field(None, description="never the password itself")
    require_tls: bool = True


class Chat(Strict):
    """A Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat accept its JSON)."""

    api_url_file: str = Field(description="a file holding the incoming-webhook URL (a secret)")
    channel: str = Field(min_length=1)


class Receiver(Strict):
    """One way people hear of an alert: exactly one of webhook, email, chat."""

    name: str = Field(pattern=r"^[\w.-]+$")
    webhook: Webhook | None = None
    email: Email | None = None
    chat: Chat | None = None

    @model_validator(mode="after")
    def _one(self) -> Receiver:
        given = [k for k in ("webhook", "email", "chat") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"receiver {self.name!r}: set exactly one of webhook, email, chat")
        return self


class AlertmanagerSpec(Strict):
    group_by: tuple[str, ...] = ("alertname", "slo", "model")
    group_wait: str = "30s"
    group_interval: str = "5m"
    repeat_interval: str = "4h"
    incident_webhook: Webhook = Field(
        description="the incident webhook (`slipway incidents webhook`): the alerts the runbook "
        "acts on are sent here"
    )
    notify: tuple[Receiver, ...] = Field(
        min_length=1, description="people hear of every alert, and of its resolution, here"
    )

    @field_validator("group_wait", "group_interval", "repeat_interval")
    @classmethod
    def _durations(cls, v: str) -> str:
        return _duration(v)

    @field_validator("notify")
    @classmethod
    def _unique(cls, v: tuple[Receiver, ...]) -> tuple[Receiver, ...]:
        names = [r.name for r in v]
        if len(set(names)) != len(names) or "slipway-incidents" in names:
            raise ValueError(f"receiver names must be unique and not slipway-incidents: {names}")
        return v


class IncidentPolicy(Strict):
    """What the runbook does when an alert of `act_on` fires (tasks/incident.py, `decide`)."""

    act_on: tuple[str, ...] = Field(
        ("SloErrorBudgetBurnFast",), min_length=1, description="alerts whose firing runs it"
    )
    revert_within_h: float = Field(
        72.0,
        gt=0,
        description="a champion promoted less than this long ago is reverted to `previous`; "
        "one serving longer is not suspected of the burn",
    )
    cooldown_s: float = Field(
        900.0,
        ge=0,
        description="after the runbook acted on a model, it only records further alerts on it "
        "for this long (the burn's windows take a while to recover)",
    )
    shed_s: float = Field(
        900.0,
        gt=0,
        le=86400,
        description="how long a shed tier's requests are refused (503 + Retry-After); "
        "`POST /admin/tiers/{tier}/restore` ends it sooner",
    )
    shed_tiers: tuple[str, ...] = Field(
        ("batch",), description="the tiers that may be shed, lowest first; others never are"
    )

    @field_validator("act_on")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not _ALERT.match(name):
                raise ValueError(f"{name!r} is not an alert name")
        return v


class AlertingConfig(Strict):
    alertmanager: AlertmanagerSpec
    incidents: IncidentPolicy = IncidentPolicy()


def load_alerting_config(path: str | Path = DEFAULT_ALERTING) -> AlertingConfig:
    return load_yaml(path, AlertingConfig)
