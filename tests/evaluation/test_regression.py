"""The regression check on synthetic ledgers: regression, improvement, within noise, no baseline,
which way is good for each figure, and which figures are judged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from configs.evaluation import Evaluation, Gates, Regression
from evaluation.monitoring.regression import LedgerRun, compare, key_figures, label
from evaluation.quality.gates import QualityResult, TaskScore

TTFT = "speed/concurrency_4/ttft_ms_p50"
TOKS = "speed/concurrency_4/output_tokens_per_s"
ACC = "slipway_knowledge_quick/acc"
PPL = "slipway_perplexity_quick/word_perplexity"
POLICY = Regression()  # window 10, min_runs 3, k 3, floors 10% speed / 2% quality
T0 = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)


def ledger(figure: str, values: list[float], statuses: list[str] | None = None) -> list[LedgerRun]:
    """One run per value, a night apart, oldest first."""
    statuses = statuses or ["passed"] * len(values)
    return [
        LedgerRun(run_id=f"r{i}", at=T0 + timedelta(days=i), status=s, figures={figure: v})
        for i, (v, s) in enumerate(zip(values, statuses, strict=True))
    ]


def row(figure: str, measured: float, history: list[LedgerRun], policy: Regression = POLICY):
    [only] = compare({figure: measured}, history, policy).rows
    return only


def test_a_latency_rise_beyond_the_spread_is_a_regression_with_its_reason():
    history = ledger(TTFT, [410, 414, 412, 409, 415])
    verdict = compare({TTFT: 540}, history, POLICY)
    [r] = verdict.rows
    assert r.status == "regression" and verdict.regressed
    assert r.baseline == 412 and r.runs == 5
    assert r.spread == pytest.approx(1.4826 * 2)  # MAD of |-2, 2, 0, -3, 3| is 2
    assert r.band == pytest.approx(0.10 * 412)  # the floor: 3 x spread is only ~9 ms
    assert r.change_pct == pytest.approx(128 / 412 * 100)
    assert verdict.reasons == [
        "ttft_ms_p50 at concurrency 4 rose 31% (412 -> 540 ms; ledger spread 1%, band 10%, 5 runs)"
    ]


def test_a_latency_drop_beyond_the_band_is_an_improvement_not_a_failure():
    verdict = compare({TTFT: 300}, ledger(TTFT, [410, 414, 412, 409, 415]), POLICY)
    assert [r.status for r in verdict.rows] == ["improvement"]
    assert not verdict.regressed and verdict.reasons == []


def test_a_move_inside_a_noisy_ledgers_spread_is_within_noise():
    noisy = ledger(TTFT, [100, 110, 90, 105, 95])  # median 100, MAD 5: band 3 x 7.4 = 22 ms
    assert row(TTFT, 118, noisy).status == "within-noise"
    assert row(TTFT, 82, noisy).status == "within-noise"
    assert row(TTFT, 123, noisy).status == "regression"


def test_identical_runs_do_not_make_every_tiny_move_a_regression():
    same = ledger(TTFT, [100, 100, 100])  # spread 0: only the 10% floor is left
    assert row(TTFT, 109, same).status == "within-noise"
    assert row(TTFT, 111, same).status == "regression"
    acc = ledger(ACC, [0.5, 0.5, 0.5])  # quality floor 2%
    assert row(ACC, 0.495, acc).status == "within-noise"
    assert row(ACC, 0.48, acc).status == "regression"


def test_too_few_runs_or_a_new_figure_have_no_baseline_and_fail_nothing():
    two = ledger(TTFT, [100, 100])
    verdict = compare({TTFT: 500, TOKS: 1.0}, two, POLICY)
    assert {r.figure: (r.status, r.runs) for r in verdict.rows} == {
        TTFT: ("no-baseline", 2),
        TOKS: ("no-baseline", 0),
    }
    assert not verdict.regressed
    assert row(TTFT, 500, two, Regression(min_runs=2)).status == "regression"


@pytest.mark.parametrize(
    ("figure", "values", "measured", "status"),
    [
        (TOKS, [50, 50, 50], 40, "regression"),  # throughput: higher is better
        (TOKS, [50, 50, 50], 60, "improvement"),
        ("speed/synchronous/requests_per_s", [2, 2, 2], 1.5, "regression"),
        ("speed/synchronous/tpot_ms_p50", [20, 20, 20], 15, "improvement"),  # latency: lower
        ("speed/synchronous/ttft_ms_p99", [90, 90, 90], 120, "regression"),
        (ACC, [0.6, 0.6, 0.6], 0.5, "regression"),  # accuracy: higher
        ("slipway_short_answer_quick/exact_match", [0.3, 0.3, 0.3], 0.4, "improvement"),
        (PPL, [20, 20, 20], 25, "regression"),  # perplexity: lower
        (PPL, [20, 20, 20], 15, "improvement"),
    ],
)
def test_each_figure_knows_its_good_direction(figure, values, measured, status):
    assert row(figure, measured, ledger(figure, values)).status == status


def test_regressed_runs_never_become_the_baseline():
    # Two slow nights already flagged: a third is still a regression, not the new normal.
    history = ledger(TTFT, [100, 101, 99, 150, 152], ["passed"] * 3 + ["regressed"] * 2)
    r = row(TTFT, 151, history)
    assert (r.status, r.baseline, r.runs) == ("regression", 100, 3)


def test_only_the_last_window_of_runs_is_the_baseline():
    history = ledger(TTFT, [200] * 5 + [100] * 3)  # older, slower vLLM days, then faster
    r = row(TTFT, 100, history, Regression(window=3))
    assert (r.status, r.baseline, r.runs) == ("within-noise", 100, 3)
    assert row(TTFT, 100, history).baseline == 200  # window 10 still sees mostly the old runs


def test_key_figures_are_the_speed_figures_per_level_and_each_tasks_gated_metric():
    knowledge, perplexity = "slipway_knowledge_quick", "slipway_perplexity_quick"
    metrics = {
        TTFT: 400,
        TOKS: 50,
        "speed/concurrency_4/itl_ms_p90": 30,
        "speed/concurrency_4/goodput_share": 1,
        ACC: 0.5,
        f"{knowledge}/acc_norm": 0.4,
        f"{knowledge}/acc_stderr": 0.1,
        PPL: 20,
        f"{perplexity}/byte_perplexity": 2,
        f"{perplexity}/bits_per_byte": 1,
    }
    quality = QualityResult(
        model="m",
        tasks={
            "slipway_knowledge_quick": TaskScore(metrics={"acc": 0.5, "acc_norm": 0.4}, n=10),
            "slipway_perplexity_quick": TaskScore(
                metrics={"word_perplexity": 20, "byte_perplexity": 2, "bits_per_byte": 1}, n=3
            ),
        },
    )
    assert key_figures(metrics, quality, Gates()) == {TTFT: 400, TOKS: 50, ACC: 0.5, PPL: 20}
    per_task = Gates(metric_per_task={"slipway_knowledge_quick": "acc_norm"})
    assert "slipway_knowledge_quick/acc_norm" in key_figures(metrics, quality, per_task)
    assert key_figures(metrics, None, Gates()) == {TTFT: 400, TOKS: 50}


def test_the_table_has_a_row_per_figure_with_its_call():
    history = ledger(TTFT, [410, 414, 412]) + ledger(ACC, [0.5, 0.5, 0.5])
    table = compare({TTFT: 540, ACC: 0.5, TOKS: 9}, history, POLICY).markdown()
    rows = table.splitlines()
    assert (
        "| figure | better | baseline | spread | band | measured | change | runs | status |" in rows
    )
    assert (
        "| ttft_ms_p50 at concurrency 4 | lower | 412 | 2.965 | 41.2 | 540 | +31.1% | 3 | "
        "regression |"
    ) in rows
    assert (
        "| slipway_knowledge_quick acc | higher | 0.5 | 0 | 0.01 | 0.5 | +0.0% | 3 | within-noise |"
    ) in rows
    assert (
        "| output_tokens_per_s at concurrency 4 | higher |  |  |  | 9 |  | 0 | no-baseline |"
        in rows
    )
    assert label("speed/synchronous/tpot_ms_p50") == "tpot_ms_p50 (synchronous)"


def test_the_quick_cut_runs_each_suites_quick_version_and_no_hub_task():
    evaluation = Evaluation(
        suites=["slipway_knowledge", "slipway_knowledge_quick", "slipway_perplexity"],
        extra_tasks=["mmlu"],
        limit=4,
    )
    quick = evaluation.quick()
    assert quick.suites == ["slipway_knowledge_quick", "slipway_perplexity_quick"]
    assert quick.extra_tasks == [] and quick.limit == 4 and quick.loadgen == evaluation.loadgen


def test_a_policy_that_could_never_judge_is_refused_naming_both_fields():
    with pytest.raises(ValueError, match="min_runs 5 exceeds window 4: nothing would be judged"):
        Regression(window=4, min_runs=5)
