"""The cost flow under a real Prefect server with a sqlite MLflow, on a usage log written with the
gateway's writer: CSVs and chart in MLflow, the table in Prefect, a budget alert as an event."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from evaluation.benchmarks.traffic import write_rows
from flows.cost import EVENT
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
