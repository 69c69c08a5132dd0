"""The reconciliation's arithmetic on hand-made usage rows and meter readings: exact for completed
requests, tokens in flight tolerated upwards for aborted ones, every source of traffic counted, runs
split at an engine restart. The real engine's side is tests/evaluation/test_usage_vllm.py."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from evaluation.monitoring.reconcile import COLUMNS, reconcile


def req(
    at: float,
    prompt: int,
    completion: int,
    *,
    version: str = "1",
    n: int = 1,
    bound: int | None = 100,
    latency_ms: float = 500.0,
    error: str | None = None,
    tokens_from: str | None = None,
    source: str | None = None,
) -> dict:
    row = dict(
        zip(
            COLUMNS,
            (at, version, n, prompt, completion, bound, latency_ms, error, tokens_from),
            strict=True,
        )
    )
    return row | ({"source": source} if source else {})


def frame(*rows: dict, unbilled: bool = False) -> pd.DataFrame:
    columns = [*COLUMNS, "source"] if unbilled else list(COLUMNS)
    return pd.DataFrame(list(rows), columns=columns)


def readings(*ticks: tuple, url: str = "http://e1", version: str = "1") -> pd.DataFrame:
    rows = [(t, version, url, p, g) for t, p, g in ticks]
    return pd.DataFrame(
        rows,
        columns=[
            "time",
            "backend_version",
            "url",
            "prompt_tokens_total",
            "generation_tokens_total",
        ],
    )


NONE = frame(unbilled=True)


def test_completed_requests_agree_exactly_and_one_token_off_diverges():
    billed = frame(req(10, 5, 7), req(20, 6, 9, n=2))  # vLLM counts n=2's prompt twice
    agree = reconcile(billed, NONE, readings((0, 100, 1000), (30, 117, 1016)))
    (check,) = agree
    assert check.ok and check.quiet and check.requests == {"billed": 2}
    assert (check.prompt.metered, check.prompt.counted) == (17, 17)
    assert (check.generation.metered, check.generation.counted) == (16, 16)

    (off,) = reconcile(billed, NONE, readings((0, 100, 1000), (30, 117, 1017)))
    assert not off.ok and off.prompt.ok
    assert "DIVERGES" in off.line() and "engines 17, usage 16 (difference +1, allowed -0..+0)" in (
        off.line()
    )


def test_a_response_cache_hit_reached_no_engine_and_is_left_out():
    # Billed the tokens of the answer it replayed (cache.billing "full"), but no engine counted it.
    billed = frame(req(10, 5, 7), req(15, 5, 7, tokens_from="cache"))
    (check,) = reconcile(billed, NONE, readings((0, 100, 1000), (30, 105, 1007)))
    assert check.ok and check.requests == {"billed": 1}
    assert (check.prompt.counted, check.generation.counted) == (5, 7)


def test_shadow_copies_and_failed_tries_are_counted_though_no_tenant_pays_them():
    billed = frame(req(10, 5, 7))
    unbilled = frame(
        req(10, 5, 7, source="shadow"),
        req(20, 0, 0, error="upstream_timeout", bound=50, source="retry"),
        unbilled=True,
    )
    meter = readings((0, 0, 0), (30, 10, 14 + 20))  # the timed-out try generated 20 tokens
    assert not reconcile(billed, NONE, meter)[0].ok  # the copy's tokens are the engine's too
    (check,) = reconcile(billed, unbilled, meter)
    assert check.ok and check.requests == {"billed": 1, "shadow": 1, "retry": 1}
    assert check.generation.residual == 20 and check.generation.over == 50


def test_an_aborted_request_may_have_generated_up_to_its_bound_and_no_more():
    hung_up = req(10, 5, 3, bound=200, error="client_disconnected")
    billed = frame(hung_up)
    assert reconcile(billed, NONE, readings((0, 0, 0), (30, 5, 9)))[0].ok
    (beyond,) = reconcile(billed, NONE, readings((0, 0, 0), (30, 5, 204)))
    assert not beyond.ok and beyond.generation.over == 197
    # Fewer than were relayed: never.
    assert not reconcile(billed, NONE, readings((0, 0, 0), (30, 5, 2)))[0].ok
    # Its prompt counted for only the choices vLLM had started: 2 of n=4, never more than 4.
    four = frame(req(10, 5, 3, n=4, bound=800, error="client_disconnected"))
    assert reconcile(four, NONE, readings((0, 0, 0), (30, 10, 9)))[0].ok
    assert not reconcile(four, NONE, readings((0, 0, 0), (30, 25, 9)))[0].ok


def test_an_engine_restart_splits_the_readings_into_runs_checked_apart():
    billed = frame(req(10, 5, 7), req(50, 4, 4))
    meter = readings((0, 100, 100), (20, 105, 107), (40, 0, 0), (60, 4, 4))
    first, second = reconcile(billed, NONE, meter)
    assert (first.start, first.end, second.start, second.end) == (0, 20, 40, 60)
    assert first.ok and second.ok and first.requests == second.requests == {"billed": 1}


def test_a_request_running_at_a_busy_reading_is_tolerated_by_its_tokens():
    # No quiet reading: the request at 29 s runs past the last reading at 30 s.
    billed = frame(req(10, 5, 7), req(29, 5, 8, latency_ms=5_000))
    meter = readings((0, 0, 0), (30, 10, 10))  # 3 of the second's 8 tokens came after 30 s
    (check,) = reconcile(billed, NONE, meter)
    assert not check.quiet and check.ok and check.generation.under == 8


def test_traffic_that_cannot_count_its_tokens_is_attributed_the_surplus():
    billed = frame(req(10, 5, 7))
    unbilled = frame(
        req(12, 0, 0, bound=None, latency_ms=5_000, tokens_from="unmetered", source="regression"),
        unbilled=True,
    )
    (check,) = reconcile(billed, unbilled, readings((0, 0, 0), (30, 900, 1200)))
    assert check.ok and check.requests == {"billed": 1, "regression": 1}
    assert math.isinf(check.prompt.over) and check.generation.residual == 1193
    # It excuses a surplus only: the engines counting less than the billed rows still diverges.
    assert not reconcile(billed, unbilled, readings((0, 0, 0), (30, 5, 6)))[0].ok


@pytest.mark.parametrize("ticks", [[(0, 0, 0)], []])
def test_a_version_with_fewer_than_two_readings_is_not_checked(ticks):
    assert reconcile(frame(req(10, 5, 7)), NONE, readings(*ticks)) == []


def test_versions_are_reconciled_each_with_its_own_rows():
    billed = frame(req(10, 5, 7), req(11, 3, 3, version="2"))
    meter = pd.concat(
        [
            readings((0, 0, 0), (30, 5, 7)),
            readings((0, 0, 0), (30, 3, 4), url="http://e2", version="2"),
        ]
    )
    one, two = reconcile(billed, NONE, meter)
    assert (one.version, one.ok, two.version, two.ok) == ("1", True, "2", False)
