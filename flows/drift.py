"""The drift flow (hourly): the last window of traffic against a reference window, per feature.

The Evidently HTML report goes to MLflow (experiment slipway-monitoring, run
drift-<model>-<window>) and a Prefect artifact (`drift-report`) links to it with the per-feature
table. A drift share at or above the configured one emits "slipway.drift.detected". A window with
too few requests (or no usage log yet) ends the run with a message and no report. What is sampled
and what is exact: see evaluation/monitoring/drift.py; when a feature drifts, and how the false
alarms of 24 looks a day at every feature stay within a budget: evaluation/monitoring/drift_rule.py.

reference="rollout" judges MODEL's last rollout instead of the last hour: the canary version's
requests against the champion's over the rollout's span (its version tags rollout_started_at,
rollout_ended_at or now, rollout_against), so the traffic a rollout just served is judged at once.

    slipway drift [MODEL] [--since-rollout]
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from configs.drift import DEFAULT_DRIFT, DriftConfig, load_drift_config
from configs.home import Home
from evaluation.monitoring.drift import (
    DriftResult,
    NotEnoughData,
    Reference,
    Window,
    check,
    markdown,
    metrics,
    rollout_windows,
    windows,
)
from serving.gateway.usage import count_usage, default_url, iter_usage
from tasks.registry import Registry

EVENT = "slipway.drift.detected"
REPORT = "drift-report.html"


@flow(name="drift")
def drift(
    window_hours: float = 1.0,
    reference: Reference = "previous_week",
    model: str | None = None,
    end: datetime | None = None,
    usage_url: str | None = None,
    config_path: str = str(DEFAULT_DRIFT),
) -> DriftCheck:
    """`end` defaults to the start of this hour (UTC): the window is the last whole one(s).
    reference="rollout" ignores window_hours and end: the windows are the last rollout's."""
    config = load_drift_config(config_path)
    home = Home.from_env()
    if reference == "rollout":
        current, ref = last_rollout_task(home, model)
    else:
        end = end or datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        promoted = promoted_at_task(home, model) if reference == "promotion" else None
        current, ref = windows(end, window_hours, reference, promoted)
    try:
        result, html = measure_task(current, ref, usage_url or default_url(home), config, model)
    except (NotEnoughData, FileNotFoundError) as e:  # no traffic yet, or no usage log yet
        create_markdown_artifact(
            f"# Drift of {model or 'all models'}\n\nNot compared: {e}", key="drift-report"
        )
        return DriftCheck("no-data", str(e))
    run_id, link = record_task(home, result, html, run_name(model, current), config.experiment)
    create_markdown_artifact(markdown(result, link), key="drift-report")
    seen = f"{_seen(result)}; report: {link}"
    if result.detected:
        alarm_task(result, run_id)
        message = f"drifted: {', '.join(result.drifted)}; {seen}"
        return DriftCheck("drift", message, result, run_id, link)
    if result.drifted:  # below the drift share that alarms
        message = f"no drift alarm (drifted: {', '.join(result.drifted)}); {seen}"
        return DriftCheck("ok", message, result, run_id, link)
    return DriftCheck("ok", f"no drift; {seen}", result, run_id, link)


def _seen(result: DriftResult) -> str:
    cur, ref = result.current, result.reference
    return (
        f"current {cur.window.label} ({cur.rows} requests) against reference "
        f"{ref.window.label} ({ref.rows} requests)"
    )


@dataclass(frozen=True)
class DriftCheck:
    """What one run found: ok, drift, or no-data (a window too small to compare)."""

    status: Literal["ok", "drift", "no-data"]
    message: str
    result: DriftResult | None = None
    run_id: str | None = None  # the MLflow run holding the report
    link: str | None = None


def run_name(model: str | None, window: Window) -> str:
    hours = (window.end - window.start).total_seconds() / 3600
    return f"drift-{model or 'all'}-{window.start:%Y%m%dT%H%M}Z-{hours:g}h"


@task(name="promoted-at", cache_policy=NO_CACHE)
def promoted_at_task(home: Home, model: str | None) -> datetime:
    """When `model`'s champion was last promoted (its alias history in the registry)."""
    if model is None:
        raise ValueError("reference='promotion' needs model=<registered model name>")
    history = Registry(home).alias_history(model, "champion")
    if not history:
        raise ValueError(
            f"{model} has no champion promotion recorded: use reference='previous_week'"
        )
    return datetime.fromisoformat(history[-1]["at"])


@task(name="last-rollout", cache_policy=NO_CACHE)
def last_rollout_task(home: Home, model: str | None) -> tuple[Window, Window]:
    """The canary's and the champion's windows of `model`'s last rollout (the newest
    rollout_started_at among its versions' tags), up to its end or, while it runs, now."""
    if model is None:
        raise ValueError("reference='rollout' needs model=<registered model name>")
    found = [
        (datetime.fromisoformat(v.tags["rollout_started_at"]), str(v.version), v.tags)
        for v in Registry(home).client.search_model_versions(f"name='{model}'")
        if "rollout_started_at" in v.tags and "rollout_against" in v.tags
    ]
    if not found:
        raise ValueError(f"{model} has no rollout recorded: use reference='previous_week'")
    started, canary, tags = max(found, key=lambda f: f[0])
    ended = tags.get("rollout_ended_at")
    end = datetime.fromisoformat(ended) if ended else datetime.now(UTC)
    return rollout_windows(started, end, tags["rollout_against"], canary)


@task(name="measure-drift", cache_policy=NO_CACHE)
def measure_task(
    current: Window, reference: Window, url: str, config: DriftConfig, model: str | None
) -> tuple[DriftResult, str]:
    result, snapshot = check(
        current, reference, url, config, model, count=count_usage, read=iter_usage
    )
    return result, snapshot.get_html_str(as_iframe=False)


@task(name="record-drift", cache_policy=NO_CACHE)
def record_task(
    home: Home, result: DriftResult, html: str, name: str, experiment: str
) -> tuple[str, str]:
    """The report and figures as one MLflow run; returns its id and the link to the report."""
    registry = Registry(home)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / REPORT
        report.write_text(html)
        run_id = registry.log_run(
            name,
            params={
                "model": result.model or "all",
                "current": result.current.window.label,
                "reference": result.reference.window.label,
                "drift_share_alarm": result.threshold,
            },
            metrics=metrics(result),
            tags={
                "model": result.model or "all",
                "kind": "drift",
                "status": "drift" if result.detected else "ok",
            },
            artifacts=[report],
            experiment=experiment,
        )
    return run_id, registry.run_link(run_id, REPORT)


@task(name="drift-alarm", cache_policy=NO_CACHE)
def alarm_task(result: DriftResult, run_id: str) -> None:
    """The Prefect event automations and notifications react to."""
    model = result.model or "all"
    emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"slipway.model.{model}", "prefect.resource.name": model},
        payload={
            "drifted": result.drifted,
            "drift_share": result.drift_share,
            "current": result.current.window.label,
            "mlflow_run_id": run_id,
        },
    )
