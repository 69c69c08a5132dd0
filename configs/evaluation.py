"""What to measure about a built variant (`evaluation:`) and what it must reach (`gates:`).

Quality runs lm-eval through the served model: the suites shipped in evaluation/quality/suites
(offline) plus, with network, any lm-eval task by name (`extra_tasks`). Speed runs the load
generator (evaluation/loadgen/) with one `LoadProfile`. Gates compare a variant with the bf16 base.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from configs.home import REPO
from configs.loader import Strict

SUITES_DIR = REPO / "evaluation" / "quality" / "suites"
PROMPTS = REPO / "evaluation" / "datasets" / "prompts.jsonl"
DEFAULT_SUITES = ["slipway_knowledge", "slipway_short_answer", "slipway_perplexity"]
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def shipped_suites(suites_dir: Path = SUITES_DIR) -> list[str]:
    """Task and tag names the shipped YAMLs define, read as text (no lm-eval import, no index)."""
    names: set[str] = set()
    for path in suites_dir.glob("*.yaml"):
        for m in re.finditer(r"^(?:task|tag|group):\s*['\"]?([\w.-]+)", path.read_text(), re.M):
            names.add(m[1])
    return sorted(names)


class LoadProfile(Strict):
    """How the load generator drives the server: one request at a time, a concurrency sweep, or
    Poisson arrivals at a fixed rate. Warm-up requests are sent first and not measured."""

    mode: Literal["synchronous", "sweep", "poisson"] = "sweep"
    concurrency: list[int] = Field(
        default=[1, 2, 4, 8], min_length=1, description="sweep: the concurrency levels"
    )
    rate: float | None = Field(default=None, gt=0, description="poisson: requests per second")
    max_concurrency: int | None = Field(
        default=None, ge=1, description="poisson: cap on requests in flight (none: unbounded)"
    )
    num_prompts: int = Field(default=48, ge=1, description="measured requests per level")
    warmup: int = Field(default=2, ge=0, description="unmeasured requests before each level")
    prompts: Path = Field(default=PROMPTS, description="JSONL: {prompt, output_tokens} per line")
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="cap on each prompt's output_tokens (e.g. for a short model)",
    )
    max_prompt_chars: int | None = Field(
        default=None, ge=1, description="skip longer prompts (for a model with a short context)"
    )
    endpoint: Literal["completions", "chat"] = "completions"
    ignore_eos: bool = Field(
        default=True, description="vLLM: generate exactly max_tokens, so runs are comparable"
    )
    slo_ttft_ms: float = Field(default=2000.0, gt=0, description="goodput: time to first token")
    slo_tpot_ms: float = Field(default=200.0, gt=0, description="goodput: time per output token")
    timeout_s: float = Field(default=300.0, gt=0, description="per request")
    seed: int = 0

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if any(c < 1 for c in v):
            raise ValueError(f"concurrency levels must be >= 1, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"concurrency levels must be distinct, got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _complete(self) -> LoadProfile:
        if self.mode == "poisson" and self.rate is None:
            raise ValueError("mode 'poisson' needs rate (requests per second)")
        if self.mode != "poisson" and (self.rate is not None or self.max_concurrency is not None):
            raise ValueError(
                f"rate and max_concurrency apply to mode 'poisson' only, not {self.mode!r}"
            )
        return self

    @field_validator("prompts", mode="after")
    @classmethod
    def _prompts(cls, v: Path) -> Path:
        return v if v.is_absolute() else REPO / v


class Regression(Strict):
    """How a scheduled regression run is judged against the ledger of earlier runs with the same
    weights, vLLM version and hardware (evaluation/regression.py).

    A figure regresses when it moved the wrong way by more than its noise band: k times the
    ledger's run-to-run spread (scaled MAD of the last `window` runs), but at least the relative
    floor, so a ledger of near-identical runs does not flag tiny moves."""

    window: int = Field(default=10, ge=2, description="earlier runs that form the baseline")
    min_runs: int = Field(default=3, ge=1, description="fewer earlier runs: nothing is judged")
    k: float = Field(default=3.0, gt=0, description="band = k x spread (a standard deviation)")
    speed_floor: float = Field(default=0.10, ge=0, description="least band, speed (0.10 = 10%)")
    quality_floor: float = Field(default=0.02, ge=0, description="least band, quality figures")

    @model_validator(mode="after")
    def _judgeable(self) -> Regression:
        if self.min_runs > self.window:
            raise ValueError(
                f"min_runs {self.min_runs} exceeds window {self.window}: nothing would be judged"
            )
        return self


class Evaluation(Strict):
    """Which quality suites to run through the server, and how hard to drive it."""

    suites: list[str] = Field(default=DEFAULT_SUITES, description="shipped suites (offline)")
    extra_tasks: list[str] = Field(
        default=[], description="lm-eval tasks by name (mmlu, arc_easy, ...): need the Hub"
    )
    limit: int | None = Field(default=None, ge=1, description="items per task (None: all)")
    num_concurrent: int = Field(default=4, ge=1, description="requests lm-eval keeps in flight")
    max_retries: int = Field(default=3, ge=1)
    timeout_s: int = Field(default=300, ge=1, description="per request")
    loadgen: LoadProfile = LoadProfile()
    regression: Regression = Regression()

    @field_validator("suites")
    @classmethod
    def _suites(cls, v: list[str]) -> list[str]:
        known = shipped_suites()
        if unknown := [s for s in v if s not in known]:
            raise ValueError(
                f"unknown suite(s) {', '.join(map(repr, unknown))}; shipped suites are "
                f"{', '.join(known)} (lm-eval tasks from the Hub go in extra_tasks)"
            )
        return _distinct(v)

    @field_validator("extra_tasks")
    @classmethod
    def _extra(cls, v: list[str]) -> list[str]:
        if bad := [t for t in v if not _TASK_NAME.match(t)]:
            raise ValueError(f"{', '.join(map(repr, bad))}: not an lm-eval task name")
        if shipped := [t for t in v if t in shipped_suites()]:
            raise ValueError(
                f"{', '.join(map(repr, shipped))} are shipped suites: list them in suites"
            )
        return _distinct(v)

    @model_validator(mode="after")
    def _something(self) -> Evaluation:
        if not self.suites and not self.extra_tasks:
            raise ValueError("nothing to evaluate: suites and extra_tasks are both empty")
        return self

    @property
    def tasks(self) -> list[str]:
        return [*self.suites, *self.extra_tasks]

    def quick(self) -> Evaluation:
        """The scheduled regression run's cut: each suite's shipped `<suite>_quick` where there is
        one, and no Hub tasks (a nightly run must not depend on the network)."""
        shipped = set(shipped_suites())
        quick = [f"{s}_quick" if f"{s}_quick" in shipped else s for s in self.suites]
        return self.model_copy(update={"suites": list(dict.fromkeys(quick)), "extra_tasks": []})


class Gates(Strict):
    """What a quantized variant must keep of the bf16 base, and optional speed floors.

    Quality: the loss 1 - score / base score shown below 1 - min_recovery (per task;
    min_recovery_per_task overrides) at error rate alpha, else `inconclusive` or failed (see
    evaluation/quality/gates.py). Perplexity tasks: relative increase <= max_perplexity_increase.
    """

    min_recovery: float = Field(
        default=0.95,
        gt=0,
        lt=1,
        description="fraction of base score the variant must be shown to keep (1 - the margin)",
    )
    min_recovery_per_task: dict[str, float] = Field(default={}, description="task -> fraction")
    metric_per_task: dict[str, str] = Field(
        default={}, description="task -> metric gated (default: acc, exact_match, acc_norm, ...)"
    )
    max_perplexity_increase: float = Field(default=0.10, ge=0, description="relative, 0.10 = +10%")
    alpha: float = Field(
        default=0.05,
        gt=0,
        lt=0.5,
        description="one-sided error rate of each quality decision: passing a variant whose loss "
        "is at the margin, or failing one whose loss is",
    )
    speed_concurrency: int = Field(default=1, ge=1, description="sweep level the speed gates read")
    max_ttft_p50_ms: float | None = Field(default=None, gt=0)
    min_output_tokens_per_s: float | None = Field(default=None, gt=0)

    @field_validator("min_recovery_per_task")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        if bad := {k: x for k, x in v.items() if not 0 < x < 1}:
            raise ValueError(
                f"recoveries must be in (0, 1), got {bad}: a margin of 0 can never be shown"
            )
        return v

    def check_tasks(self, tasks: list[str]) -> None:
        """Raise if a per-task gate names a task that is not evaluated (a typo gates nothing)."""
        for field in ("min_recovery_per_task", "metric_per_task"):
            if stray := sorted(set(getattr(self, field)) - set(tasks)):
                raise ValueError(
                    f"gates.{field} names task(s) not evaluated: {', '.join(stray)} "
                    f"(evaluated: {', '.join(tasks)})"
                )


def _distinct(v: list[str]) -> list[str]:
    if dup := sorted({x for x in v if v.count(x) > 1}):
        raise ValueError(f"listed more than once: {', '.join(dup)}")
    return v
