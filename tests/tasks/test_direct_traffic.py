"""Slipway's own traffic to a served engine lands in the usage log's unbilled rows, where the
reconciliation counts it against the engine's counters."""

from __future__ import annotations

from evaluation.monitoring.reconcile import reconcile
from evaluation.quality.logprob import Call
from serving.gateway.usage import METER, UNBILLED, USAGE, default_url, read_table, write_rows
from tasks.direct_traffic import record_scoring, record_unmetered


def test_scoring_calls_and_an_unmetered_run_are_counted_against_the_engine(home):
    record_scoring(home)([Call("3", 100.0, 0.2, 40, 1, 200), Call("3", 101.0, 0.1, 0, 0, 500)])
    record_unmetered(home, "regression", "3", 110.0, 170.0)
    url = default_url(home)
    write_rows(url, [(90.0, "3", "http://e", 0, 0), (200.0, "3", "http://e", 4040, 901)], METER)

    unbilled = read_table(UNBILLED, 0, 1000)
    assert list(unbilled.source) == ["scoring", "scoring", "regression"]
    assert list(unbilled.error_kind.fillna("")) == ["", "upstream_500", ""]
    assert list(unbilled.tokens_from.fillna("")) == ["", "", "unmetered"]
    assert unbilled.latency_ms.iloc[2] == 60_000

    (check,) = reconcile(read_table(USAGE, 0, 1000), unbilled, read_table(METER, 0, 1000))
    assert check.ok and check.requests == {"scoring": 2, "regression": 1}
    # The scoring calls' own tokens are exact; the rest is the regression run's.
    assert (check.prompt.counted, check.generation.counted) == (40, 1)
    assert (check.prompt.residual, check.generation.residual) == (4000, 900)
