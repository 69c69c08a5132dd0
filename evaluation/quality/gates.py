"""Release gates: does a quantized variant keep enough of the bf16 base? Pure functions.

Quality gate per task, on one metric (acc, exact_match, ...): recovery = candidate / base must
reach the task's min_recovery. A drop that misses it still PASSES as "within-noise" when it is
inside the suite's statistical noise: |delta| <= z * se, where se comes from a PAIRED test on the
per-item scores when both runs scored the same items (the usual case: same suite, same limit),
se = sd(candidate_i - base_i) / sqrt(n), which is far tighter than comparing two independent
means because most items score the same on both; otherwise from the two reported standard
errors, se = sqrt(se_base^2 + se_candidate^2).
Perplexity gate per task: relative increase of word perplexity <= max_perplexity_increase. The
text and the scoring are fixed, so the number is exact for that text; no noise band applies.
Speed gates (optional) read one level of the load generator's report.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from configs.evaluation import Gates
from configs.loader import Strict
from evaluation.loadgen.report import LoadReport

Status = Literal["pass", "fail", "within-noise"]
# The metric a task is gated on when gates.metric_per_task does not say: the first one it has.
QUALITY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "mcc")
PERPLEXITY_METRIC = "word_perplexity"
# Lower is better for these: gated on their relative increase, not on recovery.
PERPLEXITY_METRICS = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"}


class TaskScore(Strict):
    """One task's aggregate metrics, their standard errors, and per-item scores (by doc id)."""

    metrics: dict[str, float]
    stderr: dict[str, float] = Field(default_factory=dict)
    n: int
    items: dict[str, dict[int, float]] = Field(default_factory=dict)


class QualityResult(Strict):
    """What one quality run measured; JSON round-trips (model_dump_json / model_validate_json)."""

    model: str
    tasks: dict[str, TaskScore]
    limit: int | None = None


class GateResult(Strict):
    name: str
    measured: float | None
    threshold: float
    status: Status
    detail: str


class Verdict(Strict):
    passed: bool
    gates: list[GateResult]
    reasons: list[str]

    def tags(self) -> dict[str, str]:
        """The verdict as model-version tags: rollout reads eval_status, people read the reasons."""
        return {
            "eval_status": "passed" if self.passed else "failed",
            "eval_reasons": "; ".join(self.reasons)[:4000] or "all gates passed",
        }

    def markdown(self) -> str:
        head = f"**Verdict: {'PASSED' if self.passed else 'FAILED'}**\n\n"
        rows = ["| gate | measured | threshold | status | detail |", "|---|---|---|---|---|"]
        for g in self.gates:
            value = "n/a" if g.measured is None else f"{g.measured:.4g}"
            rows.append(f"| {g.name} | {value} | {g.threshold:.4g} | {g.status} | {g.detail} |")
        tail = "".join(f"\n- {r}" for r in self.reasons)
        return head + "\n".join(rows) + ("\n" + tail if tail else "") + "\n"


def gated_metric(task: str, score: TaskScore, gates: Gates) -> str | None:
    if task in gates.metric_per_task:
        return gates.metric_per_task[task]
    if PERPLEXITY_METRIC in score.metrics:
        return PERPLEXITY_METRIC
    return next((m for m in QUALITY_METRICS if m in score.metrics), None)


def noise_se(base: TaskScore, cand: TaskScore, metric: str) -> tuple[float | None, str]:
    """Standard error of candidate - base on `metric`, and how it was estimated."""
    b, c = base.items.get(metric, {}), cand.items.get(metric, {})
    common = sorted(b.keys() & c.keys())
    if len(common) >= 2 and len(common) == len(b) == len(c):
        diffs = [c[i] - b[i] for i in common]
        mean = sum(diffs) / len(diffs)
        var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
        return math.sqrt(var / len(diffs)), f"paired, n={len(common)}"
    if metric in base.stderr and metric in cand.stderr:
        return math.hypot(base.stderr[metric], cand.stderr[metric]), "unpaired stderr"
    return None, "no stderr"


