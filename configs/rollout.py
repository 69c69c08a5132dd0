"""The rollout policy (configs/rollout/<name>.yaml): canary steps, SLOs, how each step is judged."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Literal

from pydantic import AnyHttpUrl, Field, field_validator, model_validator

from configs.home import REPO
from configs.loader import Strict, load_yaml

DEFAULT_POLICY = REPO / "configs" / "rollout" / "default.yaml"


class Margins(Strict):
    """How much worse than stable the canary may be before it counts as worse; null skips a metric.

    Relative: 0.15 on TTFT lets the canary's geometric-mean TTFT be 1.15 x stable's.
    """

    error_rate: float | None = Field(
        default=0.25, ge=0, description="canary error rate / stable's - 1"
    )
    ttft: float | None = Field(default=0.15, gt=0, description="time to first token")
    tpot: float | None = Field(default=0.15, gt=0, description="time per output token")
    e2e: float | None = Field(
        default=0.25,
        gt=0,
        description="end-to-end latency; looser, as a new model may answer at more length",
    )


class Slos(Strict):
    """Absolute objectives the canary must meet on its own; null leaves one unchecked."""

    ttft_p99_s: float | None = Field(
        default=None, gt=0, description="99th percentile TTFT, seconds"
    )
    tpot_p99_s: float | None = Field(
        default=None, gt=0, description="99th percentile TPOT, seconds"
    )
    e2e_p99_s: float | None = Field(
        default=None, gt=0, description="99th percentile end-to-end, seconds"
    )
    error_rate: float | None = Field(default=None, gt=0, lt=1, description="error-rate ceiling")


class AnalysisPolicy(Strict):
    """How one step's canary-vs-stable analysis decides (see evaluation/canary.py for the tests)."""

    alpha: float = Field(
        default=0.01, gt=0, lt=0.5, description="chance of a false 'worse' (rollback)"
    )
    beta: float = Field(
        default=0.05, gt=0, lt=0.5, description="chance of a false 'not worse' (advance)"
    )
    margins: Margins = Margins()
    error_rate_tolerance: float = Field(
        default=0.02,
        gt=0,
        lt=1,
        description="absolute excess error rate a canary may be shown under to advance",
    )
    burn_in: int = Field(
        default=30, ge=2, description="latency samples per arm before latency is tested"
    )
    min_samples: int = Field(default=100, ge=1, description="canary requests before 'not worse'")
    slos: Slos = Slos()


class RolloutPolicy(Strict):
    """Canary weights in steps, each judged until 'worse' (roll back), 'not worse' with enough
    samples (next step) or its time limit (`on_inconclusive`). The last step, 100, is promotion."""

    steps: list[int] = Field(
        default=[5, 25, 50, 100], description="canary weight in percent, per step"
    )
    min_samples: int | list[int] = Field(
        default=100,
        description="canary requests before a step may advance: one, or one per step before 100",
    )
    max_seconds: float | list[float] = Field(
        default=900, description="time limit of a step: one, or one per step before 100"
    )
    on_inconclusive: Literal["pause", "rollback"] = "pause"
    slos: Slos = Slos()
    analysis: AnalysisPolicy = AnalysisPolicy()
    tenant_first: bool = Field(
        default=False,
        description="a first stage where every opted-in tenant (canary: in), and only they, reach "
        "the canary; judged like the first step",
    )
    look_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="seconds between looks at the gateway's statistics"
    )
    synthetic_load: bool = Field(
        default=False, description="top up low traffic with synthetic requests"
    )
    synthetic_rate: float = Field(default=1.0, gt=0, description="synthetic requests per second")
    webhook_url: AnyHttpUrl | None = Field(
        default=None, description="told of every step and verdict"
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if len(v) < 2:
            raise ValueError(
                f"{v} needs at least one canary step below 100 before 100, e.g. [5, 25, 50, 100]"
            )
        if any(not 0 < w <= 100 for w in v):
            raise ValueError(f"{v}: every weight must be a percentage in 1..100")
        if any(b <= a for a, b in pairwise(v)):
            raise ValueError(f"{v} must be strictly increasing")
        if v[-1] != 100:
            raise ValueError(f"{v} must end at 100 (promotion)")
        return v

    @field_validator("min_samples")
    @classmethod
    def _min_samples(cls, v: int | list[int]) -> int | list[int]:
        if any(n < 1 for n in (v if isinstance(v, list) else [v])):
            raise ValueError(f"{v}: every step needs at least 1 canary request")
        return v

    @field_validator("max_seconds")
    @classmethod
    def _max_seconds(cls, v: float | list[float]) -> float | list[float]:
        if any(s <= 0 for s in (v if isinstance(v, list) else [v])):
            raise ValueError(f"{v}: every time limit must be > 0 seconds")
        return v

    @model_validator(mode="after")
    def _per_step(self) -> RolloutPolicy:
        judged = len(self.steps) - 1
        for name in ("min_samples", "max_seconds"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != judged:
                raise ValueError(
                    f"{name}: {value} has {len(value)} values; "
                    f"give one, or one per step before 100 ({judged})"
                )
        if set(self.analysis.model_fields_set) & {"min_samples", "slos"}:
            raise ValueError(
                "analysis: set min_samples and slos at the top level of the policy, "
                "not under analysis"
            )
        return self

    def stages(self) -> list[Stage]:
        """The steps before promotion, each with its analysis policy. alpha is shared among the
        steps, so a whole rollout of a good canary is rolled back with chance <= analysis.alpha."""
        judged = self.steps[:-1]

        def each(value: float | list[int] | list[float]) -> list:
            return value if isinstance(value, list) else [value] * len(judged)

        min_samples, max_seconds = each(self.min_samples), each(self.max_seconds)
        # (weight, audience, index of the step whose limits apply)
        plan = [(w, "everyone", i) for i, w in enumerate(judged)]
        if self.tenant_first:
            plan.insert(0, (100, "opted_in", 0))
        return [
            Stage(
                weight=weight,
                audience=audience,
                max_seconds=float(max_seconds[i]),
                analysis=self.analysis.model_copy(
                    update={
                        "alpha": self.analysis.alpha / len(plan),
                        "min_samples": min_samples[i],
                        "slos": self.slos,
                    }
                ),
            )
            for weight, audience, i in plan
        ]


class Stage(Strict):
    """One judged step: the canary's weight, who may reach it, its time limit and its analysis.
    A tenant-first stage sends every opted-in tenant to the canary (weight 100, audience
    opted_in) and everyone else to stable."""

    weight: int
    audience: Literal["everyone", "opted_in"] = "everyone"
    max_seconds: float
    analysis: AnalysisPolicy


def load_rollout_policy(path: str | Path = DEFAULT_POLICY) -> RolloutPolicy:
    return load_yaml(path, RolloutPolicy)
