"""How the drift check compares two windows of traffic (configs/drift.yaml).

Methods and thresholds are pinned rather than left to Evidently, which picks p-value tests for
windows of up to 1,000 rows and distances above: a verdict must mean the same at any traffic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

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
# Evidently's stattest names: distances (drift when score >= threshold) and p-value tests (drift
# when p < threshold).
Method = Literal[
    "wasserstein",
    "jensenshannon",
    "psi",
    "kl_div",
    "hellinger",
    "TVD",
    "ed",
    "ks",
    "chisquare",
    "z",
    "mannw",
    "anderson",
    "cramer_von_mises",
    "t_test",
    "g_test",
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
    num_method: Method = "wasserstein"
    num_threshold: float = Field(default=0.1, gt=0)
    cat_method: Method = "jensenshannon"
    cat_threshold: float = Field(default=0.1, gt=0)
    methods: dict[Feature, Method] = Field(default={}, description="per-feature method")
    thresholds: dict[Feature, float] = Field(default={}, description="per-feature threshold")
    experiment: str = Field(default="slipway-monitoring", min_length=1, description="MLflow")


def load_drift_config(path: str | Path = DEFAULT_DRIFT) -> DriftConfig:
    return load_yaml(path, DriftConfig)
