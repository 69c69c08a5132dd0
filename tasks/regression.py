"""Regression runs: measure a champion where it is served, keep the figures in MLflow as the
ledger, plot them over time, and raise the alarm when they moved beyond noise.

Each run is one MLflow run in the experiment "slipway-regression", tagged with the ledger key
(model digest, vLLM version as the server reports it, hardware class) and its status; the earlier
runs with the same key are the ledger that evaluation/regression.py judges against. The champion
is measured on the vLLM that `make up` serves it with when that one answers (what users get),
else on a vLLM started for the run and stopped after it.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from configs.evaluation import Evaluation
from configs.home import Home
from configs.models import ModelConfig, Serving
from evaluation.loadgen.report import LoadReport
from evaluation.monitoring.regression import REGRESSED, LedgerRun, RegressionVerdict, label
from evaluation.quality.gates import QualityResult
from serving.processes import members, read_state
from serving.vllm import VLLMServer, hardware_class
from tasks.direct_traffic import record_unmetered
from tasks.evaluate import (
    EvaluationError,
    quality_metrics,
    run_quality,
    run_speed,
    speed_metrics,
)
from tasks.registry import Registry
from tasks.servable import ModelVersion, champions, check_servable

EXPERIMENT = "slipway-regression"
EVENT = "slipway.regression.detected"
HISTORY = 200  # ledger runs read back per key: the plots' history (the baseline uses fewer)


class RegressionFound(RuntimeError):
    """A champion regressed or could not be checked; the message says which, and why."""


@dataclass(frozen=True)
class Key:
    """What makes two runs comparable: the same weights, vLLM and hardware."""

    digest: str
    vllm_version: str
    hardware: str

    def tags(self) -> dict[str, str]:
        return {"digest": self.digest, "vllm_version": self.vllm_version, "hardware": self.hardware}

    def filter(self) -> str:
        return " and ".join(f"tags.{k} = '{v}'" for k, v in self.tags().items())


@dataclass(frozen=True)
class Measurement:
    key: Key
    url: str
    on_stack: bool  # measured on the vLLM `make up` serves (else one started for the run)
    speed: LoadReport
    quality: QualityResult | None  # None when the config has no shipped suite to run
    out_dir: Path

    def metrics(self) -> dict[str, float]:
        return speed_metrics(self.speed) | (quality_metrics(self.quality) if self.quality else {})


def chosen(home: Home, model: str | None) -> list[ModelVersion]:
    """The champions to check: every model's, or `model`'s (which must have one)."""
    found = [c for c in champions(Registry(home)) if model in (None, c.model)]
    if model and not found:
        raise RegressionFound(f"{model} has no `champion` version to check (release it first)")
    return found


def stack_url(champion: ModelVersion, home: Home) -> str | None:
    """Where `make up` serves the champion, if that vLLM is still running and answers."""
    for proc in read_state(home):
        if proc.what == champion.record and members(proc) and proc.answers():
            return proc.url
    return None


def vllm_version(url: str) -> str:
    try:
        response = httpx.get(f"{url}/version", timeout=10)
        response.raise_for_status()
        return str(response.json()["version"])
    except (httpx.HTTPError, ValueError, KeyError) as e:
        raise EvaluationError(f"cannot read the vLLM version from {url}/version: {e}") from e


def measure(champion: ModelVersion, config: ModelConfig | None, home: Home) -> Measurement:
    """The config's load profile and the quick cut of its quality suites against the champion."""
    evaluation = (config.evaluation if config else Evaluation()).quick()
    weights = champion.weights
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = home.root / "regression" / champion.served_name / stamp
    name = champion.served_name
    with ExitStack() as stack:
        url = stack_url(champion, home)
        on_stack = url is not None
        if url is None:
            serving = config.serving if config else Serving()
            url = stack.enter_context(VLLMServer(weights, name, home, serving)).url
        key = Key(champion.tags["digest"], vllm_version(url), hardware_class())
        began = time.time()
        try:
            speed = run_speed(url, name, evaluation.loadgen, out_dir / "speed")
            quality = None
            if evaluation.suites:
                quality = run_quality(url, name, weights, evaluation, out_dir / "quality")
        finally:
            if on_stack:  # the served engine's counters include this load: say whose it was
                record_unmetered(home, "regression", champion.version, began, time.time())
    return Measurement(key, url, on_stack, speed, quality, out_dir)


def ledger(registry: Registry, key: Key) -> list[LedgerRun]:
    """The finished regression runs with this key, oldest first."""
    runs = registry.finished_runs(EXPERIMENT, key.filter(), HISTORY)
    return [
        LedgerRun(
            run_id=r.info.run_id,
            at=datetime.fromtimestamp(r.info.start_time / 1000, UTC),
            status=r.data.tags.get("status", ""),
            figures=dict(r.data.metrics),
        )
        for r in reversed(runs)
    ]


