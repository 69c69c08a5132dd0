"""The drift flow under a real Prefect server with a sqlite MLflow: traffic after the champion's
promotion against the hour that followed it, written with the gateway's usage-log writer."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from evaluation.benchmarks.traffic import Traffic, synthetic_rows
from flows.drift import EVENT, REPORT
from serving.gateway.usage import write_rows
from tasks.registry import Registry
from tests.flows.conftest import latest_artifact, stored_events


def promoted_model(registry: Registry, name: str) -> datetime:
    registry.client.create_registered_model(name)
    registry.client.create_model_version(name, source="file:///nowhere")
    registry.promote(name, "1", reason="test")
    return datetime.fromisoformat(registry.alias_history(name, "champion")[-1]["at"])


def test_drift_flow_reports_to_mlflow_and_prefect_and_alarms(prefect_server, home):
    from flows.drift import drift

    registry = Registry(home)
    promoted = promoted_model(registry, "tiny")
    log = f"sqlite:///{home.logs / 'gateway-usage.sqlite'}"  # where the gateway writes it
    write_rows(log, synthetic_rows(1500, promoted, 3600, Traffic(), seed=1, model="tiny"))
    shifted = Traffic(mix=(0.2, 0.3, 0.5), latency_median_ms=1600, ttft_median_ms=300)
    write_rows(
        log,
        synthetic_rows(1500, promoted + timedelta(hours=2), 3600, shifted, seed=2, model="tiny"),
    )

    found = drift(reference="promotion", model="tiny", end=promoted + timedelta(hours=3))

    assert found.status == "drift" and sorted(found.result.drifted) == [
        "latency_ms",
        "tenant",
        "ttft_ms",
    ]
    run = registry.client.get_run(found.run_id)
    assert run.info.run_name.startswith("drift-tiny-") and run.info.run_name.endswith("-1h")
    assert run.data.metrics["drift_share"] == found.result.drift_share
    assert run.data.metrics["current/rows"] == 1500
    assert [a.path for a in registry.client.list_artifacts(found.run_id)] == [REPORT]
    assert found.link.endswith(REPORT) and "<html" in Path(found.link).read_text()[:2000].lower()
    report = latest_artifact("drift-report")
    assert (
        "**DRIFT**" in report.data and found.link in report.data and "| latency_ms |" in report.data
    )
    [event] = stored_events(EVENT)
    assert (
        event.resource.id == "slipway.model.tiny" and event.payload["mlflow_run_id"] == found.run_id
    )

    # A week later nothing was served: a message, not a crash.
    empty = drift(model="tiny", end=promoted + timedelta(days=8))
    assert empty.status == "no-data" and "0 requests" in empty.message and empty.run_id is None
