"""The cost flow under a real Prefect server with a sqlite MLflow, on a usage log written with the
gateway's writer: CSVs and chart in MLflow, the table in Prefect, a budget alert as an event; a day
whose usage disagrees with an engine's own counters fails the flow with the numbers."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.cost import EVENT
from serving.gateway.usage import METER, write_rows
from tasks.registry import Registry
from tests.evaluation.test_cost import DAY, ROWS
from tests.flows.conftest import latest_artifact, stored_events

PRICING = """\
hardware: {gpu: {hourly_usd: 2.0}}
deployments:
  - {model: m, hardware: gpu, replicas: 2}
  - {model: hosted, prices: {input_per_million: 0.5, output_per_million: 1.5}}
reference_as_of: 2026-01-01
reference: {ref: {input_per_million: 1.0, output_per_million: 4.0}}
compare_with: ref
budgets: {a: {monthly_usd: 100, alert_at: 0.9}, b: {monthly_usd: 1000}}
"""


def test_cost_flow_logs_csv_and_chart_and_alerts_on_budget(prefect_server, home, tmp_path):
    from flows.cost import cost

    write_rows(f"sqlite:///{home.logs / 'gateway-usage.sqlite'}", ROWS)
    pricing = tmp_path / "pricing.yaml"
    pricing.write_text(PRICING)

    costs = cost(day=DAY, pricing_path=str(pricing))

    # Each version of m runs its own 2 replicas all day: $96 each; hosted is $2.50 by tokens.
    assert costs.cost_usd == pytest.approx(2 * 96 + 2.5)
    [alert] = costs.alerts  # a: $96 on the 9th, today 3/4 of v1's tokens and all of v2's
    assert alert.tenant == "a" and alert.used_usd == pytest.approx(96 + 72 + 96)
    registry = Registry(home)
    [run] = registry.client.search_runs(
        [registry.client.get_experiment_by_name("slipway-monitoring").experiment_id]
    )
    assert run.info.run_name == f"cost-{DAY}" and run.data.metrics["cost_usd"] == costs.cost_usd
    assert sorted(a.path for a in registry.client.list_artifacts(run.info.run_id)) == [
        "cost.csv",
        "cost.png",
        "reconciliation.csv",
        "utilisation.csv",
    ]
    local = registry.client.download_artifacts(run.info.run_id, "cost.csv", str(tmp_path))
    with open(local) as f:
        assert {(r["day"], r["tenant"], r["model"]) for r in csv.DictReader(f)} >= {
            ("2026-03-09", "a", "m"),
            (str(DAY), "b", "hosted"),
        }
    png = registry.client.download_artifacts(run.info.run_id, "cost.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = latest_artifact("cost-report")
    shown = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {(r["tenant"], r["model"]) for r in shown} == {("a", "m"), ("b", "m"), ("b", "hosted")}
    assert "Budget alerts" in table.description and "a: $" in table.description
    [event] = stored_events(EVENT)
    assert (
        event.resource.id == "slipway.tenant.a"
        and event.payload["mlflow_run_id"] == run.info.run_id
    )


def reading(at: str, version: str, prompt: int, generated: int) -> tuple:
    """One engine_meter row: what the gateway read from the backend's counters at `at`."""
    when = datetime.fromisoformat(f"{DAY}T{at}").replace(tzinfo=UTC).timestamp()
    return (when, version, f"http://engine-{version}", prompt, generated)


def test_a_day_whose_usage_disagrees_with_an_engine_fails_the_flow_with_the_numbers(
    prefect_server, home, tmp_path
):
    from flows.cost import UsageDivergence, cost

    url = f"sqlite:///{home.logs / 'gateway-usage.sqlite'}"
    write_rows(url, ROWS)
    # Version 1 served 01:00 and 02:00 between its readings (200k prompt, 100k generated tokens):
    # they agree. Version 2 served 01:10 and 01:50 (2,000 and 2,000), but its engine counted 500
    # more generated tokens than any row accounts for.
    meter = [
        reading("00:30:00", "1", 1_000, 2_000),
        reading("03:00:00", "1", 201_000, 102_000),
        reading("01:00:00", "2", 0, 0),
        reading("02:00:00", "2", 2_000, 2_500),
    ]
    write_rows(url, meter, METER)
    pricing = tmp_path / "pricing.yaml"
    pricing.write_text(PRICING)

    with pytest.raises(UsageDivergence) as failed:
        cost(day=DAY, pricing_path=str(pricing))

    message = str(failed.value)
    assert "version 2 DIVERGES" in message and "version 1" not in message
    assert "generated tokens engines 2500, usage 2000 (difference +500, allowed -0..+0)" in message
    # The day's cost was recorded all the same, with the reconciliation beside it.
    registry = Registry(home)
    [run] = registry.client.search_runs(
        [registry.client.get_experiment_by_name("slipway-monitoring").experiment_id]
    )
    assert run.data.metrics["reconciled_versions"] == 2
    assert run.data.metrics["reconciliation_divergences"] == 1
    shown = latest_artifact("usage-reconciliation")
    rows = json.loads(shown.data) if isinstance(shown.data, str) else shown.data
    assert {(r["version"], r["ok"]) for r in rows} == {("1", True), ("2", False)}