def quality_gate(task: str, base: TaskScore, cand: TaskScore, gates: Gates) -> GateResult:
    metric = gated_metric(task, base, gates)
    name = f"{task}/{metric}"
    if metric is None or metric not in base.metrics or metric not in cand.metrics:
        return GateResult(
            name=name,
            measured=None,
            threshold=0,
            status="fail",
            detail=f"no gateable metric in {sorted(base.metrics)} / {sorted(cand.metrics)}",
        )
    b, c = base.metrics[metric], cand.metrics[metric]
    if metric in PERPLEXITY_METRICS:
        increase = c / b - 1
        limit = gates.max_perplexity_increase
        status: Status = "pass" if increase <= limit else "fail"
        return GateResult(
            name=f"{name} increase",
            measured=increase,
            threshold=limit,
            status=status,
            detail=f"base {b:.4g} -> {c:.4g}",
        )
    floor = gates.min_recovery_per_task.get(task, gates.min_recovery)
    recovery = c / b if b > 0 else (1.0 if c >= b else 0.0)
    detail = f"base {b:.4g} -> {c:.4g}"
    if recovery >= floor:
        return GateResult(
            name=f"{name} recovery",
            measured=recovery,
            threshold=floor,
            status="pass",
            detail=detail,
        )
    se, how = noise_se(base, cand, metric)
    band = gates.noise_z * se if se is not None else 0.0
    status = "within-noise" if se is not None and abs(c - b) <= band else "fail"
    return GateResult(
        name=f"{name} recovery",
        measured=recovery,
        threshold=floor,
        status=status,
        detail=f"{detail}; delta {c - b:+.4g}, noise band ±{band:.4g} ({how})",
    )


def speed_gates(report: LoadReport | None, gates: Gates) -> list[GateResult]:
    wanted = [
        ("ttft_p50_ms", gates.max_ttft_p50_ms, "max"),
        ("output_tokens_per_s", gates.min_output_tokens_per_s, "min"),
    ]
    wanted = [(k, t, kind) for k, t, kind in wanted if t is not None]
    if not wanted:
        return []
    level = report.level(gates.speed_concurrency) if report else None
    where = f"at concurrency {gates.speed_concurrency}"
    results = []
    for key, threshold, kind in wanted:
        name = f"speed/{key} ({kind}, {where})"
        if level is None:
            results.append(
                GateResult(
                    name=name,
                    measured=None,
                    threshold=threshold,
                    status="fail",
                    detail="not measured",
                )
            )
            continue
        value = level.ttft_ms.p50 if key == "ttft_p50_ms" else level.output_tokens_per_s
        if value is None:
            results.append(
                GateResult(
                    name=name,
                    measured=None,
                    threshold=threshold,
                    status="fail",
                    detail=f"{level.label}: no successful request",
                )
            )
            continue
        ok = value <= threshold if kind == "max" else value >= threshold
        results.append(
            GateResult(
                name=name,
                measured=value,
                threshold=threshold,
                status="pass" if ok else "fail",
                detail=level.label,
            )
        )
    return results


def judge(
    base: QualityResult,
    candidate: QualityResult,
    gates: Gates,
    speed: LoadReport | None = None,
) -> Verdict:
    """Every gate for `candidate` against the bf16 `base`; passed only if none fails."""
    results = []
    for task, base_score in base.tasks.items():
        if task not in candidate.tasks:
            results.append(
                GateResult(
                    name=task,
                    measured=None,
                    threshold=0,
                    status="fail",
                    detail="not evaluated on the candidate",
                )
            )
            continue
        results.append(quality_gate(task, base_score, candidate.tasks[task], gates))
    results += speed_gates(speed, gates)
    reasons = [
        f"{g.name}: {g.detail} (threshold {g.threshold:.4g})" for g in results if g.status == "fail"
    ]
    reasons += [
        f"{g.name}: below threshold but within noise ({g.detail})"
        for g in results
        if g.status == "within-noise"
    ]
    return Verdict(passed=all(g.status != "fail" for g in results), gates=results, reasons=reasons)
