"""How the drift check compares two windows of traffic, and when it alarms (configs/drift.yaml).

A feature drifts when its test rejects at its share of the alarm budget AND its effect size
reaches its floor: evaluation/monitoring/drift_rule.py says which test and effect size each
feature kind gets and why the family-wise false-alarm rate stays within `false_alarm_rate` over
`horizon_looks` looks. The effect sizes are Evidently's distances, pinned rather than left to
Evidently (which picks p-value tests up to 1,000 rows and distances above): a verdict must mean
the same at any traffic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat

from configs.home import REPO
from configs.loader import Strict, load_yaml

DEFAULT_DRIFT = REPO / "configs" / "drift.yaml"

Feature = Literal[
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "ttft_ms",
    "is_error",
    "tenant",
    "prompt_chars",
    "prompt_words",
    "prompt_sentences",
]


class DriftConfig(Strict):
    drift_share: float = Field(
        default=0.3, gt=0, le=1, description="share of drifted features that raises the alarm"
    )
    sample_rows: int = Field(
        default=50_000, ge=1000, description="uniform sample per window for the distribution tests"
    )
    seed: int = Field(default=0, description="of the sample, so a re-run gives the same report")
    min_rows: int = Field(
        default=100, ge=1, description="fewer rows (or values of a feature) and it is not compared"
    )
    false_alarm_rate: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="family-wise: on traffic that did not change, the chance that any feature is "
        "flagged at any look of the horizon",
    )
    horizon_looks: int = Field(
        default=168,
        ge=1,
        description="the looks the budget is spread over (168: a week of the hourly schedule)",
    )
    num_floor: float = Field(
        default=0.1, gt=0, description="numbers: normed Wasserstein distance to reach"
    )
    cat_floor: float = Field(
        default=0.1, gt=0, description="tenant: Jensen-Shannon distance of the shares to reach"
    )
    error_rate_floor: float = Field(
        default=0.01, gt=0, lt=1, description="is_error: absolute change of the error rate"
    )
    floors: dict[Feature, PositiveFloat] = Field(
        default={}, description="per-feature floor, in that feature's effect size"
    )
    experiment: str = Field(default="slipway-monitoring", min_length=1, description="MLflow")

    def floor(self, feature: str) -> float:
        if feature in self.floors:
            return self.floors[feature]
        if feature == "is_error":
            return self.error_rate_floor
        return self.cat_floor if feature == "tenant" else self.num_floor


def load_drift_config(path: str | Path = DEFAULT_DRIFT) -> DriftConfig:
    return load_yaml(path, DriftConfig)
