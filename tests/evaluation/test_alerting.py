"""Alertmanager's config from configs/alerting.yaml (evaluation/monitoring/alerting.py): amtool
accepts it, with the e-mail and chat examples of the shipped file uncommented too; its routing
tree sends the alerts the runbook acts on to the incident webhook and to the people, every other
alert to the people only; a bad config is refused naming the field. And the shortened rule
windows the incident test uses (evaluation/monitoring/slo.py, `time_scale`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from configs.alerting import DEFAULT_ALERTING, AlertingConfig, load_alerting_config
from configs.loader import ConfigError
from configs.slo import load_slo_config
from evaluation.monitoring.alerting import INCIDENTS, alertmanager_config, write_alertmanager_config
from evaluation.monitoring.slo import rule_file, scaled


@pytest.fixture
def amtool() -> str:
    """amtool, or a skip; in CI (CI=true) its absence fails."""
    found = shutil.which("amtool")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(
            "amtool is missing: .ci/run installs it (apt-get install prometheus-alertmanager)"
        )
    pytest.skip("amtool is not installed (apt-get install prometheus-alertmanager)")


def examples_uncommented(text: str) -> str:
    """The shipped file with its commented examples (between the >>> and <<< markers) in."""
    out, inside = [], False
    for line in text.splitlines():
        marker = ">>> examples" in line or "<<< examples" in line
        out.append(re.sub(r"^(\s*)# ?", r"\1", line) if inside and not marker else line)
        if marker:
            inside = ">>> examples" in line
    return "\n".join(out) + "\n"


def routes_for(amtool: str, config: Path, **labels: str) -> list[str]:
    done = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={config}"]
        + [f"{k}={v}" for k, v in labels.items()],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().split(",")


def check(amtool: str, path: Path) -> None:
    done = subprocess.run(
        [amtool, "check-config", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_the_shipped_config_routes_paging_alerts_to_the_webhook_and_everything_to_people(
    amtool, tmp_path
):
    config = load_alerting_config()
    path = write_alertmanager_config(config, tmp_path)
    check(amtool, path)
    fast = {"alertname": "SloErrorBudgetBurnFast", "slo": "m-availability", "model": "m"}
    assert routes_for(amtool, path, **fast) == [INCIDENTS, "oncall-webhook"]
    for other in ("SloErrorBudgetBurnSlow", "SloErrorBudgetBurnTicket"):
        assert routes_for(amtool, path, alertname=other, slo="x") == ["oncall-webhook"]
    receivers = {r["name"]: r for r in yaml.safe_load(path.read_text())["receivers"]}
    [hook] = receivers[INCIDENTS]["webhook_configs"]
    assert hook["url"] == config.alertmanager.incident_webhook.url and hook["send_resolved"]


def test_the_email_and_chat_examples_are_valid_and_every_receiver_hears_every_alert(
    amtool, tmp_path
):
    source = tmp_path / "alerting.yaml"
    source.write_text(examples_uncommented(DEFAULT_ALERTING.read_text()))
    config = load_alerting_config(source)
    assert [r.name for r in config.alertmanager.notify] == [
        "oncall-webhook",
        "oncall-email",
        "oncall-chat",
    ]
    path = write_alertmanager_config(config, tmp_path / "out")
    check(amtool, path)
    people = ["oncall-webhook", "oncall-email", "oncall-chat"]
    assert routes_for(amtool, path, alertname="SloErrorBudgetBurnFast") == [INCIDENTS, *people]
    assert routes_for(amtool, path, alertname="SloErrorBudgetBurnSlow") == people
    receivers = {r["name"]: r for r in yaml.safe_load(path.read_text())["receivers"]}
    [email] = receivers["oncall-email"]["email_configs"]
    assert email["from"] == "alertmanager@example.com" and "auth_password" not in email
    [chat] = receivers["oncall-chat"]["slack_configs"]
    assert chat["channel"] == "#llm-oncall" and "api_url" not in chat  # the URL stays in its file


def test_a_token_file_makes_alertmanager_send_a_bearer_token(amtool, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    raw = yaml.safe_load(DEFAULT_ALERTING.read_text())
    raw["alertmanager"]["incident_webhook"]["token_file"] = str(token)
    path = write_alertmanager_config(AlertingConfig.model_validate(raw), tmp_path)
    check(amtool, path)
    [hook] = yaml.safe_load(path.read_text())["receivers"][0]["webhook_configs"]
    assert hook["http_config"] == {
        "authorization": {"type": "Bearer", "credentials_file": str(token)}
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"group_wait": "soon"}, "alertmanager.group_wait: Value error, 'soon' is not a duration"),
        (
            {"notify": [{"name": "x", "webhook": {"url": "http://a"}, "chat": None, "email": {}}]},
            "alertmanager.notify.0.email",
        ),
        ({"notify": [{"name": "x"}]}, "set exactly one of webhook, email, chat"),
        ({"notify": []}, "alertmanager.notify: Tuple should have at least 1 item"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(tmp_path, change, message):
    raw = yaml.safe_load(DEFAULT_ALERTING.read_text())
    raw["alertmanager"].update(change)
    path = tmp_path / "alerting.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_alerting_config(path)


def test_the_routing_tree_is_the_config_s():
    config = load_alerting_config()
    tree = alertmanager_config(config)["route"]
    assert tree["group_by"] == ["alertname", "slo", "model"]
    assert tree["routes"][0] == {
        "receiver": INCIDENTS,
        "matchers": ['alertname=~"SloErrorBudgetBurnFast"'],
        "continue": True,
    }


def test_shortened_windows_keep_the_rule_names_and_scale_every_range():
    assert scaled("5m", 1) == "5m" and scaled("1h", 1 / 60) == "60s"
    assert scaled("5m", 1 / 60) == "5s" and scaled("3d", 1 / 60) == "4320s"
    assert scaled("5m", 1 / 600) == "500ms"
    slo = load_slo_config()
    full, short = rule_file(slo), rule_file(slo, 1 / 60)
    for g_full, g_short in zip(full["groups"], short["groups"], strict=True):
        for r_full, r_short in zip(g_full["rules"], g_short["rules"], strict=True):
            if "alert" in r_full:
                assert r_short == r_full  # the alerts read the same recorded series
                continue
            assert r_short["record"] == r_full["record"]
            window = r_full["record"].removeprefix("slo:sli_error:ratio_rate")
            assert r_short["expr"] == r_full["expr"].replace(
                f"[{window}]", f"[{scaled(window, 1 / 60)}]"
            )
