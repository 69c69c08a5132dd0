"""What `make demo` ends with, on a usage log of today's traffic (written with the gateway's own
writer): `slipway drift MODEL --since-rollout` judges the rollout just served, the canary's
requests against the champion's, and `slipway cost --today` prices today, not yesterday's $0."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from click.testing import CliRunner

from evaluation.benchmarks.traffic import Traffic, synthetic_rows
from flows.cli import cli
from serving.gateway.usage import write_rows
from tasks.registry import Registry
from tests.flows.conftest import latest_artifact


def test_the_demos_own_traffic_is_judged_and_priced_today(prefect_server, home):
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    today = (now - midnight).total_seconds()
    # The rollout ran within today, whatever the hour the test runs at.
    started, span = midnight + timedelta(seconds=0.1 * today), 0.8 * today
    ended = started + timedelta(seconds=span)
    registry = Registry(home)
    registry.client.create_registered_model("tiny")
    for _ in range(2):
        registry.client.create_model_version("tiny", source="file:///nowhere")
    registry.tag(
        "tiny",
        "2",
        {
            "rollout_started_at": started.isoformat(timespec="seconds"),
            # Tags keep whole seconds: the end rounded up, so the last rows are inside.
            "rollout_ended_at": (ended + timedelta(seconds=1)).isoformat(timespec="seconds"),
            "rollout_against": "1",
            "rollout_status": "promoted",
        },
    )
    stable = synthetic_rows(1500, started, span, Traffic(), seed=1, model="tiny")
    slower = Traffic(latency_median_ms=1600, ttft_median_ms=300)
    canary = [
        (*r[:5], "2", "canary", *r[7:])
        for r in synthetic_rows(600, started, span, slower, seed=2, model="tiny")
    ]
    write_rows(f"sqlite:///{home.logs / 'gateway-usage.sqlite'}", stable + canary)
    runner = CliRunner()

    # The scheduled look (the last whole hour against a week earlier) has nothing to judge...
    hourly = runner.invoke(cli, ["drift", "tiny"])
    assert hourly.exit_code == 0 and "fewer than min_rows=100" in hourly.output
    # ... the rollout's windows have: the canary was slower than the champion it ran beside (2
    # of 9 features: flagged, below the 30% drift share that emits the alarm event).
    judged = runner.invoke(cli, ["drift", "tiny", "--since-rollout"], catch_exceptions=False)
    assert judged.exit_code == 0, judged.output
    assert judged.output.startswith("no drift alarm (drifted: latency_ms, ttft_ms); current ")
    assert ", version 2 (600 requests) against reference " in judged.output
    assert ", version 1 (1500 requests); report: " in judged.output
    report = latest_artifact("drift-report")
    assert "no drift alarm (drifted: latency_ms, ttft_ms)" in report.data
    assert "| ks |" in report.data and "| chisquare |" in report.data
    refused = runner.invoke(cli, ["drift", "--since-rollout"])
    assert refused.exit_code == 2 and "--since-rollout needs MODEL" in refused.output

    # Today's cost: configs/pricing.yaml bills every version a 2-core VM at $0.10 an hour, all
    # day; the tokens are every row's (all reached a version).
    priced = runner.invoke(cli, ["cost", "--today"], catch_exceptions=False)
    assert priced.exit_code == 0, priced.output
    tokens = sum(r[10] + r[11] for r in stable + canary)
    assert f"{now:%Y-%m-%d}: $4.80 for {tokens} tokens" in priced.output
    both = runner.invoke(cli, ["cost", "2026-01-01", "--today"])
    assert both.exit_code == 2 and "not both" in both.output
