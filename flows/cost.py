"""The cost flow (daily): one UTC day's cost per tenant, model and version from the usage log and
configs/pricing.yaml, with dollars per million tokens, utilisation, the saving against reference
API list prices and budget alerts for the month to date. How each figure is made:
evaluation/monitoring/cost.py.

The CSVs (the month to date per tenant/model/version/day, the day's utilisation) and a PNG chart
go to MLflow (run cost-<day>); the day's table is a Prefect table artifact (`cost-report`); each
tenant at or over its budget's alert share emits "slipway.cost.budget_alert".

    slipway cost [YYYY-MM-DD]
"""

from __future__ import annotations

import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from configs.home import Home
from configs.pricing import DEFAULT_PRICING, Pricing, load_pricing
from evaluation.monitoring.cost import (
    BudgetAlert,
    CostReport,
    chart,
    metrics,
    report,
    summary,
    table,
)
from serving.gateway.usage import default_url, iter_usage
from tasks.registry import Registry

EVENT = "slipway.cost.budget_alert"


@flow(name="cost")
def cost(
    day: date | None = None, usage_url: str | None = None, pricing_path: str = str(DEFAULT_PRICING)
) -> CostReport:
    """`day` defaults to yesterday (UTC), the last whole day."""
    pricing = load_pricing(pricing_path)
    home = Home.from_env()
    day = day or datetime.now(UTC).date() - timedelta(days=1)
    costs = report_task(day, usage_url or default_url(home), pricing)
    run_id, link = record_task(home, costs, pricing)
    create_table_artifact(
        table(costs), key="cost-report", description=summary(costs, pricing, link)
    )
    for alert in costs.alerts:
        alert_task(alert, day, run_id)
    return costs


@task(name="cost-report", cache_policy=NO_CACHE)
def report_task(day: date, url: str, pricing: Pricing) -> CostReport:
    return report(day, url, pricing, read=iter_usage)


@task(name="record-cost", cache_policy=NO_CACHE)
def record_task(home: Home, costs: CostReport, pricing: Pricing) -> tuple[str, str]:
    """CSVs and the chart as one MLflow run; returns its id and where to find it."""
    registry = Registry(home)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        costs.month.to_csv(out / "cost.csv", index=False)
        costs.utilisation.to_csv(out / "utilisation.csv", index=False)
        run_id = registry.log_run(
            f"cost-{costs.day}",
            params={
                "day": costs.day,
                "compare_with": pricing.compare_with,
                "reference_as_of": pricing.reference_as_of,
            },
            metrics=metrics(costs),
            tags={"kind": "cost", "day": str(costs.day), "budget_alerts": str(len(costs.alerts))},
            artifacts=[out / "cost.csv", out / "utilisation.csv", chart(costs, out / "cost.png")],
            experiment=pricing.experiment,
        )
    return run_id, registry.run_link(run_id)


@task(name="budget-alert", cache_policy=NO_CACHE)
def alert_task(alert: BudgetAlert, day: date, run_id: str) -> None:
    """The Prefect event automations and notifications react to."""
    emit_event(
        event=EVENT,
        resource={
            "prefect.resource.id": f"slipway.tenant.{alert.tenant}",
            "prefect.resource.name": alert.tenant,
        },
        payload={
            "used_usd": alert.used_usd,
            "budget_usd": alert.budget_usd,
            "share": alert.share,
            "alert_at": alert.alert_at,
            "day": str(day),
            "mlflow_run_id": run_id,
        },
    )
