"""What serving costs (configs/pricing.yaml): hardware prices, what runs each model, reference API
list prices to compare with, monthly budgets per tenant (read by the cost report), and the
per-token chargeback rates a tenant's money budget is charged at (read by the gateway)."""

from __future__ import annotations

from datetime import date
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path

from pydantic import Field, model_validator

from configs.home import REPO
from configs.loader import Strict, load_yaml

DEFAULT_PRICING = REPO / "configs" / "pricing.yaml"


class Hardware(Strict):
    hourly_usd: float = Field(gt=0, description="price of one replica (GPU or node) per hour")
    description: str = ""


# Money is counted in whole nano-dollars: a price per million tokens with at most three decimals
# is a whole number of them per token, so every charge is exact integer arithmetic (in Redis too).
NANOS_PER_USD = 10**9


class TokenPrices(Strict):
    input_per_million: float = Field(ge=0, description="dollars per million prompt tokens")
    output_per_million: float = Field(ge=0, description="dollars per million completion tokens")

    @model_validator(mode="after")
    def _whole_nanos(self) -> TokenPrices:
        for name in ("input_per_million", "output_per_million"):
            value = getattr(self, name)
            if abs(value * 1000 - round(value * 1000)) > 1e-6:
                raise ValueError(
                    f"{name}: {value} has more than three decimals; money is charged in whole "
                    "nano-dollars per token ($0.001 per million), so round it to three"
                )
        return self

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (
            prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        ) / 1e6

    def nanos(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The exact charge in nano-dollars."""
        return prompt_tokens * round(self.input_per_million * 1000) + completion_tokens * round(
            self.output_per_million * 1000
        )


class Chargeback(Strict):
    """The per-token rates a tenant's usage is charged at (its money budget at the gateway): the
    tenant's own rate, else its tier's."""

    tiers: dict[str, TokenPrices] = Field(default={}, description="by tier name")
    tenants: dict[str, TokenPrices] = Field(default={}, description="by tenant, over its tier's")

    def rate(self, tenant: str, tier: str) -> TokenPrices | None:
        return self.tenants.get(tenant) or self.tiers.get(tier)


class Deployment(Strict):
    """What serves a model's versions (glob patterns; the first matching entry wins): `replicas`
    of a `hardware` class billed by the hour, or per-token `prices` (a hosted endpoint)."""

    model: str = "*"
    version: str = "*"
    hardware: str | None = None
    replicas: int = Field(default=1, ge=1)
    always_on: bool = Field(
        default=True,
        description="billed every hour of a day it served; false: only the hours with requests",
    )
    prices: TokenPrices | None = None

    @model_validator(mode="after")
    def _one_way_to_bill(self) -> Deployment:
        if (self.hardware is None) == (self.prices is None):
            raise ValueError(
                f"deployment {self.model}@{self.version}: give either hardware (and replicas) "
                "or prices"
            )
        return self

    def matches(self, model: str, version: str) -> bool:
        return fnmatchcase(model, self.model) and fnmatchcase(version, self.version)


class Budget(Strict):
    monthly_usd: float = Field(gt=0)
    alert_at: float = Field(default=0.8, gt=0, description="alert when this share of it is used")


class Pricing(Strict):
    hardware: dict[str, Hardware] = Field(default_factory=dict)
    deployments: list[Deployment] = Field(min_length=1)
    reference_as_of: date = Field(description="when the reference list prices were taken")
    reference: dict[str, TokenPrices] = Field(min_length=1, description="API list prices, by name")
    compare_with: str = Field(description="the reference the per-row saving is computed against")
    budgets: dict[str, Budget] = Field(
        default={}, description="per tenant, dollars per month, for the cost report's alerts"
    )
    chargeback: Chargeback = Field(
        default=Chargeback(), description="per-token rates the gateway's money budgets charge"
    )
    experiment: str = Field(default="slipway-monitoring", min_length=1, description="MLflow")

    @model_validator(mode="after")
    def _names_exist(self) -> Pricing:
        for d in self.deployments:
            if d.hardware is not None and d.hardware not in self.hardware:
                raise ValueError(
                    f"deployment {d.model}@{d.version}: hardware '{d.hardware}' is not one of "
                    f"{sorted(self.hardware)}"
                )
        if self.compare_with not in self.reference:
            raise ValueError(
                f"compare_with '{self.compare_with}' is not one of {sorted(self.reference)}"
            )
        return self

    def deployment(self, model: str, version: str) -> Deployment:
        for d in self.deployments:
            if d.matches(model, version):
                return d
        raise LookupError(
            f"no deployment in the pricing config matches {model} version {version}: add one "
            "(model/version globs) to configs/pricing.yaml"
        )


def load_pricing(path: str | Path = DEFAULT_PRICING) -> Pricing:
    return load_yaml(path, Pricing)


@cache
def embedded_chargeback() -> Chargeback:
    """The chargeback rates of the embedded configs/pricing.yaml (read once)."""
    return load_pricing().chargeback
