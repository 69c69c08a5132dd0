"""Regression check: does tonight's run of a champion measure worse than the runs before it on the
same weights, vLLM version and hardware? Pure functions over the ledger.

The ledger is the history of earlier regression runs with the same key (model digest, vLLM version,
hardware class); MLflow keeps it and tasks/regression.py reads it. A figure's baseline is the median
of the last `window` earlier runs that did not regress (a regressed run would drag the baseline
towards the regression, and the alarm would fade while nothing was fixed); its spread is the scaled
MAD, a standard deviation that one odd night cannot inflate. A figure regresses when it moved in
its bad direction by more than the band: k x spread, but at least a relative floor, so a ledger of
near-identical runs does not flag tiny moves. With fewer than `min_runs` earlier runs there is no
baseline and nothing is judged.

Quality figures get the same ledger band, not lm-eval's standard error: every run scores the same
items with the same weights at temperature 0, so that sampling error is the same every night and
says nothing about run-to-run noise; a score that moves means the served model changed.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from configs.evaluation import Gates, Regression
from configs.loader import Strict
from evaluation.quality.gates import PERPLEXITY_METRICS, QualityResult, gated_metric

Better = Literal["lower", "higher"]
Status = Literal["regression", "improvement", "within-noise", "no-baseline"]
# The speed figures judged per load level (all of them are logged); latency lower is better.
SPEED_FIGURES: dict[str, Better] = {
    "ttft_ms_p50": "lower",
    "ttft_ms_p99": "lower",
    "tpot_ms_p50": "lower",
    "output_tokens_per_s": "higher",
    "requests_per_s": "higher",
}
SCALED_MAD = 1.4826  # MAD x this estimates the standard deviation of normal noise
REGRESSED = "regressed"  # the ledger status of a run that regressed: never part of a baseline


class LedgerRun(Strict):
    """One earlier regression run with the same key: when, its status, and what it measured."""

    run_id: str
    at: datetime
    status: str
    figures: dict[str, float]


class Row(Strict):
    """One figure: what it measured against its baseline, and the call."""

    figure: str
    better: Better
    measured: float
    baseline: float | None  # median of the baseline runs
    spread: float | None  # their scaled MAD
    band: float | None  # the move that counts: max(k x spread, floor x |baseline|)
    runs: int  # baseline runs that had the figure
    status: Status

    @property
    def change_pct(self) -> float | None:
        if not self.baseline:
            return None
        return (self.measured - self.baseline) / abs(self.baseline) * 100

    def reason(self) -> str:
        """E.g. "ttft_ms_p50 at concurrency 4 rose 31% (412 -> 540 ms; ledger spread 4%, band 12%,
        5 runs)"."""
        moved = "rose" if self.measured > (self.baseline or 0) else "fell"
        unit = " ms" if "_ms_" in self.figure else ""
        if self.change_pct is None:
            return f"{label(self.figure)} {moved} from 0 to {self.measured:.4g}{unit}"
        base = abs(self.baseline or 0)
        return (
            f"{label(self.figure)} {moved} {abs(self.change_pct):.0f}% ({self.baseline:.4g} -> "
            f"{self.measured:.4g}{unit}; ledger spread {self.spread / base:.0%}, band "
            f"{self.band / base:.0%}, {self.runs} runs)"
        )


class RegressionVerdict(Strict):
    rows: list[Row]

    @property
    def regressed(self) -> bool:
        return any(r.status == "regression" for r in self.rows)

    @property
    def reasons(self) -> list[str]:
        """One line per regressed figure."""
        return [r.reason() for r in self.rows if r.status == "regression"]

    def markdown(self) -> str:
        head = "| figure | better | baseline | spread | band | measured | change | runs | status |"
        lines = [head, "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            change = "" if r.change_pct is None else f"{r.change_pct:+.1f}%"
            cells = [
                label(r.figure),
                r.better,
                _num(r.baseline),
                _num(r.spread),
                _num(r.band),
                _num(r.measured),
                change,
                str(r.runs),
                r.status,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def better(figure: str) -> Better:
    """Which way is good: latency and perplexity lower, throughput and accuracy higher."""
    metric = figure.rsplit("/", 1)[-1]
    if figure.startswith("speed/"):
        return SPEED_FIGURES.get(metric, "lower" if "_ms_" in metric else "higher")
    return "lower" if metric in PERPLEXITY_METRICS else "higher"


def label(figure: str) -> str:
    """A figure for people: "speed/concurrency_4/ttft_ms_p50" -> "ttft_ms_p50 at concurrency 4",
    "speed/synchronous/tpot_ms_p50" -> "tpot_ms_p50 (synchronous)", "task/acc" -> "task acc"."""
    parts = figure.split("/")
    if parts[0] != "speed" or len(parts) != 3:
        return " ".join(parts)
    level = parts[1].replace("_", " ")
    return f"{parts[2]} at {level}" if level.startswith("concurrency") else f"{parts[2]} ({level})"


def key_figures(
    metrics: dict[str, float], quality: QualityResult | None, gates: Gates
) -> dict[str, float]:
    """The figures a run is judged on, out of every metric it logs: per load level the
    SPEED_FIGURES, per quality task the metric the release gates it on."""
    speed = {
        name: value
        for name, value in metrics.items()
        if name.startswith("speed/") and name.rsplit("/", 1)[-1] in SPEED_FIGURES
    }
    tasks = quality.tasks if quality else {}
    gated = [f"{task}/{gated_metric(task, score, gates)}" for task, score in tasks.items()]
    return speed | {name: metrics[name] for name in gated if name in metrics}


def baseline(ledger: Sequence[LedgerRun], figure: str, window: int) -> list[float]:
    """The figure's values in the last `window` earlier runs that did not regress, oldest first."""
    runs = sorted(ledger, key=lambda r: r.at)
    runs = [r for r in runs if r.status != REGRESSED and figure in r.figures]
    return [r.figures[figure] for r in runs[-window:]]


def judge_figure(figure: str, measured: float, history: Sequence[float], policy: Regression) -> Row:
    direction = better(figure)
    if len(history) < policy.min_runs:
        return Row(
            figure=figure,
            better=direction,
            measured=measured,
            baseline=None,
            spread=None,
            band=None,
            runs=len(history),
            status="no-baseline",
        )
    median = statistics.median(history)
    spread = SCALED_MAD * statistics.median(abs(x - median) for x in history)
    floor = policy.speed_floor if figure.startswith("speed/") else policy.quality_floor
    band = max(policy.k * spread, floor * abs(median))
    delta = measured - median
    worse = delta > 0 if direction == "lower" else delta < 0
    status: Status = "within-noise"
    if abs(delta) > band:
        status = "regression" if worse else "improvement"
    return Row(
        figure=figure,
        better=direction,
        measured=measured,
        baseline=median,
        spread=spread,
        band=band,
        runs=len(history),
        status=status,
    )


def compare(
    measured: dict[str, float], ledger: Sequence[LedgerRun], policy: Regression
) -> RegressionVerdict:
    """Every measured figure against its baseline in the ledger."""
    return RegressionVerdict(
        rows=[
            judge_figure(name, value, baseline(ledger, name, policy.window), policy)
            for name, value in sorted(measured.items())
        ]
    )


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
