"""The regression flow (nightly): for each model's champion, run the load profile and the quick
quality suites against the vLLM serving it, log the figures to MLflow keyed by digest, vLLM
version and hardware, and compare them with the ledger of earlier runs with that key.

A regression beyond noise tags the run status=regressed, emits "slipway.regression.detected" with
the reasons, and, after everything is logged, fails the flow run so that notifications fire. So
does a champion that cannot be checked (refused by the serving checks, or not measurable).

    slipway regression [MODEL]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from configs.evaluation import Gates, Regression
from configs.home import REPO, Home
from configs.models import config_for
from evaluation.monitoring.regression import RegressionVerdict, compare, key_figures
from serving.vllm import VLLMError
from tasks.evaluate import EvaluationError
from tasks.regression import (
    RegressionFound,
    alarm_task,
    chosen_task,
    ledger_task,
    log_task,
    measure_task,
    vet_task,
)
from tasks.servable import ModelVersion, NotServable


@flow(name="regression")
def regression(model: str | None = None, config_dir: str = "configs/models") -> list[Outcome]:
    home = Home.from_env()
    configs = REPO / config_dir  # an absolute config_dir stays as it is
    outcomes = [regression_champion(c, configs, home) for c in chosen_task(home, model)]
    create_markdown_artifact(summary(outcomes), key="regression-summary")
    if failed := [o for o in outcomes if o.status != "passed"]:
        raise RegressionFound("\n".join(o.line() for o in failed))
    return outcomes


@flow(name="regression-champion", flow_run_name="{champion.model}")
def regression_champion(champion: ModelVersion, configs: Path, home: Home) -> Outcome:
    try:
        vet_task(champion)
        config = config_for(champion.model, configs)
        measured = measure_task(champion, config, home)
    except NotServable as e:
        return Outcome(champion, "refused", str(e))
    except (VLLMError, EvaluationError) as e:
        return Outcome(champion, "failed", f"could not measure: {e}")
    history = ledger_task(home, measured.key)
    gates = config.gates if config else Gates()
    policy = config.evaluation.regression if config else Regression()
    figures = key_figures(measured.metrics(), measured.quality, gates)
    verdict = compare(figures, history, policy)
    run_id = log_task(home, champion, measured, history, verdict)
    if verdict.regressed:
        alarm_task(champion, measured.key, verdict, run_id)
        return Outcome(champion, "regressed", "; ".join(verdict.reasons), verdict, run_id)
    return Outcome(champion, "passed", "", verdict, run_id)


@dataclass(frozen=True)
class Outcome:
    """What the run found for one champion: passed, regressed, refused or failed."""

    champion: ModelVersion
    status: str
    reason: str = ""
    verdict: RegressionVerdict | None = None
    run_id: str | None = None  # the MLflow run, when the figures were logged

    def line(self) -> str:
        run = f" (MLflow run {self.run_id})" if self.run_id else ""
        return f"{self.champion}: {self.status}{run}" + (f": {self.reason}" if self.reason else "")


def summary(outcomes: list[Outcome]) -> str:
    """The Prefect artifact: per champion its call and the comparison table."""
    if not outcomes:
        return "# Regression\n\nNo registered model has a `champion`: nothing to check.\n"
    parts = ["# Regression"]
    for o in outcomes:
        parts += [f"## {o.champion}: {o.status}", o.reason if o.status != "regressed" else ""]
        if o.verdict:
            parts += [f"MLflow run `{o.run_id}`", o.verdict.markdown()]
            parts += [f"- {r}" for r in o.verdict.reasons]
    return "\n\n".join(p for p in parts if p) + "\n"
