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


def items(n: int, base_right: int, harmful: int, beneficial: int) -> tuple[dict, dict]:
    """Per-item 0/1 scores of a base and a variant on n items."""
    base = {i: 1.0 if i < base_right else 0.0 for i in range(n)}
    variant = dict(base)
    for i in range(harmful):
        variant[i] = 0.0
    for i in range(base_right, base_right + beneficial):
        variant[i] = 1.0
    return base, variant


def paired(n: int, base_right: int, harmful: int, beneficial: int) -> tuple[TaskScore, TaskScore]:
    base, variant = items(n, base_right, harmful, beneficial)
    return (
        mc(sum(base.values()) / n, 0.03, base),
        mc(sum(variant.values()) / n, 0.03, variant),
    )


def test_a_variant_shown_within_the_margin_passes():
    # 400 items, the base right on 280; the variant flips 6 each way: no loss, and a suite big
    # enough to show it is less than 10%.
    base, variant = paired(400, 280, 6, 6)
    verdict = judge(result(k=base, p=ppl(20.0)), result(k=variant, p=ppl(21.0)), GATES)
    gate = by_name(verdict, "k/acc")
    assert verdict.status == "passed" and verdict.passed and verdict.reasons == []
    assert gate.status == "pass" and gate.measured == pytest.approx(1.0)
    assert gate.loss.upper < 0.10 and (gate.loss.harmful, gate.loss.beneficial) == (6, 6)
    assert "6 harmful and 6 beneficial flips in 400 items" in gate.detail
    assert by_name(verdict, "p/word_perplexity").measured == pytest.approx(0.05)


def test_a_loss_shown_beyond_the_margin_fails_and_says_why():
    base, variant = paired(400, 280, 70, 4)  # loses 66 of 280: 24%
    verdict = judge(result(k=base), result(k=variant), GATES)
    gate = by_name(verdict, "k/acc")
    assert verdict.status == "failed" and gate.status == "fail"
    assert gate.loss.lower > 0.10 and gate.threshold == 0.90
    assert "k/acc recovery" in verdict.reasons[0] and "loss +23.6%" in verdict.reasons[0]


def test_a_drop_inside_a_small_suites_noise_is_inconclusive_not_passed():
    # The case: 27 paired items, the base right on 19, the variant loses 3 of them
    # (recovery 0.84). "Within noise" once passed it; it is not evidence of no loss.
    base, variant = paired(27, 19, 3, 0)
    verdict = judge(result(k=base), result(k=variant), GATES)
    gate = by_name(verdict, "k/acc")
    assert gate.measured == pytest.approx(16 / 19)
    assert verdict.status == "inconclusive" and not verdict.passed
    assert gate.status == "inconclusive" and gate.loss.upper > 0.10 > gate.loss.lower
    assert "suite too small for its margin" in gate.detail
    assert verdict.tags()["eval_status"] == "inconclusive"
    assert verdict.reasons[0].startswith("k/acc recovery: inconclusive")


def test_a_failure_outweighs_an_inconclusive_task():
    small_base, small_variant = paired(27, 19, 3, 0)
    base, variant = paired(400, 280, 70, 4)
    verdict = judge(result(a=small_base, b=base), result(a=small_variant, b=variant), GATES)
    assert verdict.status == "failed"


def test_without_items_the_reported_standard_errors_decide():
    assert judge(result(k=mc(0.70, 0.01)), result(k=mc(0.69, 0.01)), GATES).passed
    unsure = judge(result(k=mc(0.50)), result(k=mc(0.46)), GATES)
    assert unsure.status == "inconclusive" and "unpaired" in by_name(unsure, "k/acc").detail
    assert judge(result(k=mc(0.50, 0.01)), result(k=mc(0.30, 0.01)), GATES).status == "failed"
    nothing = judge(result(k=mc(0.50, 0.0)), result(k=mc(0.30, 0.0)), GATES)
    assert nothing.status == "failed"  # zero standard errors: the loss is exact


def test_the_base_is_the_reference_and_passes_its_quality_gates():
    base, _ = paired(27, 19, 0, 0)  # a suite too small to show anything about a variant
    verdict = judge(None, result(k=base, p=ppl(20.0)), GATES)
    assert verdict.status == "passed"
    assert [g.detail for g in verdict.gates] == [
        "the base: the reference every variant is judged against"
    ] * 2


GATES = Gates(min_recovery=0.90)


def test_perplexity_increase_fails():
    verdict = judge(result(p=ppl(20.0)), result(p=ppl(23.0)), Gates(max_perplexity_increase=0.1))
    assert not verdict.passed
    assert by_name(verdict, "p/word_perplexity").measured == pytest.approx(0.15)


def test_per_task_recovery_and_metric_overrides():
    gates = Gates(min_recovery_per_task={"k": 0.5}, metric_per_task={"k": "acc_norm"})
    verdict = judge(result(k=mc(0.50, 0.01)), result(k=mc(0.40, 0.01)), gates)
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
    verdict = judge(result(k=mc(0.5, 0.01)), result(k=mc(0.5, 0.01)), gates, speed=report)
    statuses = {g.name.split(" ")[0]: g.status for g in verdict.gates}
    assert statuses == {
        "k/acc": "pass",
        "speed/ttft_p50_ms": "fail",
        "speed/output_tokens_per_s": "pass",
    }
    unmeasured = judge(result(k=mc(0.5)), result(k=mc(0.5)), gates, speed=None)
    assert not unmeasured.passed and "not measured" in unmeasured.reasons[0]


def test_verdict_round_trips_and_renders_markdown():
    verdict = judge(result(k=mc(0.50), p=ppl(20.0)), result(k=mc(0.46), p=ppl(30.0)), GATES)
    md = verdict.markdown()
    assert md.startswith("**Verdict: FAILED**")
    assert "| k/acc recovery | 0.92 | 0.9 | inconclusive |" in md
    assert "| p/word_perplexity increase | 0.5 | 0.1 | fail |" in md
    assert type(verdict).model_validate_json(verdict.model_dump_json()) == verdict
    nothing, some = paired(8, 0, 0, 2)  # a base that scores 0: no loss to measure, no bounds
    unmeasured = judge(result(k=nothing), result(k=some), GATES)
    gate = by_name(unmeasured, "k/acc")
    assert gate.status == "inconclusive" and gate.loss.upper is None
    assert "base scores 0" in gate.detail and gate.loss.cell().startswith("loss ? [?, ?]")
    assert type(unmeasured).model_validate_json(unmeasured.model_dump_json()) == unmeasured
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
        ({"min_recovery": 1}, "min_recovery"),  # a margin of 0 can never be shown
        ({"alpha": 0.6}, "alpha"),
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
