"""The cost model against hand-computed cases, on a usage log written by the gateway's writer.

Pricing: model m v1 on 2 replicas of $2/h, always on ($96 a day); m v2 on 1 replica billed only
for hours with requests; model hosted at $0.5/$1.5 per million prompt/completion tokens.
Reference API: $1/$4 per million.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import pandas as pd
import pytest

from configs.loader import ConfigError, load_yaml
from configs.pricing import Pricing
from evaluation.monitoring.cost import report
from serving.gateway.usage import iter_usage, write_rows

DAY = date(2026, 3, 10)
PRICING = Pricing.model_validate(
    {
        "hardware": {"gpu": {"hourly_usd": 2.0}},
        "deployments": [
            {"model": "m", "version": "1", "hardware": "gpu", "replicas": 2},
            {"model": "m", "version": "2", "hardware": "gpu", "always_on": False},
            {"model": "hosted", "prices": {"input_per_million": 0.5, "output_per_million": 1.5}},
        ],
        "reference_as_of": "2026-01-01",
        "reference": {
            "ref": {"input_per_million": 1.0, "output_per_million": 4.0},
            "dear": {"input_per_million": 10.0, "output_per_million": 40.0},
        },
        "compare_with": "ref",
        "budgets": {
            "a": {"monthly_usd": 200, "alert_at": 0.8},
            "b": {"monthly_usd": 100, "alert_at": 0.8},
        },
    }
)


def req(at: str, tenant, model, version, prompt, completion, latency_ms, error=None) -> tuple:
    """One usage-log row (serving.gateway.usage.COLUMNS order)."""
    when = datetime.fromisoformat(at).replace(tzinfo=UTC).timestamp()
    status = {None: 200, "rate_limit_exceeded": 429}.get(error, 500)
    return (
        when,
        f"r-{at}-{tenant}",
        tenant,
        model,
        "chat",
        version,
        "stable" if version else None,
        False,
        status,
        error,
        prompt,
        completion,
        None,
        latency_ms,
        None,
        None,
        1,
        None,
    )


ROWS = [
    *[req(f"2026-03-10T0{h}:00:00", "a", "m", "1", 100_000, 50_000, 36_000) for h in range(3)],
    req("2026-03-10T04:00:00", "b", "m", "1", 100_000, 50_000, 36_000),
    req("2026-03-10T04:30:00", "b", "m", "1", 0, 0, 900, error="upstream_error"),
    req("2026-03-10T01:10:00", "a", "m", "2", 1000, 1000, 60_000),
    req("2026-03-10T01:50:00", "a", "m", "2", 1000, 1000, 60_000),
    req("2026-03-10T05:00:00", "a", "m", "2", 1000, 1000, 60_000),
    req("2026-03-10T12:00:00", "b", "hosted", "1", 2_000_000, 1_000_000, 1000),
    # Rejected before any model (rate limit): costs nothing.
    req("2026-03-10T13:00:00", "a", "m", None, 0, 0, 1.0, error="rate_limit_exceeded"),
    req("2026-03-09T10:00:00", "a", "m", "1", 5, 5, 100),  # earlier this month: $96 to a
    req("2026-02-28T10:00:00", "b", "m", "1", 5, 5, 100),  # last month: not in the budget
]


@pytest.fixture
def costs(tmp_path):
    url = f"sqlite:///{tmp_path / 'gateway-usage.sqlite'}"
    write_rows(url, ROWS)
    return report(DAY, url, PRICING, read=iter_usage)


def row(costs, tenant, model, version):
    [found] = costs.rows[
        (costs.rows.tenant == tenant)
        & (costs.rows.model == model)
        & (costs.rows.version == version)
    ].to_dict("records")
    return found


def test_hourly_cost_is_shared_by_tokens_per_tenant_and_day(costs):
    a, b = row(costs, "a", "m", "1"), row(costs, "b", "m", "1")
    # $96 for the day; a has 450k of the 600k tokens.
    assert a["cost_usd"] == pytest.approx(72.0) and b["cost_usd"] == pytest.approx(24.0)
    assert (a["requests"], a["errors"], b["requests"], b["errors"]) == (3, 0, 2, 1)
    assert row(costs, "a", "m", "2")["cost_usd"] == pytest.approx(4.0)  # 2 hours with requests x $2
    assert row(costs, "b", "hosted", "1")["cost_usd"] == pytest.approx(2.0 * 0.5 + 1.0 * 1.5)
    assert len(costs.rows) == 4 and set(costs.rows.day) == {DAY}


def test_dollars_per_million_tokens(costs):
    assert row(costs, "a", "m", "1")["usd_per_million_tokens"] == pytest.approx(72 / 0.45)
    assert costs.cost_usd == pytest.approx(102.5) and costs.tokens == 600_000 + 6_000 + 3_000_000
    assert costs.usd_per_million_tokens == pytest.approx(102.5 / 3.606)


def test_saving_against_the_reference_list_price(costs):
    a = row(costs, "a", "m", "1")
    assert a["reference_usd"] == pytest.approx(0.3 * 1 + 0.15 * 4)
    assert a["saving_usd"] == pytest.approx(0.9 - 72)
    assert row(costs, "b", "hosted", "1")["saving_usd"] == pytest.approx(2 * 1 + 1 * 4 - 2.5)
    prompt, completion = 2_403_000, 1_203_000
    assert costs.references["dear"] == pytest.approx((prompt * 10 + completion * 40) / 1e6)


def test_utilisation_is_request_seconds_per_replica_second(costs):
    by_version = {
        u.version: u for u in costs.utilisation[costs.utilisation.model == "m"].itertuples()
    }
    assert by_version["1"].utilisation == pytest.approx((4 * 36 + 0.9) / (2 * 24 * 3600))
    assert by_version["2"].hours_billed == 2
    assert by_version["2"].utilisation == pytest.approx(180 / 7200)


def test_budget_alert_on_the_month_to_date(costs):
    # a: $96 on the 9th + $72 + $4 = $172 of $200 (86%); b: $26.50 of $100; February does not count.
    [alert] = costs.alerts
    assert (
        alert.tenant == "a"
        and alert.used_usd == pytest.approx(172.0)
        and alert.share == pytest.approx(0.86)
    )
    assert set(costs.month.day) == {date(2026, 3, 9), DAY}


def test_postgresql_usage_log_gives_the_same_report(costs, pg_url):
    write_rows(pg_url, ROWS)
    on_postgres = report(DAY, pg_url, PRICING, read=iter_usage)
    pd.testing.assert_frame_equal(on_postgres.month, costs.month)
    pd.testing.assert_frame_equal(on_postgres.utilisation, costs.utilisation)


def test_unpriced_model_is_named():
    with pytest.raises(LookupError, match="other version 7"):
        PRICING.deployment("other", "7")


def test_pricing_config_names_the_bad_field(tmp_path):
    path = tmp_path / "pricing.yaml"
    path.write_text("""\
hardware: {gpu: {hourly_usd: 2}}
deployments: [{model: m, hardware: tpu}]
reference_as_of: 2026-01-01
reference: {ref: {input_per_million: 1, output_per_million: 4}}
compare_with: ref
""")
    with pytest.raises(ConfigError, match=r"hardware 'tpu' is not one of \['gpu'\]"):
        load_yaml(path, Pricing)
    path.write_text(
        path.read_text().replace(
            "hardware: tpu", "hardware: gpu, prices: {input_per_million: 1, output_per_million: 1}"
        )
    )
    with pytest.raises(
        ConfigError, match=r"deployments\.0: Value error, deployment m@\*: give either hardware"
    ):
        load_yaml(path, Pricing)
