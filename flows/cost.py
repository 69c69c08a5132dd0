"""The cost flow (daily): one UTC day's cost per tenant, model and version from the usage log and
configs/pricing.yaml, with dollars per million tokens, utilisation, the saving against reference
API list prices and budget alerts for the month to date. How each figure is made:
evaluation/monitoring/cost.py.

The CSVs (the month to date per tenant/model/version/day, the day's utilisation) and a PNG chart
go to MLflow (run cost-<day>); the day's table is a Prefect table artifact (`cost-report`); each
tenant at or over its budget's alert share emits "slipway.cost.budget_alert".

The day is also reconciled: each model version's usage rows (billed and unbilled) against its
engines' own token counters as the gateway read them (evaluation/monitoring/reconcile.py), as the
`usage-reconciliation` artifact and in the MLflow run. A divergence beyond the tolerance fails the
flow with the numbers, once the report is recorded.

    slipway cost [YYYY-MM-DD]
"""

from __future__ import annotations

import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
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
from evaluation.monitoring.reconcile import COLUMNS as RECONCILED
from evaluation.monitoring.reconcile import RECORD, Reconciliation, reconcile
from serving.gateway.usage import METER, UNBILLED, USAGE, default_url, iter_usage, read_table
from tasks.registry import Registry

EVENT = "slipway.cost.budget_alert"
# Usage rows are read this far either side of the day's meter readings: a request that began before
# the first reading (or ran past the last) must be seen to be tolerated.
ROWS_MARGIN = timedelta(hours=1)


class UsageDivergence(RuntimeError):
    """The usage log and an engine's own counters disagree beyond the tolerance."""


@flow(name="cost")
def cost(
    day: date | None = None, usage_url: str | None = None, pricing_path: str = str(DEFAULT_PRICING)
) -> CostReport:
    """`day` defaults to yesterday (UTC), the last whole day."""
    pricing = load_pricing(pricing_path)
    home = Home.from_env()
    day = day or datetime.now(UTC).date() - timedelta(days=1)
    url = usage_url or default_url(home)
    costs = report_task(day, url, pricing)
    checks = reconcile_task(day, url)
    run_id, link = record_task(home, costs, pricing, checks)
    create_table_artifact(
        table(costs), key="cost-report", description=summary(costs, pricing, link)
    )
    create_table_artifact(
        [c.record() for c in checks],
        key="usage-reconciliation",
        description="\n\n".join(c.line() for c in checks) or "no meter readings this day",
    )
    for alert in costs.alerts:
        alert_task(alert, day, run_id)
    if diverged := [c.line() for c in checks if not c.ok]:
        raise UsageDivergence(
            f"the usage log of {day} disagrees with the engines' own counters:\n"
            + "\n".join(diverged)
        )
    return costs


@task(name="cost-report", cache_policy=NO_CACHE)
def report_task(day: date, url: str, pricing: Pricing) -> CostReport:
    return report(day, url, pricing, read=iter_usage)


@task(name="reconcile-usage", cache_policy=NO_CACHE)
def reconcile_task(day: date, url: str) -> list[Reconciliation]:
    start = datetime.combine(day, datetime.min.time(), UTC)
    end = start + timedelta(days=1)
    rows = (start - ROWS_MARGIN, end + ROWS_MARGIN, url)
    return reconcile(
        read_table(USAGE, *rows, columns=RECONCILED),
        read_table(UNBILLED, *rows, columns=[*RECONCILED, "source"]),
        read_table(METER, start, end, url),
    )


@task(name="record-cost", cache_policy=NO_CACHE)
def record_task(
    home: Home, costs: CostReport, pricing: Pricing, checks: list[Reconciliation]
) -> tuple[str, str]:
    """CSVs and the chart as one MLflow run; returns its id and where to find it."""
    registry = Registry(home)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        costs.month.to_csv(out / "cost.csv", index=False)
        costs.utilisation.to_csv(out / "utilisation.csv", index=False)
        reconciled = out / "reconciliation.csv"
        pd.DataFrame([c.record() for c in checks], columns=RECORD).to_csv(reconciled, index=False)
        run_id = registry.log_run(
            f"cost-{costs.day}",
            params={
                "day": costs.day,
                "compare_with": pricing.compare_with,
                "reference_as_of": pricing.reference_as_of,
            },
            metrics=metrics(costs)
            | {
                "reconciled_versions": len(checks),
                "reconciliation_divergences": sum(not c.ok for c in checks),
            },
            tags={"kind": "cost", "day": str(costs.day), "budget_alerts": str(len(costs.alerts))},
            artifacts=[
                out / "cost.csv",
                out / "utilisation.csv",
                reconciled,
                chart(costs, out / "cost.png"),
            ],
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
