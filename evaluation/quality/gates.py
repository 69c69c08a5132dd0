"""Release gates: does a quantized variant keep enough of the bf16 base? Pure functions.

Quality gate per task, on one metric (acc, exact_match, ...): the variant's loss against the base,
1 - score / base score, must be shown to be below the task's margin, 1 - min_recovery
(non-inferiority, evaluation/quality/noninferiority.py): on the paired per-item scores when both
runs scored the same items (the usual case), otherwise from the two reported standard errors.
The gate passes when the loss's upper confidence bound is below the margin, fails when its lower
bound is above it, and is otherwise `inconclusive`: failing to show a loss is not evidence of no
loss, and a suite too small for its margin says so. Each decision is wrong at most alpha of the
time (one-sided, gates.alpha).
Perplexity gate per task: relative increase of word perplexity <= max_perplexity_increase. The
text and the scoring are fixed, so the number is exact for that text; no interval applies.
Speed gates (optional) read one level of the load generator's report, measured once on the
release's machine, against absolute floors: a measurement, not a comparison with the base.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from configs.evaluation import Gates
from configs.loader import Strict
from evaluation.loadgen.report import LoadReport
from evaluation.quality.noninferiority import Comparison, compare, compare_unpaired

Status = Literal["pass", "fail", "inconclusive"]
Outcome = Literal["passed", "failed", "inconclusive"]
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


class Loss(Strict):
    """A quality gate's evidence: the relative loss, its one-sided (1 - alpha) bounds, the
    flips and what the suite can see."""

    margin: float
    estimate: float | None  # None where the base scores 0: no loss can be measured
    lower: float | None  # None: unbounded
    upper: float | None
    alpha: float
    n: int
    harmful: int
    beneficial: int
    detectable: float | None
    needed: int | None  # items an identical variant needs to pass, when the suite is too small
    method: str

    @classmethod
    def of(cls, c: Comparison) -> Loss:
        return cls(
            margin=c.margin,
            estimate=_finite(c.loss),
            lower=_finite(c.lower),
            upper=_finite(c.upper),
            alpha=c.alpha,
            n=c.n,
            harmful=c.harmful,
            beneficial=c.beneficial,
            detectable=c.detectable,
            needed=c.needed,
            method=c.method,
        )

    def cell(self) -> str:
        """One table cell: loss [bounds] vs margin, flips."""
        loss, lower, upper = (_pct(x) for x in (self.estimate, self.lower, self.upper))
        return (
            f"loss {loss} [{lower}, {upper}] vs {self.margin:.0%}"
            f", flips -{self.harmful}/+{self.beneficial} of {self.n}"
        )


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:+.1%}"


class GateResult(Strict):
    name: str
    measured: float | None
    threshold: float
    status: Status
    detail: str
    loss: Loss | None = None  # quality gates


class Verdict(Strict):
    status: Outcome
    gates: list[GateResult]
    reasons: list[str]

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def tags(self) -> dict[str, str]:
        """The verdict as model-version tags: rollout reads eval_status, people read the reasons."""
        return {
            "eval_status": self.status,
            "eval_reasons": "; ".join(self.reasons)[:4000] or "all gates passed",
        }

    def markdown(self) -> str:
        head = f"**Verdict: {self.status.upper()}**\n\n"
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


def compared(base: TaskScore, cand: TaskScore, metric: str, margin: float, alpha: float):
    """The variant's loss on `metric` against the base: paired when both scored the same items,
    else from the reported standard errors; None when neither is there."""
    b, c = base.items.get(metric, {}), cand.items.get(metric, {})
    common = sorted(b.keys() & c.keys())
    if len(common) >= 2 and len(common) == len(b) == len(c):
        return compare([b[i] for i in common], [c[i] for i in common], margin, alpha)
    if metric in base.stderr and metric in cand.stderr:
        return compare_unpaired(
            base.metrics[metric],
            base.stderr[metric],
            cand.metrics[metric],
            cand.stderr[metric],
            margin,
            alpha,
        )
    return None


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
    recovery = c / b if b > 0 else None
    found = compared(base, cand, metric, 1 - floor, gates.alpha)
    if found is None:
        return GateResult(
            name=f"{name} recovery",
            measured=recovery,
            threshold=floor,
            status="inconclusive",
            detail=f"base {b:.4g} -> {c:.4g}; no per-item scores or standard errors to bound "
            "the loss by",
        )
    return GateResult(
        name=f"{name} recovery",
        measured=recovery,
        threshold=floor,
        status=found.decision,
        detail=f"base {b:.4g} -> {c:.4g}; {found.describe()}",
        loss=Loss.of(found),
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
    base: QualityResult | None,
    candidate: QualityResult,
    gates: Gates,
    speed: LoadReport | None = None,
) -> Verdict:
    """Every gate for `candidate` against the bf16 `base` (None: the candidate is the base, the
    reference itself, with nothing to lose; its speed is still gated): failed if one fails, else
    inconclusive if one is, else passed."""
    if base is None:
        results = [
            GateResult(
                name=f"{task}/{gated_metric(task, score, gates)}",
                measured=None,
                threshold=0,
                status="pass",
                detail="the base: the reference every variant is judged against",
            )
            for task, score in candidate.tasks.items()
        ]
        base = QualityResult(model=candidate.model, tasks={})
    else:
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
    open_ = [g for g in results if g.status == "inconclusive"]
    reasons += [f"{g.name}: inconclusive: {g.detail}" for g in open_]
    failed = any(g.status == "fail" for g in results)
    status: Outcome = "failed" if failed else "inconclusive" if open_ else "passed"
    return Verdict(status=status, gates=results, reasons=reasons)
