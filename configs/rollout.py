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


class QualityPolicy(Strict):
    """How a mirrored answer is compared with stable's (evaluation/quality/agreement.py and
    logprob.py), and how many degraded answers the canary may give. A quantized model never
    matches its base token for token, so an answer counts as degraded only when the canary finds
    stable's answer much less likely than stable does (or, without log-probabilities, when its
    text leaves stable's far behind), refuses, breaks the asked format or changes length."""

    logprob: bool = Field(
        default=True,
        description="judge an answer by the canary's log-probability of stable's answer where the "
        "engines give prompt log-probabilities (vLLM does), by its text elsewhere",
    )
    score_rps: float = Field(
        default=0.25,
        gt=0,
        description="mirrored pairs scored by log-probability per second at most: each costs "
        "one prefill-only request on each engine, so the analysis never crowds the traffic it "
        "measures (scoring every pair of a 2-requests/s shadow phase overloaded two CPU engines)",
    )
    max_logprob_drop: float = Field(
        default=0.3,
        gt=0,
        description="nats per token: the canary finding stable's answer less likely than stable "
        "does by more than this is a degraded answer",
    )
    min_agreement: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="without log-probabilities: token agreement with stable's answer (F1 over "
        "words) below which the canary's answer is degraded",
    )
    max_length_ratio: float = Field(
        default=2.0, gt=1, description="an answer this many times longer or shorter is degraded"
    )
    accepted: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="share of degraded answers accepted for a candidate that passed its "
        "release evaluation",
    )
    margin: float = Field(
        default=0.1, gt=0, lt=1, description="absolute excess over `accepted` that is worse"
    )

    @model_validator(mode="after")
    def _below_one(self) -> QualityPolicy:
        if self.accepted + self.margin >= 1:
            raise ValueError(
                f"accepted + margin = {self.accepted + self.margin:g} would accept every answer "
                "degraded; keep their sum below 1"
            )
        return self


class ShadowPolicy(Strict):
    """A shadow phase before any user reaches the canary: the gateway copies stable's requests
    to it (the client gets stable's answer) and the copies are judged in pairs with stable's."""

    rate_rps: float = Field(
        default=1.0, gt=0, description="at most this many copies per second (the canary's load)"
    )
    min_pairs: int = Field(default=50, ge=1, description="mirrored pairs before it may pass")
    max_seconds: float = Field(default=600, gt=0, description="time limit of the shadow phase")
    every_step: bool = Field(
        default=True,
        description="keep mirroring at every live step: latency is then compared on pairs and "
        "answers stay judged",
    )
    max_in_flight: int = Field(
        default=8,
        ge=1,
        description="no copy goes to an engine already answering this many copies: one that "
        "falls behind sheds copies first, and the pairs stay those of an engine not overloaded",
    )
    warmup_copies: int = Field(
        default=0,
        ge=0,
        description="copies the canary answers before the shadow phase judges anything: a new "
        "engine is slower the first time it sees a prompt (its prefix cache is cold and, on CPU, "
        "kernels for each new shape are built), which would count against an identical build",
    )


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
    paired_clip: float | None = Field(
        default=0.5,
        gt=0,
        description="mirrored pairs: each pair's log latency ratio is clipped this far from the "
        "margin before the pairs are averaged (a Huber score), so a few requests stuck behind "
        "the other engine's work cannot drown the rest; null averages the log ratios as they are",
    )
    slos: Slos = Slos()
    quality: QualityPolicy = QualityPolicy()


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
    health_failures: int = Field(
        default=3,
        ge=1,
        le=100,
        description="failed /health checks in a row (one per look) before the canary counts as "
        "down and is rolled back: a busy engine on a contended machine can miss one",
    )
    synthetic_load: bool = Field(
        default=False, description="top up low traffic with synthetic requests"
    )
    synthetic_rate: float = Field(default=1.0, gt=0, description="synthetic requests per second")
    synthetic_max_in_flight: int = Field(
        default=8,
        ge=1,
        description="synthetic requests in flight at most: an arrival past it waits for one to "
        "finish, so slow engines slow the load down instead of queueing it without end",
    )
    webhook_url: AnyHttpUrl | None = Field(
        default=None, description="told of every step and verdict"
    )
    shadow: ShadowPolicy | None = Field(
        default=None, description="a mirrored phase first, judged before any user sees the canary"
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
        shadow = self.shadow
        mirror = shadow.rate_rps if shadow and shadow.every_step else None
        # (weight, audience, time limit, canary requests before it may pass, mirrored copies/s)
        plan = [
            (w, "everyone", float(max_seconds[i]), min_samples[i], mirror)
            for i, w in enumerate(judged)
        ]
        if self.tenant_first:
            plan.insert(0, (100, "opted_in", float(max_seconds[0]), min_samples[0], mirror))
        if shadow:
            plan.insert(0, (0, "everyone", shadow.max_seconds, shadow.min_pairs, shadow.rate_rps))
        return [
            Stage(
                weight=weight,
                audience=audience,
                max_seconds=seconds,
                mirror_rps=mirror_rps,
                mirror_in_flight=shadow.max_in_flight if shadow and mirror_rps else None,
                warmup_copies=shadow.warmup_copies if shadow and weight == 0 else 0,
                analysis=self.analysis.model_copy(
                    update={
                        "alpha": self.analysis.alpha / len(plan),
                        "min_samples": needed,
                        "slos": self.slos,
                    }
                ),
            )
            for weight, audience, seconds, needed, mirror_rps in plan
        ]


class Stage(Strict):
    """One judged step: the canary's weight, who may reach it, its time limit and its analysis.
    A tenant-first stage sends every opted-in tenant to the canary (weight 100, audience
    opted_in) and everyone else to stable."""

    weight: int  # 0: the shadow phase (mirrored copies only)
    audience: Literal["everyone", "opted_in"] = "everyone"
    max_seconds: float
    analysis: AnalysisPolicy
    mirror_rps: float | None = None  # stable's requests copied to the canary, at most this rate
    mirror_in_flight: int | None = None  # and none to an engine answering this many copies
    warmup_copies: int = 0  # copies the canary answers, not judged, before the window starts

    @property
    def shadow(self) -> bool:
        return self.weight == 0

    @property
    def label(self) -> str:
        """How the story names the stage."""
        if self.shadow:
            return "shadow (mirrored copies only)"
        return f"{self.weight}%" + (" of opted-in tenants" if self.audience == "opted_in" else "")


def load_rollout_policy(path: str | Path = DEFAULT_POLICY) -> RolloutPolicy:
    return load_yaml(path, RolloutPolicy)
