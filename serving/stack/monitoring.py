"""The monitoring half of `make up`: Prometheus scraping the gateway's /metrics and evaluating the
SLO rules (configs/slo.yaml, the file `make slo-rules` writes), Alertmanager routing its alerts
(configs/alerting.yaml) to people and, for the alerts the runbook acts on, to the incident webhook
(serving/stack/alert_webhook.py), the webhook emitting to the stack's Prefect server, and the
incident automations there (tasks/incident_automation.py). serving/stack/operator.py calls it and
records what it starts; a second `up` keeps what still answers.

Prometheus and Alertmanager come from the system's packages, not from the Python environments:
where one is missing, `up` says what it does not start and how to install it, and goes on, unless
monitoring is required (stack.monitoring in configs/environments/, or SLIPWAY_MONITORING).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml
from prefect.settings import PREFECT_API_URL, temporary_settings

from configs.alerting import AlertingConfig
from configs.home import Home
from configs.slo import SloConfig
from evaluation.monitoring.alerting import write_alertmanager_config
from evaluation.monitoring.slo import RULES, write_rules
from serving.processes import HOST, Proc
from serving.stack.alert_webhook import PATH
from serving.stack.services import (
    ALERTMANAGER,
    INCIDENT_WEBHOOK,
    LEFT,
    PROMETHEUS,
    StackError,
    display,
    ensure_service,
)
from tasks import incident_automation

# Often enough that an alert's 5m window holds many samples, rarely enough to cost nothing.
INTERVAL = "10s"


@dataclass(frozen=True)
class Binary:
    """A server from a system package, by the names it goes by."""

    label: str
    names: tuple[str, ...]
    package: str
    without: str  # what the stack lacks while it is missing

    def find(self) -> str | None:
        return next((found for name in self.names if (found := shutil.which(name))), None)

    def missing(self) -> str:
        named = " or ".join(f"`{n}`" for n in self.names)
        return (
            f"{self.label} NOT started: no {named} on PATH (apt-get install {self.package}); "
            f"{self.without}"
        )


BINARIES = {
    PROMETHEUS: Binary(
        "Prometheus", ("prometheus",), "prometheus", "the SLO rules are not evaluated"
    ),
    # Debian names the binary prometheus-alertmanager; upstream's release, alertmanager.
    ALERTMANAGER: Binary(
        "Alertmanager",
        ("prometheus-alertmanager", "alertmanager"),
        "prometheus-alertmanager",
        "no alert reaches the incident webhook or the people's receivers",
    ),
}


def prometheus_config(gateway: str, rules: Path, alertmanager: str | None, interval: str) -> dict:
    """prometheus.yml: the gateway (host:port) scraped and `rules` evaluated every `interval`,
    the alerts sent to `alertmanager` (host:port) where given."""
    config: dict = {
        # A scrape may take the whole interval, no more (Prometheus' default of 10 s would be
        # refused beside a shorter interval).
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": [gateway]}]}],
    }
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return config


@dataclass(frozen=True)
class MonitoringStack:
    """What `make up` asks of monitoring: the ports, whether it is required, and the configs."""

    prometheus_port: int
    alertmanager_port: int
    webhook_port: int
    required: bool
    slo: SloConfig
    alerting: AlertingConfig
    prefect_api: str  # where the webhook emits and the automations live

    @property
    def webhook_url(self) -> str:
        return f"http://{HOST}:{self.webhook_port}{PATH}"

    def binaries(self, say: Callable[[str], None]) -> dict[str, str]:
        """The binaries found, by service; says what is missing, or raises StackError (before
        anything starts) when monitoring is required."""
        found = {what: path for what, b in BINARIES.items() if (path := b.find())}
        missing = [b.missing() for what, b in BINARIES.items() if what not in found]
        if missing and self.required:
            raise StackError(
                "monitoring is required (stack.monitoring or SLIPWAY_MONITORING), but:\n  "
                + "\n  ".join(missing)
                + "\nNothing was started."
            )
        for line in missing:
            say(f"{line}. The rest of the stack starts without it.")
        return found

    def start(
        self,
        home: Home,
        gateway_port: int,
        procs: list[Proc],
        say: Callable[[str], None],
    ) -> list[Callable[[], None]]:
        """Prometheus and Alertmanager where installed, and the incident webhook, each unless
        something answers on its port; returns the waits until they answer."""
        found = self.binaries(say)
        ensure = partial(ensure_service, home, procs=procs, say=say)
        waits = []
        if PROMETHEUS in found:
            config = self.write_prometheus_config(home.root / "prometheus", gateway_port)
            command = [
                found[PROMETHEUS],
                f"--config.file={config}",
                f"--storage.tsdb.path={config.parent / 'data'}",
                f"--web.listen-address={HOST}:{self.prometheus_port}",
            ]
            port = self.prometheus_port
            waits.append(ensure(PROMETHEUS, command, port, "/-/ready", label="Prometheus:"))
            say(
                f"Rules:    {display(config.parent / RULES)}, on the gateway's "
                f"{HOST}:{gateway_port}/metrics scraped every {INTERVAL}"
            )
        if ALERTMANAGER in found:
            config = write_alertmanager_config(self.routed(), home.root / "alertmanager")
            command = [
                found[ALERTMANAGER],
                f"--config.file={config}",
                f"--storage.path={config.parent / 'data'}",
                f"--web.listen-address={HOST}:{self.alertmanager_port}",
                "--cluster.listen-address=",  # one instance: no gossip port to collide on
            ]
            port = self.alertmanager_port
            waits.append(ensure(ALERTMANAGER, command, port, "/-/ready", label="Alertmanager:"))
            acting = ", ".join(self.alerting.incidents.act_on)
            say(f"Alerts:   {display(config)}: {acting} to the incident webhook too")
        command = [sys.executable, "-m", "flows.cli", "incidents", "webhook"]
        command += ["--host", HOST, "--port", str(self.webhook_port)]
        if token_file := self.alerting.alertmanager.incident_webhook.token_file:
            command += ["--token-file", token_file]
        env = {"PREFECT_API_URL": self.prefect_api}
        port = self.webhook_port
        waits.append(
            ensure(INCIDENT_WEBHOOK, command, port, "/-/healthy", label="Webhook:", env=env)
        )
        return waits

    def write_prometheus_config(self, folder: Path, gateway_port: int) -> Path:
        """prometheus.yml beside the SLO rule file: the gateway scraped, the rules evaluated, the
        alerts sent to the stack's Alertmanager."""
        rules = write_rules(self.slo, folder)
        gateway, alertmanager = f"{HOST}:{gateway_port}", f"{HOST}:{self.alertmanager_port}"
        config = prometheus_config(gateway, rules, alertmanager, INTERVAL)
        path = folder / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def routed(self) -> AlertingConfig:
        """The alerting config with the incident webhook this stack starts: an environment's
        stack has a webhook port of its own, whatever configs/alerting.yaml names."""
        spec = self.alerting.alertmanager
        hook = spec.incident_webhook.model_copy(update={"url": self.webhook_url})
        spec = spec.model_copy(update={"incident_webhook": hook})
        return self.alerting.model_copy(update={"alertmanager": spec})

    def apply_automations(self, say: Callable[[str], None]) -> None:
        """One automation per alert the runbook acts on; the runbook's deployment must be
        deployed (`up` has just done it)."""
        with temporary_settings({PREFECT_API_URL: self.prefect_api}):
            try:
                names = incident_automation.apply(self.alerting.incidents.act_on)
            except LookupError as e:
                raise StackError(f"{e}. {LEFT}") from None
        runbook = incident_automation.RUNBOOK_DEPLOYMENT
        say(f"Prefect:  automations {', '.join(names)} on: each firing alert runs {runbook}")
