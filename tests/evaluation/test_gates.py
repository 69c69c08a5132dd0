"""Gate logic on fixed inputs, and the config schemas that feed it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from configs.evaluation import Evaluation, Gates, LoadProfile
from evaluation.loadgen.report import LevelSummary, LoadReport, Percentiles
from evaluation.quality.gates import QualityResult, TaskScore, judge


def mc(acc: float, stderr: float = 0.03, items: dict[int, float] | None = None) -> TaskScore:
    return TaskScore(
        metrics={"acc": acc, "acc_norm": acc},
        stderr={"acc": stderr, "acc_norm": stderr},
        n=200,
        items={"acc": items} if items is not None else {},
    )


def ppl(word: float) -> TaskScore:
    return TaskScore(metrics={"word_perplexity": word, "bits_per_byte": 1.0}, n=9)


def result(**tasks: TaskScore) -> QualityResult:
    return QualityResult(model="m", tasks=tasks)


def by_name(verdict, prefix: str):
    return next(g for g in verdict.gates if g.name.startswith(prefix))


def test_recovered_scores_pass():
    base = result(k=mc(0.50), p=ppl(20.0))
    verdict = judge(base, result(k=mc(0.49), p=ppl(21.0)), Gates())
    assert verdict.passed and verdict.reasons == []
    assert by_name(verdict, "k/acc").status == "pass"
    assert by_name(verdict, "k/acc").measured == pytest.approx(0.98)
    assert by_name(verdict, "p/word_perplexity").measured == pytest.approx(0.05)


def test_large_drop_fails_and_says_why():
    verdict = judge(result(k=mc(0.50, 0.01)), result(k=mc(0.30, 0.01)), Gates())
    gate = by_name(verdict, "k/acc")
    assert not verdict.passed and gate.status == "fail"
    assert gate.measured == pytest.approx(0.6) and gate.threshold == 0.95
    assert "k/acc recovery" in verdict.reasons[0]


def test_small_drop_within_unpaired_noise_passes():
    # 0.50 -> 0.46 misses 0.95 recovery, but 1.96 * hypot(0.03, 0.03) = 0.083 > 0.04.
    verdict = judge(result(k=mc(0.50)), result(k=mc(0.46)), Gates())
    gate = by_name(verdict, "k/acc")
    assert verdict.passed and gate.status == "within-noise"
    assert "unpaired" in gate.detail and "within noise" in verdict.reasons[0]


def test_paired_test_is_used_when_items_match():
    # 100 items; the candidate loses 8 that the base got right and gains none: a consistent
    # drop the paired test sees (se ~0.027), though the unpaired stderrs alone would hide it.
    base_items = {i: 1.0 if i < 50 else 0.0 for i in range(100)}
    cand_items = {i: 1.0 if i < 42 else 0.0 for i in range(100)}
    verdict = judge(
        result(k=mc(0.50, 0.05, base_items)), result(k=mc(0.42, 0.05, cand_items)), Gates()
    )
    gate = by_name(verdict, "k/acc")
    assert gate.status == "fail" and "paired, n=100" in gate.detail
    # Without per-item scores the same means fall inside the (wider) unpaired band.
    assert judge(result(k=mc(0.50, 0.05)), result(k=mc(0.42, 0.05)), Gates()).passed


def test_noise_band_can_be_switched_off():
    verdict = judge(result(k=mc(0.50)), result(k=mc(0.46)), Gates(noise_z=0))
    assert by_name(verdict, "k/acc").status == "fail"


def test_perplexity_increase_fails():
    verdict = judge(result(p=ppl(20.0)), result(p=ppl(23.0)), Gates(max_perplexity_increase=0.1))
    assert not verdict.passed
    assert by_name(verdict, "p/word_perplexity").measured == pytest.approx(0.15)


def test_per_task_recovery_and_metric_overrides():
    gates = Gates(min_recovery_per_task={"k": 0.5}, metric_per_task={"k": "acc_norm"})
    verdict = judge(result(k=mc(0.50, 0.0)), result(k=mc(0.30, 0.0)), gates)
    assert verdict.passed and by_name(verdict, "k/acc_norm").threshold == 0.5


def test_lower_is_better_metrics_are_gated_on_increase():
    gates = Gates(metric_per_task={"p": "bits_per_byte"}, max_perplexity_increase=0.05)
    verdict = judge(result(p=ppl(20.0)), result(p=ppl(20.0)), gates)
    assert by_name(verdict, "p/bits_per_byte increase").status == "pass"
    missing = judge(result(p=ppl(20.0)), result(p=ppl(20.0)), Gates(metric_per_task={"p": "acc"}))
    assert not missing.passed and "no gateable metric" in missing.reasons[0]


def test_task_missing_on_candidate_fails():
    verdict = judge(result(k=mc(0.5), p=ppl(20)), result(k=mc(0.5)), Gates())
    assert not verdict.passed and by_name(verdict, "p").detail == "not evaluated on the candidate"


def level(concurrency: int, ttft_p50: float, tokens_per_s: float) -> LevelSummary:
    pct = Percentiles(mean=ttft_p50, p50=ttft_p50, p90=ttft_p50, p99=ttft_p50)
    return LevelSummary(
        label=f"concurrency {concurrency}",
        concurrency=concurrency,
        rate=None,
        completed=10,
        failed=0,
        duration_s=1.0,
        requests_per_s=10.0,
        output_tokens_per_s=tokens_per_s,
        total_output_tokens=100,
        ttft_ms=pct,
        tpot_ms=pct,
        itl_ms=pct,
        e2e_ms=pct,
        slo_ttft_ms=1000,
        slo_tpot_ms=100,
        goodput_share=1.0,
        goodput_per_s=10.0,
        token_source="usage",
        errors=[],
    )


def test_speed_gates_read_the_configured_level():
    report = LoadReport(
        base_url="http://x",
        model="m",
        endpoint="completions",
        profile=LoadProfile(),
        levels=[level(1, 50.0, 100.0), level(4, 400.0, 300.0)],
    )
    gates = Gates(max_ttft_p50_ms=100, min_output_tokens_per_s=200, speed_concurrency=4)
    verdict = judge(result(k=mc(0.5)), result(k=mc(0.5)), gates, speed=report)
    statuses = {g.name.split(" ")[0]: g.status for g in verdict.gates}
    assert statuses == {
        "k/acc": "pass",
        "speed/ttft_p50_ms": "fail",
        "speed/output_tokens_per_s": "pass",
    }
    unmeasured = judge(result(k=mc(0.5)), result(k=mc(0.5)), gates, speed=None)
    assert not unmeasured.passed and "not measured" in unmeasured.reasons[0]


def test_verdict_round_trips_and_renders_markdown():
    verdict = judge(result(k=mc(0.50), p=ppl(20.0)), result(k=mc(0.46), p=ppl(30.0)), Gates())
    md = verdict.markdown()
    assert md.startswith("**Verdict: FAILED**")
    assert "| k/acc recovery | 0.92 | 0.95 | within-noise |" in md
    assert "| p/word_perplexity increase | 0.5 | 0.1 | fail |" in md
    assert type(verdict).model_validate_json(verdict.model_dump_json()) == verdict
    base = result(k=mc(0.5, items={0: 1.0, 3: 0.0}))
    assert QualityResult.model_validate_json(base.model_dump_json()) == base


# ---- schemas -------------------------------------------------------------------------------------


def error_locs(excinfo) -> list[str]:
    return [".".join(map(str, e["loc"])) for e in excinfo.value.errors()]


def test_defaults_are_the_three_shipped_suites():
    ev = Evaluation()
    assert ev.tasks == ["slipway_knowledge", "slipway_short_answer", "slipway_perplexity"]
    assert Evaluation(suites=["slipway_quick"], extra_tasks=["arc_easy"]).tasks == [
        "slipway_quick",
        "arc_easy",
    ]


@pytest.mark.parametrize(
    ("fields", "loc", "words"),
    [
        ({"suites": ["slipway_knowlege"]}, "suites", "unknown suite(s) 'slipway_knowlege'"),
        ({"suites": ["mmlu"]}, "suites", "go in extra_tasks"),
        ({"extra_tasks": ["slipway_knowledge"]}, "extra_tasks", "list them in suites"),
        ({"extra_tasks": ["mm lu"]}, "extra_tasks", "not an lm-eval task name"),
        ({"suites": ["slipway_knowledge"] * 2}, "suites", "listed more than once"),
        ({"limit": 0}, "limit", "greater than or equal to 1"),
        ({"num_concurent": 2}, "num_concurent", "Extra inputs"),
        ({"loadgen": {"mode": "poisson"}}, "loadgen", "needs rate"),
        ({"loadgen": {"concurrency": [0, 2]}}, "loadgen.concurrency", "must be >= 1"),
    ],
)
def test_bad_evaluation_config_names_the_field(fields, loc, words):
    with pytest.raises(ValidationError) as excinfo:
        Evaluation(**fields)
    assert loc in error_locs(excinfo)
    assert words in str(excinfo.value)


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"min_recovery": 1.5}, "min_recovery"),
        ({"min_recovery": 0}, "min_recovery"),
        ({"min_recovery_per_task": {"k": 2.0}}, "min_recovery_per_task"),
        ({"max_perplexity_increase": -0.1}, "max_perplexity_increase"),
        ({"max_ttft_p50_ms": 0}, "max_ttft_p50_ms"),
        ({"min_recovery_pct": 95}, "min_recovery_pct"),
    ],
)
def test_bad_gates_name_the_field(fields, loc):
    with pytest.raises(ValidationError) as excinfo:
        Gates(**fields)
    assert loc in error_locs(excinfo)


def test_gates_for_tasks_not_evaluated_are_reported():
    with pytest.raises(ValueError, match=r"gates.min_recovery_per_task .*slipway_knowlege"):
        Gates(min_recovery_per_task={"slipway_knowlege": 0.9}).check_tasks(Evaluation().tasks)


def test_model_config_style_loading_names_file_and_field(tmp_path):
    from configs.loader import ConfigError, load_yaml

    path = tmp_path / "evaluation.yaml"
    path.write_text("suites: [slipway_knowledge, nope]\nlimit: 10\n")
    with pytest.raises(ConfigError, match=r"(?s)evaluation.yaml is invalid.*suites: .*'nope'"):
        load_yaml(path, Evaluation)
