"""SLOs as Prometheus rules (configs/slo.py, evaluation/monitoring/slo.py): the shipped config
renders a rule file promtool accepts; promtool's own rule tests show the burn-rate alerts firing on
a burst within their window and staying quiet under budget; every series the rules read is one a
running gateway exports; and a bad config names its field."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from configs.loader import ConfigError
from configs.slo import SloConfig, load_slo_config
from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from evaluation.monitoring.slo import rule_file, write_rules
from flows.cli import cli
from serving.gateway.app import build_app
from tests.serving.conftest import MODEL, Secrets, backend, chat, post_many

FAST, SLOW, TICKET = "SloErrorBudgetBurnFast", "SloErrorBudgetBurnSlow", "SloErrorBudgetBurnTicket"
SLO = SloConfig.model_validate(
    {
        "window": "30d",
        "gateway": {"availability": 0.999},
        "models": {"m": {"availability": 0.999, "latency": {"objective": 0.99, "ttft_s": 1.0}}},
    }
)
STABLE = 'model="m",version="1",role="stable"'
REQUESTS = f"slipway_gateway_backend_requests_total{{{STABLE}}}"
ERRORS = f"slipway_gateway_backend_errors_total{{{STABLE}}}"
TTFT_UNDER_1S = f'slipway_gateway_backend_ttft_seconds_bucket{{{STABLE},le="1.0"}}'
TTFT_COUNT = f"slipway_gateway_backend_ttft_seconds_count{{{STABLE}}}"


@pytest.fixture
def promtool() -> str:
    """promtool, or a skip; in CI (CI=true) its absence fails, so the rules are never untested."""
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("promtool is missing: .ci/run installs it (apt-get install prometheus)")
    pytest.skip("promtool is not installed (apt-get install prometheus)")


def alert(config: SloConfig, name: str, slo: str) -> dict:
    """What promtool should see firing: the rule's labels and annotations, for SLO `slo`."""
    rules = [r for g in rule_file(config)["groups"] for r in g["rules"]]
    rule = next(r for r in rules if r.get("alert") == name and r["labels"]["slo"] == slo)
    return {"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}


def promtool_test(
    promtool: str, tmp_path: Path, series: dict[str, str], expected: list[dict]
) -> None:
    """Run `promtool test rules` on SLO's rules over `series` (promtool's expanding notation, one
    sample a minute), expecting exactly `expected` firing at each of their eval_time."""
    rules = write_rules(SLO, tmp_path)
    test = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": expected,
            }
        ],
    }
    path = tmp_path / "slo.test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False, width=1000))
    done = subprocess.run(
        [promtool, "test", "rules", path.name],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def silent(times: list[str], *alerts: str) -> list[dict]:
    return [{"eval_time": t, "alertname": a, "exp_alerts": []} for t in times for a in alerts]


def test_the_shipped_config_renders_rules_promtool_accepts(promtool, tmp_path):
    written = CliRunner().invoke(cli, ["slo", "rules", "--out", str(tmp_path)])
    assert written.exit_code == 0, written.output
    path = Path(written.output.strip())
    assert yaml.safe_load(path.read_text()) == rule_file(load_slo_config())
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = sum(len(g["rules"]) for g in rule_file(load_slo_config())["groups"])
    assert f"SUCCESS: {rules} rules found" in checked.stdout


def test_a_2pct_error_burst_pages_within_the_hour_and_stops_soon_after(promtool, tmp_path):
    """2% errors at a 99.9% objective burn the budget at 20x: the 1h ratio passes 14.4 x 0.1%
    after ~43 min of it. The burst runs from 60m to 150m; 10 minutes after it the 5m window has
    nothing bad left, so the page stops though the hour still holds the burst."""
    fast = alert(SLO, FAST, "m-availability")
    promtool_test(
        promtool,
        tmp_path,
        {REQUESTS: "0+100x240", ERRORS: "0x60 2+2x89 180x90"},
        [
            *silent(["59m"], FAST, SLOW, TICKET),
            *silent(["80m"], FAST),
            {"eval_time": "110m", "alertname": FAST, "exp_alerts": [fast]},
            {"eval_time": "160m", "alertname": FAST, "exp_alerts": []},
        ],
    )
    assert fast["exp_labels"] == {
        "severity": "page",
        "slo": "m-availability",
        "sli": "availability",
        "model": "m",
    }


def test_the_gateway_pages_on_5xx_but_not_on_429_or_499(promtool, tmp_path):
    """Every response counts by its code: tenants refused at their limit (429) and clients that
    left (499) fire nothing in two hours, though counted as failures they would be a third of the
    answers; 502s from 120m, 2 a minute among ~110 counted answers, page within the hour."""
    responses = 'slipway_gateway_responses_total{{tenant="alice",code="{}"}}'.format
    promtool_test(
        promtool,
        tmp_path,
        {
            responses(200): "0+100x240",
            responses(401): "0+10x240",
            responses(429): "0+50x240",
            responses(499): "0+5x240",
            responses(502): "0x120 2+2x119",
        },
        [
            *silent(["30m", "119m"], FAST, SLOW, TICKET),
            {
                "eval_time": "180m",
                "alertname": FAST,
                "exp_alerts": [alert(SLO, FAST, "gateway-availability")],
            },
        ],
    )


def test_errors_under_budget_and_failing_mirrored_copies_fire_nothing(promtool, tmp_path):
    """0.05% errors spend half the budget's rate: no alert, fast, slow or ticket, over 8 hours.
    Mirrored copies (role shadow) that all fail reach no client, so they spend none of it."""
    shadow = 'model="m",version="2",role="shadow"'
    promtool_test(
        promtool,
        tmp_path,
        {
            REQUESTS: "0+100x480",
            ERRORS: "0+0.05x480",
            f"slipway_gateway_backend_requests_total{{{shadow}}}": "0+50x480",
            f"slipway_gateway_backend_errors_total{{{shadow}}}": "0+50x480",
        },
        silent(["10m", "1h", "4h", "8h"], FAST, SLOW, TICKET),
    )


def test_slow_first_tokens_burn_the_latency_budget(promtool, tmp_path):
    """30% of first tokens over 1 s at a 99% objective: the 1h share passes 14.4 x 1% after ~29
    min of it, while 0.5% slow (half the budget) in the hour before fired nothing."""
    promtool_test(
        promtool,
        tmp_path,
        {TTFT_COUNT: "0+100x180", TTFT_UNDER_1S: "0+99.5x60 6040+70x119"},
        [
            *silent(["30m", "60m"], FAST, SLOW, TICKET),
            *silent(["75m"], FAST),
            {"eval_time": "100m", "alertname": FAST, "exp_alerts": [alert(SLO, FAST, "m-latency")]},
        ],
    )


def test_annotations_carry_the_burn_rate_and_the_budget_it_spends():
    def implied(config: SloConfig) -> dict[str, tuple[str, str]]:
        group = rule_file(config)["groups"][-1]
        return {
            r["alert"]: (r["annotations"]["burn_rate"], r["annotations"]["budget_consumed"])
            for r in group["rules"]
            if "alert" in r
        }

    assert implied(SLO) == {FAST: ("14.4", "2%"), SLOW: ("6", "5%"), TICKET: ("1", "10%")}
    # The same burn rates spend more of a shorter window's budget.
    four_weeks = SLO.model_copy(update={"window": "28d"})
    assert implied(four_weeks) == {
        FAST: ("14.4", "2.14%"),
        SLOW: ("6", "5.36%"),
        TICKET: ("1", "10.7%"),
    }


@pytest.mark.parametrize(
    ("text", "field", "why"),
    [
        ("models: {m: {latency: {objective: 0.99, ttft_s: 0.8}}}", "models.m.latency.ttft_s",
         "0.8 s is not a bound of the gateway's TTFT histogram"),
        ("models: {m: {availability: 99.9}}", "models.m.availability", "less than 1"),
        ("models: {m: {}}", "models.m", "set availability, latency or both"),
        ("gateway: {availabilty: 0.999}", "gateway.availabilty", "Extra inputs"),
        ("window: 30", "window", "string"),
        ("window: 30 days", "window", "must be a whole number of days"),
        ("window: 3d", "window", "shorter than 7d"),
    ],
)  # fmt: skip
def test_a_bad_config_names_its_field(tmp_path, text, field, why):
    path = tmp_path / "slo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_slo_config(path)
    assert re.search(rf"^  {re.escape(field)}: .*{re.escape(why)}", str(raised.value), re.M), str(
        raised.value
    )


_SELECTOR = re.compile(r"(slipway_gateway_\w+)\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)(=~|!~|!=|=)"([^"]*)"')


def matches(labels: dict[str, str], matchers: str) -> bool:
    for name, op, value in _MATCHER.findall(matchers):
        got = labels.get(name, "")
        ok = {
            "=": got == value,
            "!=": got != value,
            "=~": re.fullmatch(value, got) is not None,
            "!~": re.fullmatch(value, got) is None,
        }[op]
        if not ok:
            return False
    return True


def test_every_series_the_rules_read_is_one_the_gateway_exports(home):
    """Scrape a gateway that answered streams, a backend's 500 and a 401, and find a sample for
    every selector of every rule (names, labels and the `le` bound as the gateway writes it)."""
    keys = Secrets()
    upstream = MockUpstream()
    upstream.faults["served-1"] = Fault(status=500, times=1)
    with serve(upstream) as url:
        config = keys.config([backend(url, "1")])
        with serve(build_app(config, home)) as base:
            asyncio.run(post_many(base, keys.key("alice"), [chat(stream=True)] * 4))
            httpx.post(f"{base}/v1/chat/completions", json=chat())  # no key: a 401
            scraped = httpx.get(f"{base}/metrics").text
    samples = [
        (s.name, s.labels)
        for f in text_string_to_metric_families(scraped)
        for s in f.samples
        if s.value > 0
    ]
    slo = SloConfig.model_validate(
        {
            "gateway": {"availability": 0.999, "latency": {"objective": 0.99, "ttft_s": 1.0}},
            "models": {
                MODEL: {"availability": 0.999, "latency": {"objective": 0.9, "ttft_s": 5.0}}
            },
        }
    )
    selectors = {
        found
        for group in rule_file(slo)["groups"]
        for rule in group["rules"]
        if "record" in rule
        for found in _SELECTOR.findall(rule["expr"])
    }
    assert len(selectors) == 8  # responses failed and asked; backend errors; requests; ttft x 2
    missing = [
        f"{name}{{{matchers}}}"
        for name, matchers in selectors
        if not any(n == name and matches(labels, matchers) for n, labels in samples)
    ]
    assert not missing, missing
