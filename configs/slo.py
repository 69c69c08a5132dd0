"""Service level objectives (configs/slo.yaml): the share of requests that must succeed and the
share that must see their first token in time, per model or for the whole gateway, over a rolling
window. evaluation/monitoring/slo.py turns them into Prometheus recording rules and alerts."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from configs.gateway import LATENCY_BUCKETS
from configs.home import REPO
from configs.loader import Strict, load_yaml

DEFAULT_SLO = REPO / "configs" / "slo.yaml"

# The slow burn-rate alert looks back 3 days: a shorter window would be spent before it fires.
MIN_WINDOW_DAYS = 7
_WINDOW = re.compile(r"^([1-9][0-9]*)d$")


class Latency(Strict):
    objective: float = Field(
        gt=0, lt=1, description="share of streamed requests whose first token comes within ttft_s"
    )
    ttft_s: float = Field(
        description="seconds; one of the gateway's TTFT histogram bounds, as only at a bound can "
        "Prometheus count the requests under it"
    )

    @field_validator("ttft_s")
    @classmethod
    def _a_bound(cls, v: float) -> float:
        if v not in LATENCY_BUCKETS:
            bounds = ", ".join(f"{b:g}" for b in LATENCY_BUCKETS)
            raise ValueError(
                f"{v:g} s is not a bound of the gateway's TTFT histogram, so the requests under "
                f"it cannot be counted; use one of {bounds}"
            )
        return v


class Objectives(Strict):
    availability: float | None = Field(
        default=None, gt=0, lt=1, description="share of requests that must succeed, e.g. 0.999"
    )
    latency: Latency | None = None

    @model_validator(mode="after")
    def _one(self) -> Objectives:
        if self.availability is None and self.latency is None:
            raise ValueError("set availability, latency or both: an empty entry alerts on nothing")
        return self


class SloConfig(Strict):
    window: str = Field(
        default="30d", description="the rolling window the error budget is spent over, in days"
    )
    gateway: Objectives | None = Field(
        default=None, description="over every API response, whatever the model"
    )
    models: dict[str, Objectives] = Field(default={}, description="by model name")

    @field_validator("window")
    @classmethod
    def _days(cls, v: str) -> str:
        match = _WINDOW.match(v)
        if not match:
            raise ValueError(f"{v!r} must be a whole number of days, e.g. 30d")
        if int(match[1]) < MIN_WINDOW_DAYS:
            raise ValueError(
                f"{v} is shorter than {MIN_WINDOW_DAYS}d: the slow burn alert looks back 3 days"
            )
        return v

    @property
    def window_hours(self) -> int:
        return int(self.window.removesuffix("d")) * 24


def load_slo_config(path: str | Path = DEFAULT_SLO) -> SloConfig:
    return load_yaml(path, SloConfig)