def plot_history(
    history: list[LedgerRun], now: dict[str, float], verdict: RegressionVerdict, path: Path
) -> None:
    """One panel per judged figure: the ledger's runs (regressed ones as red crosses), the band
    around the baseline, and this run coloured by its call."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    colours = {"regression": "tab:red", "improvement": "tab:green"}
    at = datetime.now(UTC)
    cols = min(3, len(verdict.rows)) or 1
    rows = -(-len(verdict.rows) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for axis, row in zip(axes.flat, verdict.rows, strict=False):
        past = [r for r in history if row.figure in r.figures]
        ok = [r for r in past if r.status != REGRESSED]
        bad = [r for r in past if r.status == REGRESSED]
        axis.plot([r.at for r in ok], [r.figures[row.figure] for r in ok], "o-", color="tab:gray")
        axis.plot([r.at for r in bad], [r.figures[row.figure] for r in bad], "x", color="tab:red")
        if row.baseline is not None and row.band is not None:
            start = ok[-row.runs].at  # the oldest run of the baseline
            axis.fill_between(
                [start, at],
                row.baseline - row.band,
                row.baseline + row.band,
                color="tab:blue",
                alpha=0.15,
                label="baseline band",
            )
        axis.plot(
            [at],
            [now[row.figure]],
            "o",
            color=colours.get(row.status, "tab:blue"),
            markersize=9,
            label=f"this run: {row.status}",
        )
        axis.set_title(f"{label(row.figure)} ({row.better} is better)", fontsize=9)
        axis.tick_params(axis="x", labelsize=7, rotation=30)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(verdict.rows) :]:
        axis.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def log_regression(
    registry: Registry,
    champion: ModelVersion,
    measured: Measurement,
    history: list[LedgerRun],
    verdict: RegressionVerdict,
) -> str:
    """One MLflow run: every figure in one batch, the key and status as tags, the comparison and
    the history plot as artifacts. Returns the run id."""
    out = measured.out_dir
    out.mkdir(parents=True, exist_ok=True)
    reasons = "".join(f"\n- {r}" for r in verdict.reasons)
    (out / "comparison.md").write_text(verdict.markdown() + reasons + "\n")
    figures = {row.figure: row.measured for row in verdict.rows}
    plot_history(history, figures, verdict, out / "history.png")
    status = REGRESSED if verdict.regressed else "passed"
    suites = ",".join(measured.quality.tasks) if measured.quality else ""
    return registry.log_run(
        f"{champion.served_name}-regression",
        params={
            "url": measured.url,
            "served_by": "stack" if measured.on_stack else "this run",
            "ledger_runs": len(history),
            "suites": suites,
        },
        metrics=measured.metrics(),
        tags={
            "model": champion.model,
            "version": champion.version,
            **measured.key.tags(),
            "status": status,
        },
        artifacts=[out / "speed", out / "quality", out / "comparison.md", out / "history.png"],
        experiment=EXPERIMENT,
    )


def alarm(champion: ModelVersion, key: Key, verdict: RegressionVerdict, run_id: str) -> None:
    """The Prefect event automations and notifications react to."""
    emit_event(
        event=EVENT,
        resource={
            "prefect.resource.id": f"slipway.model.{champion.model}",
            "prefect.resource.name": champion.model,
            "slipway.version": champion.version,
            "slipway.digest": key.digest,
        },
        payload={"reasons": verdict.reasons, "mlflow_run_id": run_id, **key.tags()},
    )


# ---- Prefect -------------------------------------------------------------------------------------


@task(name="champions", cache_policy=NO_CACHE)
def chosen_task(home: Home, model: str | None) -> list[ModelVersion]:
    return chosen(home, model)


@task(name="vet-champion", cache_policy=NO_CACHE)
def vet_task(champion: ModelVersion) -> None:
    check_servable(champion)


@task(name="measure", cache_policy=NO_CACHE)
def measure_task(champion: ModelVersion, config: ModelConfig | None, home: Home) -> Measurement:
    return measure(champion, config, home)


@task(name="read-ledger", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def ledger_task(home: Home, key: Key) -> list[LedgerRun]:
    return ledger(Registry(home), key)


@task(name="log-regression", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def log_task(
    home: Home,
    champion: ModelVersion,
    measured: Measurement,
    history: list[LedgerRun],
    verdict: RegressionVerdict,
) -> str:
    return log_regression(Registry(home), champion, measured, history, verdict)


@task(name="regression-event", cache_policy=NO_CACHE)
def alarm_task(champion: ModelVersion, key: Key, verdict: RegressionVerdict, run_id: str) -> None:
    alarm(champion, key, verdict, run_id)
